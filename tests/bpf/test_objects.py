"""Loading, pinning, map access, attach and link adoption through tabby.bpf (root)."""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
from pathlib import Path

import packets as P
import pytest

from tabby.bpf import libbpf
from tabby.bpf.maps import ALL_SPECS
from tabby.bpf.maps.counters import COUNTERS_SPEC, Counters, Reason
from tabby.bpf.maps.routes import ROUTES_SPEC, RouteKey, RoutesMap, RouteValue
from tabby.bpf.maps.spec import BPF_MAP_TYPE_HASH
from tabby.bpf.objects import DatapathConfig, DatapathObjects
from tabby.netlink.netns import enter_netns

pytestmark = pytest.mark.root


def test_reload_reuses_pinned_maps(bpf_dir: Path, pin_root: str) -> None:
    config = DatapathConfig.build(vni=4242, host_ip=P.NODE_IP)
    with DatapathObjects(pin_root, config, bpf_dir) as dp:
        dp.routes().upsert("100.96.0.64/26", RouteValue.remote_workload(P.REMOTE_NODE_IP))
        libbpf.test_run(dp.prog_fd("tby_tun_egress"), P.tcp())
    assert sorted(os.listdir(pin_root)) == sorted(s.name for s in ALL_SPECS)
    with DatapathObjects(pin_root, config, bpf_dir) as dp:  # "the agent restarted"
        assert dp.routes().dump() == {
            "100.96.0.64/26": RouteValue.remote_workload(P.REMOTE_NODE_IP)
        }
        assert dp.counters().get(Reason.ENCAP_VXLAN) == 1
        verdict, _, _ = libbpf.test_run(dp.prog_fd("tby_tun_egress"), P.tcp())
        assert verdict == libbpf.TC_ACT_OK


def test_all_objects_share_one_map(datapath: DatapathObjects) -> None:
    ids = set()
    for obj in datapath.objects.values():
        fd = obj.map_fd("tby_routes")
        ids.add(_map_id(fd))
    assert len(ids) == 1


def _map_id(fd: int) -> int:
    info = (ctypes.c_uint32 * 32)()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    assert libbpf._lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)) == 0
    return int(info[1])  # struct bpf_map_info: type, id, ...


def test_incompatible_pin_is_refused(bpf_dir: Path, pin_root: str) -> None:
    """A pin left by an older layout must not be silently reused (that is what _vN is for)."""
    os.makedirs(pin_root)
    fd = libbpf.map_create(BPF_MAP_TYPE_HASH, "tby_routes", 8, 16, 16)
    try:
        libbpf.obj_pin(fd, f"{pin_root}/tby_routes")
    finally:
        os.close(fd)
    dp = DatapathObjects(pin_root, DatapathConfig.build(), bpf_dir)
    with pytest.raises(OSError, match="load"):
        dp.load()


def _older_counters(pin_root: str, reason: Reason, packets: int) -> None:
    """tby_counters as a build with one reason fewer left it, ``packets`` counted on CPU 0."""
    os.makedirs(pin_root, exist_ok=True)
    fd = libbpf.map_create(
        COUNTERS_SPEC.map_type, "tby_counters", 4, 8, COUNTERS_SPEC.max_entries - 1
    )
    try:
        old = libbpf.Map(fd, ctypes.c_uint32, COUNTERS_SPEC.value_buffer_type())
        slots = COUNTERS_SPEC.value_buffer_type()()
        slots[0] = packets
        old.update(ctypes.c_uint32(reason), slots)
        libbpf.obj_pin(fd, f"{pin_root}/tby_counters")
    finally:
        os.close(fd)


def test_a_resized_pin_is_recreated_with_its_entries(bpf_dir: Path, pin_root: str) -> None:
    """An upgrade that appended a reason: the agent's load recreates tby_counters at the new
    size (libbpf alone refuses the pin) and carries the counts over."""
    _older_counters(pin_root, Reason.ENCAP_VXLAN, 41)
    with DatapathObjects(pin_root, DatapathConfig.build(), bpf_dir) as dp:
        fd = dp.objects["tc_to_host.o"].map_fd("tby_counters")
        assert libbpf.MapDef.of_fd(fd).max_entries == COUNTERS_SPEC.max_entries
        assert dp.counters().get(Reason.ENCAP_VXLAN) == 41
        assert len({_map_id(o.map_fd("tby_counters")) for o in dp.objects.values()}) == 1


def test_a_failed_load_puts_the_old_pin_back(bpf_dir: Path, pin_root: str, tmp_path: Path) -> None:
    """The set-aside pin is restored, contents and all, when a later object fails to load."""
    _older_counters(pin_root, Reason.ENCAP_VXLAN, 7)
    broken = tmp_path / "bpf"
    shutil.copytree(bpf_dir, broken)
    (broken / "ct_gc.o").write_bytes(b"not an ELF object")
    with pytest.raises(OSError):
        DatapathObjects(pin_root, DatapathConfig.build(), broken).load()
    restored = libbpf.Map.from_pin(
        f"{pin_root}/tby_counters", ctypes.c_uint32, COUNTERS_SPEC.value_buffer_type()
    )
    try:
        assert libbpf.MapDef.of_fd(restored.fd).max_entries == COUNTERS_SPEC.max_entries - 1
        slots = restored.lookup(ctypes.c_uint32(Reason.ENCAP_VXLAN))
        assert slots is not None and sum(slots) == 7
    finally:
        restored.close()


def test_pinned_maps_open_from_their_specs(datapath: DatapathObjects) -> None:
    datapath.routes().upsert("10.0.0.0/8", RouteValue.remote_host(P.REMOTE_NODE_IP))
    libbpf.test_run(datapath.prog_fd("tby_from_wl"), P.arp())
    routes_map = ROUTES_SPEC.open_pinned(datapath.pin_root)
    counters_map = COUNTERS_SPEC.open_pinned(datapath.pin_root)
    try:
        assert RoutesMap(routes_map).describe() == ["10.0.0.0/8 remote-host via 172.20.64.12"]
        counts = Counters(counters_map).read()
        assert counts["pass_non_ip"] == 1 and set(counts) == {r.label for r in Reason}
    finally:
        routes_map.close()
        counters_map.close()


def test_routes_manager_crud(datapath: DatapathObjects) -> None:
    routes = datapath.routes()
    value = RouteValue.local_workload(7)
    routes.upsert("100.96.0.5", value)
    assert routes.get("100.96.0.5/32") == value
    assert routes.delete("100.96.0.5/32") is True
    assert routes.delete("100.96.0.5/32") is False
    assert routes.dump() == {}


def test_map_batch_operations(pin_root: str) -> None:
    fd = libbpf.map_create(BPF_MAP_TYPE_HASH, "tby_test_batch", 8, 16, 1024)
    m = libbpf.Map(fd, RouteKey, RouteValue, name="batch", owned=True)
    try:
        keys = [RouteKey.for_cidr(f"10.{i // 256}.{i % 256}.0/24") for i in range(300)]
        values = [RouteValue.local_workload(i + 1) for i in range(300)]
        assert m.update_batch(keys, values) == 300
        dumped = {k.cidr: v.ifindex for k, v in m.lookup_batch(chunk=64)}
        assert dumped == {k.cidr: i + 1 for i, k in enumerate(keys)}
        assert m.delete_batch(keys[:100]) == 100
        assert len(list(m.items())) == 200
        assert m.lookup(keys[0]) is None and m.lookup(keys[150]) == values[150]
    finally:
        m.close()


def test_test_run_reports_duration(datapath: DatapathObjects) -> None:
    verdict, _, duration_ns = libbpf.test_run(datapath.prog_fd("tby_to_wl"), P.tcp(), repeat=1000)
    assert verdict == libbpf.TC_ACT_OK and 0 < duration_ns < 100_000


def test_tcx_link_pin_adopt_and_swap(datapath: DatapathObjects, scratch_netns: str) -> None:
    from_wl, to_wl = datapath.prog_fd("tby_from_wl"), datapath.prog_fd("tby_to_wl")
    pin = f"{datapath.pin_root}/link_lo_ingress"
    with enter_netns(scratch_netns):
        link = libbpf.tcx_attach(1, from_wl, ingress=True)
    try:
        libbpf.obj_pin(link, pin)
    finally:
        os.close(link)
    adopted = libbpf.obj_get(pin)  # what a restarted agent does
    try:
        from_id = libbpf.prog_info(from_wl)[0]
        assert libbpf.link_info(adopted) == (from_id, 1, libbpf.BPF_TCX_INGRESS)
        libbpf.link_update(adopted, to_wl)
        to_id, to_name = libbpf.prog_info(to_wl)
        assert to_name == "tby_to_wl"
        assert libbpf.link_info(adopted)[0] == to_id
        # traffic really runs through it: datagrams on lo are counted by tby_to_wl
        before = datapath.counters().get(Reason.PASS_WL_IN)
        with enter_netns(scratch_netns):
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a listener: no ICMP errors
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with rx, tx:
            rx.bind(("127.0.0.1", 0))
            for _ in range(2):
                tx.sendto(b"tabby", rx.getsockname())
                assert rx.recv(16) == b"tabby"
        assert datapath.counters().get(Reason.PASS_WL_IN) - before == 2
    finally:
        os.close(adopted)
        os.unlink(pin)  # the last reference: detaches


def test_clsact_fallback(datapath: DatapathObjects, scratch_netns: str) -> None:
    fd = datapath.prog_fd("tby_to_wl")
    with enter_netns(scratch_netns):
        prog_id = libbpf.tc_attach(1, fd, ingress=False)
        assert prog_id == libbpf.prog_info(fd)[0]
        assert libbpf.tc_query(1, ingress=False) == prog_id
        libbpf.tc_detach(1, ingress=False)
        assert libbpf.tc_query(1, ingress=False) is None

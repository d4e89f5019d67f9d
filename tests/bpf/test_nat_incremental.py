"""The incremental service path on real maps: ServiceIndex -> NatManager.apply(hint).

One endpoint change is applied with the index's ``changed`` names as the agent does (no pass over
the other services): only that service's entries are written, every other entry keeps its bytes,
and the maps end up holding exactly what a fresh programming of the whole state gives. Then a
packet through tby_from_wl is translated to the new backend.
"""

from __future__ import annotations

from typing import Any

import packets as P
import pytest
from scapy.all import IP, TCP, Ether, raw

from tabby.bpf.maps.nat import BACKENDS_SPEC, FRONTENDS_SPEC, SOURCE_RANGES_SPEC, BackendKey
from tabby.bpf.maps.routes import RouteValue
from tabby.bpf.objects import DatapathObjects
from tabby.calc.nodestate import NodeState, with_services
from tabby.calc.services import ServiceIndex
from tabby.dataplane.nat import NatManager

pytestmark = pytest.mark.root

NODE = "node1"
SERVICES = 40


def service(i: int, protocol: str = "TCP") -> dict[str, Any]:
    vip = f"100.64.1.{i + 1}"
    port = {"name": "p", "port": 80, "targetPort": 8080, "protocol": protocol}
    return {
        "metadata": {"namespace": "default", "name": f"s{i}"},
        "spec": {"type": "ClusterIP", "clusterIP": vip, "ports": [port]},
    }


def endpoints(i: int, addrs: list[str], protocol: str = "TCP") -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "default",
            "name": f"s{i}-1",
            "labels": {"kubernetes.io/service-name": f"s{i}"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": protocol}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addrs],
    }


def backends(i: int) -> list[str]:
    return [f"100.96.{i}.{j + 10}" for j in range(3)]


def dump(dp: DatapathObjects) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    fe = {bytes(k): bytes(v) for k, v in dp.map(FRONTENDS_SPEC).lookup_batch()}
    be = {bytes(k): bytes(v) for k, v in dp.map(BACKENDS_SPEC).lookup_batch()}
    return fe, be


def logical(dp: DatapathObjects) -> dict[str, tuple[str, ...]]:
    """frontend -> its backends in ordinal order (set ids differ between managers)."""
    out = {}
    be_map = dp.map(BACKENDS_SPEC)
    for key, value in dp.map(FRONTENDS_SPEC).lookup_batch():
        found = (be_map.lookup(BackendKey(id=value.id, ordinal=o)) for o in range(value.count))
        out[key.describe()] = tuple(b.describe() for b in found if b is not None)
    return out


def wanted(services: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """What the maps must hold for ``services`` (calc's frontends and their backend sets)."""
    return {
        f"{fe.addr}:{fe.port}/{fe.protocol}": tuple(
            f"{a}:{p}" for a, p in svc.backend_sets[fe.backend_set]
        )
        for svc in services.values()
        for fe in svc.frontends
    }


def manager(dp: DatapathObjects) -> NatManager:
    return NatManager(*(dp.map(s) for s in (FRONTENDS_SPEC, BACKENDS_SPEC, SOURCE_RANGES_SPEC)))


def programmed_index(dp: DatapathObjects, protocol: str = "TCP") -> tuple[ServiceIndex, NatManager]:
    index, nat = ServiceIndex(NODE), manager(dp)
    for i in range(SERVICES):
        index.on_service(("default", f"s{i}"), service(i, protocol))
        index.on_slice(("default", f"s{i}-1"), endpoints(i, backends(i), protocol))
    result = nat.apply(index.results(), None)  # the first apply compares everything
    assert not result.errors and result.frontends == SERVICES
    return index, nat


def test_one_endpoint_change_writes_only_that_service(datapath: DatapathObjects) -> None:
    index, nat = programmed_index(datapath)
    before_fe, before_be = dump(datapath)

    new = [*backends(7)[:2], "100.96.99.1"]  # s7's third endpoint replaced
    index.on_slice(("default", "s7-1"), endpoints(7, new))
    state = with_services(NodeState(node=NODE, node_ip=P.NODE_IP), index)
    assert state.services_changed == {"default/s7"}
    result = nat.apply(state.services, state.services_changed)
    assert not result.errors
    assert result.writes == 1  # one backend ordinal; the count did not change: no frontend write
    assert result.backends_removed and not result.udp_backends_removed  # a TCP port

    after_fe, after_be = dump(datapath)
    assert after_fe == before_fe
    changed = {k for k in after_be if after_be[k] != before_be.get(k)}
    assert len(changed) == 1 and set(after_be) == set(before_be)
    assert logical(datapath) == wanted(state.services)  # the whole state, not just s7

    # and a packet to s7's VIP now reaches one of its current backends
    datapath.routes().upsert(f"{P.POD_IP}/32", RouteValue.local_workload(1))
    syn = Ether(src=P.POD_MAC, dst=P.HOST_MAC) / IP(src=P.POD_IP, dst="100.64.1.8")
    syn = syn / TCP(sport=40000, dport=80, flags="S")
    _, out_bytes, _ = P.Runner(datapath).run("tby_from_wl", raw(syn))
    out = Ether(out_bytes)
    assert out[IP].dst in new and out[TCP].dport == 8080


def test_coalesced_hints_and_a_removal_converge(datapath: DatapathObjects) -> None:
    """Two changes folded into one apply (the worker coalescing), one of them a deletion."""
    index, nat = programmed_index(datapath)
    index.on_slice(("default", "s3-1"), endpoints(3, backends(3)[:1]))
    first = index.results()
    hint = set(index.changed)
    index.on_service(("default", "s5"), None)
    second = index.results()
    hint |= index.changed
    assert hint == {"default/s3", "default/s5"} and first is not second
    result = nat.apply(second, hint)
    assert not result.errors and result.frontends == SERVICES - 1
    got = logical(datapath)
    assert got == wanted(second)
    assert "100.64.1.6:80/TCP" not in got
    assert got["100.64.1.4:80/TCP"] == (f"{backends(3)[0]}:8080",)
    for i in set(range(SERVICES)) - {3, 5}:
        assert got[f"100.64.1.{i + 1}:80/TCP"] == tuple(f"{a}:8080" for a in backends(i))
    # a later apply with nothing changed writes nothing
    assert nat.apply(index.results(), index.changed).writes == 0


def test_only_a_udp_backend_leaving_asks_for_a_conntrack_sweep(datapath: DatapathObjects) -> None:
    index, nat = programmed_index(datapath, "UDP")
    index.on_slice(("default", "s1-1"), endpoints(1, backends(1)[1:], "UDP"))
    result = nat.apply(index.results(), index.changed)
    assert result.backends_removed and result.udp_backends_removed
    index.on_service(("default", "s2"), service(2, "TCP"))
    index.on_slice(("default", "s2-1"), endpoints(2, backends(2), "TCP"))
    nat.apply(index.results(), index.changed)
    index.on_slice(("default", "s2-1"), endpoints(2, backends(2)[:1], "TCP"))
    result = nat.apply(index.results(), index.changed)
    assert result.backends_removed and not result.udp_backends_removed


def test_a_restart_adopts_the_pinned_sets_and_keeps_one_copy_of_their_backends(
    datapath: DatapathObjects,
) -> None:
    """A warm start: a new manager over the same (pinned) maps claims every set without a
    write, and keeps calc's backend tuples, not its own decoded copy of the maps (~8 MB at
    20,000 services x 3 endpoints, held for the agent's life)."""
    index, _ = programmed_index(datapath)
    before = dump(datapath)
    restarted = manager(datapath)
    desired = index.results()
    result = restarted.apply(desired, None)
    assert not result.errors and result.writes == 0
    assert dump(datapath) == before
    for name, svc in desired.items():
        for set_name, backends in svc.backend_sets.items():
            assert restarted.sets[set_name].backends is backends, name


def test_a_restart_after_an_endpoint_changed_rewrites_that_ordinal_only(
    datapath: DatapathObjects,
) -> None:
    """An endpoint replaced while the agent was down: the restarted manager still claims the
    pinned set (its id is kept) and writes the one ordinal that differs."""
    index, _ = programmed_index(datapath)
    before_fe, before_be = dump(datapath)
    new = [*backends(7)[:2], "100.96.99.1"]  # the third endpoint replaced
    index.on_slice(("default", "s7-1"), endpoints(7, new))
    restarted = manager(datapath)
    desired = index.results()
    result = restarted.apply(desired, None)
    assert not result.errors and result.writes == 1
    after_fe, after_be = dump(datapath)
    assert after_fe == before_fe and set(after_be) == set(before_be)  # the same ids
    changed = [BackendKey.from_buffer_copy(k) for k in after_be if after_be[k] != before_be[k]]
    assert [k.ordinal for k in changed] == [2]
    assert logical(datapath) == wanted(desired)

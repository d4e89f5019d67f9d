"""The fast path (fwd.h, bpfRedirectToPeer) under BPF_PROG_TEST_RUN, in a node-like netns.

bpf_fib_lookup reads the FIB and neighbour table of the netns test_run runs in, so every case
runs with this thread in a throw-away namespace shaped like a node: the pod's host veth
(``wla``, where the packet comes in: ctx.ifindex), another pod's (``wlb``), and a data
interface (``data``) with a remote pod block routed through it, each with a permanent neighbour
entry of a MAC of its own. test_run does not carry the redirect out, so the egress device is
told by the source MAC the program wrote (each device's own) and the destination MAC (its
neighbour's), and a local pod's delivery (bpf_redirect_peer) by its counters: ``fwd_peer``
and ``pass_wl_in`` (tby_to_wl's work, done on the way), where a packet for another node is
``fwd_redirect``.
"""

from __future__ import annotations

import ctypes
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import packets as P
import pytest
from scapy.all import IP, TCP, UDP, Ether, Raw, raw

from tabby.bpf import libbpf
from tabby.bpf.libbpf import TC_ACT_OK, SkBuffCtx
from tabby.bpf.maps.counters import Reason
from tabby.bpf.maps.nat import (
    BACKENDS_SPEC,
    FRONTENDS_SPEC,
    BackendKey,
    BackendValue,
    FrontendKey,
    FrontendValue,
)
from tabby.bpf.maps.policy import SPECS as POLICY_SPECS
from tabby.bpf.maps.policy import PolicyMaps
from tabby.bpf.maps.routes import WL_DEVS_SPEC, RouteValue, WlDevValue
from tabby.bpf.objects import DatapathConfig, DatapathObjects
from tabby.calc import policy as calc_policy
from tabby.dataplane.policy import PolicyManager
from tabby.model.validate import validate
from tabby.netlink.netns import enter_netns

pytestmark = pytest.mark.root

TC_ACT_REDIRECT = 7
OTHER_POD_MAC = "02:fc:00:00:00:09"
GATEWAY_MAC = "02:fa:b0:00:00:01"  # the data interface's next hop towards the remote block
WLB_MTU = 1400
ROUTE_MTU = 1480


@dataclass
class Node:
    netns: str
    ifindex: dict[str, int]
    mac: dict[str, str]


def _ip(netns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "-n", netns, *args], check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture
def node() -> Iterator[Node]:
    name = f"tabby-test-fwd-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        _ip(name, "link", "set", "lo", "up")
        for dev in ("wla", "wlb", "data"):
            _ip(name, "link", "add", dev, "type", "veth", "peer", "name", f"{dev}-p")
            _ip(name, "link", "set", f"{dev}-p", "up")
            _ip(name, "link", "set", dev, "up")
        _ip(name, "link", "set", "wlb", "mtu", str(WLB_MTU))
        subprocess.run(
            ["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True
        )
        _ip(name, "addr", "add", f"{P.NODE_IP}/19", "dev", "data")
        _ip(name, "route", "add", f"{P.POD_IP}/32", "dev", "wla", "scope", "link")
        _ip(name, "route", "add", f"{P.OTHER_POD_IP}/32", "dev", "wlb", "scope", "link")
        # an IP-in-IP route: its MTU leaves room for the outer header on the data device
        route = ["100.96.0.64/26", "via", P.REMOTE_NODE_IP, "dev", "data", "onlink"]
        _ip(name, "route", "add", *route, "mtu", str(ROUTE_MTU))
        _ip(name, "route", "add", "100.96.0.32/32", "dev", "wlb", "scope", "link")  # no neigh
        _ip(
            name,
            "neigh",
            "replace",
            P.POD_IP,
            "lladdr",
            P.POD_MAC,
            "dev",
            "wla",
            "nud",
            "permanent",
        )
        _ip(
            name,
            "neigh",
            "replace",
            P.OTHER_POD_IP,
            "lladdr",
            OTHER_POD_MAC,
            "dev",
            "wlb",
            "nud",
            "permanent",
        )
        _ip(
            name,
            "neigh",
            "replace",
            P.REMOTE_NODE_IP,
            "lladdr",
            GATEWAY_MAC,
            "dev",
            "data",
            "nud",
            "permanent",
        )
        ifindex: dict[str, int] = {}
        mac: dict[str, str] = {}
        for dev in ("wla", "wlb", "data"):
            out = _ip(name, "-o", "link", "show", "dev", dev).split()
            ifindex[dev] = int(out[0].rstrip(":"))
            mac[dev] = out[out.index("link/ether") + 1]
        yield Node(name, ifindex, mac)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _load(bpf_dir: Path, pin_root: str, node: Node, redirect: bool) -> DatapathObjects:
    config = DatapathConfig.build(vni=4242, host_ip=P.NODE_IP, redirect=redirect)
    dp = DatapathObjects(pin_root, config, bpf_dir)
    dp.load()
    routes = dp.routes()
    routes.upsert(f"{P.POD_IP}/32", RouteValue.local_workload(node.ifindex["wla"]))
    routes.upsert(f"{P.OTHER_POD_IP}/32", RouteValue.local_workload(node.ifindex["wlb"]))
    routes.upsert("100.96.0.32/32", RouteValue.local_workload(node.ifindex["wlb"]))
    routes.upsert("100.96.0.64/26", RouteValue.remote_workload(P.REMOTE_NODE_IP, "ipip"))
    routes.upsert(f"{P.NODE_IP}/32", RouteValue.local_host())
    routes.upsert(f"{P.REMOTE_NODE_IP}/32", RouteValue.remote_host(P.REMOTE_NODE_IP))
    return dp


@pytest.fixture
def fast(bpf_dir: Path, pin_root: str, node: Node) -> Iterator[DatapathObjects]:
    with _load(bpf_dir, pin_root, node, redirect=True) as dp:
        yield dp


@pytest.fixture
def slow(bpf_dir: Path, pin_root: str, node: Node) -> Iterator[DatapathObjects]:
    with _load(bpf_dir, pin_root, node, redirect=False) as dp:
        yield dp


def _run(
    dp: DatapathObjects, node: Node, prog: str, frame: bytes, dev: str = "wla", gso_size: int = 0
) -> tuple[int, Ether, dict[Reason, int]]:
    counters = dp.counters()
    before = {r: counters.get(r) for r in Reason}
    ctx = SkBuffCtx(ifindex=node.ifindex[dev], ingress_ifindex=node.ifindex[dev])
    if gso_size:  # a TSO aggregate as a pod sends it: segments of gso_size payload bytes
        ctx.gso_size, ctx.gso_segs = gso_size, -(-len(frame) // gso_size)
    with enter_netns(node.netns):
        verdict, out, _ = libbpf.test_run(dp.prog_fd(prog), frame, ctx)
    delta = {r: counters.get(r) - n for r, n in before.items()}
    return verdict, Ether(out), {r: d for r, d in delta.items() if d}


def _frame(dst: str, src: str = P.POD_IP, ttl: int = 64, size: int = 5) -> bytes:
    return raw(
        P.eth() / IP(src=src, dst=dst, ttl=ttl) / TCP(sport=40000, dport=80) / Raw(b"x" * size)
    )


def _redirected_to(out: Ether, smac: str, dmac: str, ttl: int) -> None:
    assert (out.src, out.dst) == (smac, dmac)
    assert out[IP].ttl == ttl
    # the checksum the kernel would check: scapy recomputes it from a copy without it
    check = out[IP].chksum
    copy = out[IP].copy()
    del copy.chksum
    assert IP(raw(copy)).chksum == check


def test_pod_to_pod_same_node(fast: DatapathObjects, node: Node) -> None:
    # into the other pod's netns (bpf_redirect_peer), its to-workload work done on the way
    verdict, out, delta = _run(fast, node, "tby_from_wl", _frame(P.OTHER_POD_IP))
    assert verdict == TC_ACT_REDIRECT
    _redirected_to(out, node.mac["wlb"], OTHER_POD_MAC, 63)
    assert delta == {Reason.PASS_WL_OUT: 1, Reason.PASS_WL_IN: 1, Reason.FWD_PEER: 1}
    assert out[TCP].dport == 80 and bytes(out[Raw]) == b"xxxxx"


def test_pod_to_remote_pod_block(fast: DatapathObjects, node: Node) -> None:
    # to the data interface's egress: to-host (IP-in-IP) or the tunnel runs there
    verdict, out, delta = _run(fast, node, "tby_from_wl", _frame(P.REMOTE_POD_IP, ttl=9))
    assert verdict == TC_ACT_REDIRECT
    _redirected_to(out, node.mac["data"], GATEWAY_MAC, 8)
    assert delta == {Reason.PASS_WL_OUT: 1, Reason.FWD_REDIRECT: 1}


def test_from_network_to_local_pod(fast: DatapathObjects, node: Node) -> None:
    frame = _frame(P.OTHER_POD_IP, src=P.REMOTE_POD_IP)
    verdict, out, delta = _run(fast, node, "tby_from_host", frame, dev="data")
    assert verdict == TC_ACT_REDIRECT
    _redirected_to(out, node.mac["wlb"], OTHER_POD_MAC, 63)
    # into the pod: to-workload's work done here (PASS_WL_IN), bpf_redirect_peer
    assert delta == {Reason.PASS_WL_IN: 1, Reason.FWD_PEER: 1}


def test_from_network_not_a_local_pod_is_left_alone(fast: DatapathObjects, node: Node) -> None:
    # the node's own traffic and transit: no FIB lookup, no counter, the stack's
    for dst in (P.NODE_IP, P.REMOTE_POD_IP, P.EXTERNAL_IP):
        frame = _frame(dst, src=P.REMOTE_NODE_IP)
        verdict, out, delta = _run(fast, node, "tby_from_host", frame, dev="data")
        assert (verdict, raw(out), delta) == (TC_ACT_OK, frame, {}), dst


def _frag() -> bytes:
    return raw(P.eth() / IP(src=P.POD_IP, dst=P.OTHER_POD_IP, flags="MF") / UDP() / Raw(b"a" * 64))


FALLBACK = [
    ("first fragment", _frag, Reason.FWD_STACK),
    ("icmp (errors included)", lambda: P.icmp(dst=P.OTHER_POD_IP), Reason.FWD_STACK),
    (
        "ttl 1: the stack sends time exceeded",
        lambda: _frame(P.OTHER_POD_IP, ttl=1),
        Reason.FWD_STACK,
    ),
    (
        "ip options",
        lambda: raw(
            P.eth() / IP(src=P.POD_IP, dst=P.OTHER_POD_IP, options=b"\x01\x01\x01\x00") / TCP()
        ),
        Reason.FWD_STACK,
    ),
    (
        "too big for the egress device (frag needed)",
        lambda: _frame(P.OTHER_POD_IP, size=WLB_MTU),
        Reason.FWD_FIB_MISS,
    ),
    ("neighbour not resolved yet", lambda: _frame("100.96.0.32"), Reason.FWD_FIB_MISS),
    (
        "too big for the route's MTU (IP-in-IP), not the device's",
        lambda: _frame(P.REMOTE_POD_IP, size=ROUTE_MTU - 40 + 1),
        Reason.FWD_FIB_MISS,
    ),
    ("the node's own address", lambda: _frame(P.NODE_IP), Reason.FWD_FIB_MISS),
    ("no route", lambda: _frame(P.EXTERNAL_IP), Reason.FWD_FIB_MISS),
]


@pytest.mark.parametrize(("desc", "packet", "reason"), FALLBACK, ids=[c[0] for c in FALLBACK])
def test_falls_back_to_the_stack(
    fast: DatapathObjects, node: Node, desc: str, packet: object, reason: Reason
) -> None:
    frame = packet()  # type: ignore[operator]
    verdict, out, delta = _run(fast, node, "tby_from_wl", frame)
    assert verdict == TC_ACT_OK, desc
    assert raw(out) == frame  # untouched: MACs and TTL are the stack's to change
    assert delta == {Reason.PASS_WL_OUT: 1, reason: 1}


def test_disabled_leaves_everything_to_the_stack(slow: DatapathObjects, node: Node) -> None:
    frame = _frame(P.OTHER_POD_IP)
    verdict, out, delta = _run(slow, node, "tby_from_wl", frame)
    assert (verdict, raw(out), delta) == (TC_ACT_OK, frame, {Reason.PASS_WL_OUT: 1})
    verdict, out, delta = _run(slow, node, "tby_from_host", _frame(P.OTHER_POD_IP), dev="data")
    assert (verdict, delta) == (TC_ACT_OK, {})


def test_spoofed_source_is_dropped_before_the_fast_path(fast: DatapathObjects, node: Node) -> None:
    verdict, _, delta = _run(fast, node, "tby_from_wl", _frame(P.POD_IP, src=P.OTHER_POD_IP))
    assert (verdict, delta) == (libbpf.TC_ACT_SHOT, {Reason.DROP_SPOOF: 1})


def test_the_route_mtu_is_a_limit_only_when_exceeded(fast: DatapathObjects, node: Node) -> None:
    frame = _frame(P.REMOTE_POD_IP, size=ROUTE_MTU - 40)
    verdict, out, _ = _run(fast, node, "tby_from_wl", frame)
    assert verdict == TC_ACT_REDIRECT and len(out[IP]) == ROUTE_MTU


@pytest.mark.parametrize(("gso_size", "redirected"), [(1000, True), (WLB_MTU - 40 + 1, False)])
def test_a_gso_aggregate_is_judged_by_its_segments(
    fast: DatapathObjects, node: Node, gso_size: int, redirected: bool
) -> None:
    # 3,000 bytes of TCP payload for wlb (MTU 1,400): segments of 1,000 fit, of 1,361 do not
    # (test_run takes a page at most: no 64 KB aggregate here)
    frame = _frame(P.OTHER_POD_IP, size=3000)
    verdict, out, delta = _run(fast, node, "tby_from_wl", frame, gso_size=gso_size)
    if redirected:
        assert verdict == TC_ACT_REDIRECT
        _redirected_to(out, node.mac["wlb"], OTHER_POD_MAC, 63)
        assert delta == {Reason.PASS_WL_OUT: 1, Reason.PASS_WL_IN: 1, Reason.FWD_PEER: 1}
    else:
        assert (verdict, raw(out)) == (TC_ACT_OK, frame)
        assert delta == {Reason.PASS_WL_OUT: 1, Reason.FWD_FIB_MISS: 1}


def _isolate_other_pod(dp: DatapathObjects) -> None:
    """x/server (OTHER_POD_IP, behind wlb) admits TCP 80 from x/client (POD_IP) only."""

    def pod(name: str, ip: str) -> dict[str, Any]:
        return {
            "kind": "Pod",
            "metadata": {"namespace": "x", "name": name, "labels": {"app": name}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
            "status": {"podIP": ip, "phase": "Running"},
        }

    only_client = validate(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"namespace": "x", "name": "server-from-client"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "server"}},
                "ingress": [
                    {
                        "from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                        "ports": [{"port": 80, "protocol": "TCP"}],
                    }
                ],
            },
        }
    )
    objs = [
        pod("server", P.OTHER_POD_IP),
        pod("client", P.POD_IP),
        {"kind": "Namespace", "metadata": {"name": "x"}},
        only_client,
    ]
    res: dict[str, dict[tuple[str, str], Any]] = {}
    for o in objs:
        res.setdefault(o["kind"], {})[
            (o["metadata"].get("namespace", ""), o["metadata"]["name"])
        ] = o
    manager = PolicyManager(PolicyMaps(*(dp.map(s) for s in POLICY_SPECS)))
    assert not manager.apply(calc_policy.compute(res, "n1")).errors


def test_the_destination_pods_ingress_policy_is_judged_before_its_netns(
    fast: DatapathObjects, node: Node
) -> None:
    # tby_to_wl is skipped for a packet put into its pod's netns: fwd_deliver judges it
    _isolate_other_pod(fast)
    syn = raw(
        P.eth() / IP(src=P.POD_IP, dst=P.OTHER_POD_IP) / TCP(sport=40001, dport=80, flags="S")
    )
    verdict, _, delta = _run(fast, node, "tby_from_wl", syn)
    assert verdict == TC_ACT_REDIRECT
    assert delta[Reason.FWD_PEER] == 1 and delta[Reason.POL_NEW] >= 1, delta
    denied = raw(
        P.eth() / IP(src=P.POD_IP, dst=P.OTHER_POD_IP) / TCP(sport=40002, dport=81, flags="S")
    )
    verdict, _, delta = _run(fast, node, "tby_from_wl", denied)
    assert (verdict, delta) == (
        libbpf.TC_ACT_SHOT,
        {Reason.PASS_WL_OUT: 1, Reason.DROP_POL_IN: 1},
    )


@pytest.mark.parametrize(
    ("prog", "src", "dev"),
    [("tby_from_wl", P.POD_IP, "wla"), ("tby_from_host", P.REMOTE_POD_IP, "data")],
)
def test_a_packet_to_a_pod_never_looks_at_the_frontends(
    fast: DatapathObjects, node: Node, prog: str, src: str, dev: str
) -> None:
    """Frontends are service and node addresses, never a pod's: a packet to a pod takes the
    route it needs anyway instead of a lookup in the frontend map, whose buckets are mostly
    cold (from-workload, and from-host for BGP-routed and IP-in-IP pod traffic). A frontend
    written at a pod's own address (no Service can have one) shows which way it went."""
    set_id = 77
    fast.map(BACKENDS_SPEC).update(BackendKey(set_id, 0), BackendValue.make(P.REMOTE_POD_IP, 8080))
    fast.map(FRONTENDS_SPEC).update(
        FrontendKey.make(P.OTHER_POD_IP, 80, "TCP"), FrontendValue(set_id, 1)
    )
    verdict, out, delta = _run(fast, node, prog, _frame(P.OTHER_POD_IP, src=src), dev=dev)
    assert verdict == TC_ACT_REDIRECT and delta.get(Reason.FWD_PEER) == 1
    assert (out[IP].dst, out[TCP].dport) == (P.OTHER_POD_IP, 80), "not translated"
    assert Reason.NAT_NEW not in delta


# what the agent read of wlb's pod (RouteMapManager): its interface's MAC, not the neighbour
# entry's, so the frame shows which one the program used
AGENT_POD_MAC = "02:fc:00:00:00:0b"


def _known_pod(dp: DatapathObjects, node: Node, mtu: int = WLB_MTU) -> None:
    value = WlDevValue.make(AGENT_POD_MAC, node.mac["wlb"], mtu)
    dp.map(WL_DEVS_SPEC).update(ctypes.c_uint32(node.ifindex["wlb"]), value)


@pytest.mark.parametrize(
    ("prog", "src", "dev"),
    [("tby_from_wl", P.POD_IP, "wla"), ("tby_from_host", P.REMOTE_POD_IP, "data")],
)
@pytest.mark.parametrize("dst", [P.OTHER_POD_IP, "100.96.0.32"])  # the second: no neighbour
def test_a_pod_the_agent_described_is_reached_without_the_fib(
    fast: DatapathObjects, node: Node, prog: str, src: str, dev: str, dst: str
) -> None:
    """tby_wl_devs gives the MACs (and MTU) of a local pod's veth: no FIB lookup, so no
    neighbour entry is needed either (the FIB's answer for 100.96.0.32 is NO_NEIGH)."""
    _known_pod(fast, node)
    verdict, out, delta = _run(fast, node, prog, _frame(dst, src=src), dev=dev)
    assert verdict == TC_ACT_REDIRECT
    _redirected_to(out, node.mac["wlb"], AGENT_POD_MAC, 63)
    assert delta[Reason.FWD_PEER] == 1 and Reason.FWD_FIB_MISS not in delta, delta


@pytest.mark.parametrize(
    ("size", "gso_size", "redirected"),
    [
        (WLB_MTU - 40, 0, True),  # exactly the pod's MTU
        (WLB_MTU - 40 + 1, 0, False),
        (3000, 1000, True),  # a GSO aggregate, by its segments
        (3000, WLB_MTU - 40 + 1, False),
    ],
)
def test_over_a_described_pods_mtu_goes_to_the_stack(
    fast: DatapathObjects, node: Node, size: int, gso_size: int, redirected: bool
) -> None:
    """The stack answers a packet over the pod's MTU as ip_forward does (fragmentation needed,
    or fragments); the map's MTU is the limit, as the FIB's device MTU was."""
    _known_pod(fast, node, mtu=WLB_MTU)
    frame = _frame(P.OTHER_POD_IP, size=size)
    verdict, out, delta = _run(fast, node, "tby_from_wl", frame, gso_size=gso_size)
    if redirected:
        assert verdict == TC_ACT_REDIRECT and delta[Reason.FWD_PEER] == 1
        assert out.dst == AGENT_POD_MAC
    else:
        assert (verdict, raw(out)) == (TC_ACT_OK, frame)
        assert delta == {Reason.PASS_WL_OUT: 1, Reason.FWD_STACK: 1}

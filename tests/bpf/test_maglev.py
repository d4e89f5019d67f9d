"""Maglev under BPF_PROG_TEST_RUN: two nodes (two independently loaded datapaths on their own pin
roots, programmed from the same Service by their own NAT managers) send the same flow to the same
backend, the slot the Python mirror of the hash predicts; a flow whose packets reach the second
node mid-connection (an ACK, no SYN) gets the backend the first node gave it; a missing table
falls back to the random choice, counted.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import packets as P
import pytest
from scapy.all import ICMP, IP, TCP
from test_exttun import ext_header, tunnelled
from test_nat import BACKENDS, Node, frame, service, slice_of

from tabby.bpf.libbpf import TC_ACT_OK
from tabby.bpf.maps.conntrack import CtFlags, CtType, TcpFlags
from tabby.bpf.maps.counters import Reason
from tabby.bpf.maps.maglev import MAGLEV_SPEC, flow_hash
from tabby.bpf.maps.nat import BACKENDS_SPEC, FRONTENDS_SPEC, SOURCE_RANGES_SPEC
from tabby.bpf.maps.routes import RouteValue
from tabby.bpf.objects import DatapathConfig, DatapathObjects
from tabby.calc import maglev
from tabby.calc.services import MAGLEV_ANNOTATION, NAT_MAGLEV, service_nat
from tabby.dataplane.maglev import MaglevConfig
from tabby.dataplane.nat import NatManager

pytestmark = pytest.mark.root

TC_ACT_REDIRECT = 7
LB_IP = "198.51.100.7"
M = maglev.table_size()
MORE = (*BACKENDS, "100.96.0.73", "100.96.0.74")  # five remote pods


def lb_service(annotated: bool = True) -> dict[str, object]:
    svc = service(externalIPs=[LB_IP])
    if annotated:
        svc["metadata"]["annotations"] = {MAGLEV_ANNOTATION: "maglev"}  # type: ignore[index]
    return svc


def make_node(stack: ExitStack, bpf_dir: Path, pin_root: str, m: int = M) -> Node:
    config = DatapathConfig.build(
        vni=4242, host_ip=P.NODE_IP, ext_mode="DSR", data_ifindex=1, data_mtu=1500, maglev_m=m
    )
    dp = stack.enter_context(DatapathObjects(pin_root, config, bpf_dir))
    n = Node(dp)
    n.nat = NatManager(
        *(dp.map(s) for s in (FRONTENDS_SPEC, BACKENDS_SPEC, SOURCE_RANGES_SPEC, MAGLEV_SPEC))
    )
    dp.routes().upsert(f"{P.REMOTE_NODE_IP}/32", RouteValue.remote_host(P.REMOTE_NODE_IP))
    return n


@pytest.fixture
def nodes(bpf_dir: Path, pin_root: str) -> Iterator[tuple[Node, Node]]:
    with ExitStack() as stack:
        a = make_node(stack, bpf_dir, pin_root)
        b = make_node(stack, bpf_dir, pin_root + "-b")
        stack.callback(__import__("shutil").rmtree, pin_root + "-b", True)
        for n in (a, b):
            n.program((lb_service(), [slice_of(addrs=MORE)]))
        yield a, b


def backend_of(node: Node, sport: int, flags: str = "S") -> tuple[str, dict[Reason, int]]:
    pkt = frame(P.EXTERNAL_IP, LB_IP, TCP(sport=sport, dport=80, flags=flags))
    verdict, out, delta = node.run("tby_from_host", pkt)
    assert verdict == TC_ACT_REDIRECT, "DSR: into the ext tunnel towards the backend's node"
    return str(ext_header(out)[3][IP].dst), delta


def predicted(sport: int) -> str:
    table = maglev.backend_table([(a, 8080) for a in MORE], M)
    return table[flow_hash(P.EXTERNAL_IP, LB_IP, sport, 80, 6) % M][0]


def test_the_same_flow_gets_the_same_backend_on_two_nodes(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    chosen = {}
    for sport in range(41000, 41060):
        on_a, delta = backend_of(a, sport)
        on_b, _ = backend_of(b, sport)
        assert on_a == on_b == predicted(sport), sport
        assert delta.get(Reason.MAGLEV_PICK) == 1 and delta.get(Reason.NAT_NEW) == 1
        chosen[sport] = on_a
    assert set(chosen.values()) == set(MORE), "the flows spread over every backend"


def test_a_flow_moved_mid_connection_keeps_its_backend(nodes: tuple[Node, Node]) -> None:
    """The SYN entered node A; an ECMP change brings the next packet (an ACK) to node B, which
    has no conntrack entry for it: it starts a pair there with the same backend."""
    a, b = nodes
    for sport in range(42000, 42020):
        first, _ = backend_of(a, sport)
        moved, delta = backend_of(b, sport, flags="A")
        assert moved == first and delta.get(Reason.MAGLEV_PICK) == 1
        fwd = b.ct_entry(P.EXTERNAL_IP, sport, LB_IP, 80)
        assert fwd.tcp & TcpFlags.SYNACK, "picked up established: the long timeout"


def test_without_the_annotation_the_choice_is_random(bpf_dir: Path, pin_root: str) -> None:
    with ExitStack() as stack:
        n = make_node(stack, bpf_dir, pin_root)
        n.program((lb_service(annotated=False), [slice_of(addrs=MORE)]))
        got = set()
        for _ in range(40):  # one source port, new flows each time (closed by RST)
            be, delta = backend_of(n, 43000)
            assert not delta.get(Reason.MAGLEV_PICK) and not delta.get(Reason.MAGLEV_MISS)
            got.add(be)
            backend_of(n, 43000, flags="R")
        assert len(got) > 1, "random: the same tuple lands on several backends"


def test_an_empty_table_falls_back_to_random_counted(nodes: tuple[Node, Node]) -> None:
    a, _ = nodes
    table = a.dp.map(MAGLEV_SPEC)
    keys = list(table.keys())
    assert len(keys) == M, "one table of M slots"
    for k in keys:
        table.delete(k)
    be, delta = backend_of(a, 44000)
    assert be in MORE and delta.get(Reason.MAGLEV_MISS) == 1 and delta.get(Reason.NAT_NEW) == 1
    assert not delta.get(Reason.MAGLEV_PICK)


def test_a_datapath_without_a_table_size_falls_back(bpf_dir: Path, pin_root: str) -> None:
    with ExitStack() as stack:
        n = make_node(stack, bpf_dir, pin_root, m=0)
        n.program((lb_service(), [slice_of(addrs=MORE)]))
        be, delta = backend_of(n, 45000)
        assert be in MORE and delta.get(Reason.MAGLEV_MISS) == 1


def test_removing_a_backend_moves_about_one_nth_of_the_flows(nodes: tuple[Node, Node]) -> None:
    a, _ = nodes
    ports = range(46000, 46100)
    before = {p: backend_of(a, p)[0] for p in ports}
    for p in ports:
        backend_of(a, p, flags="R")  # closed: the next SYN of the port is a new flow
    a.program((lb_service(), [slice_of(addrs=MORE[:-1])]))
    after = {p: backend_of(a, p)[0] for p in ports}
    moved = [p for p in ports if before[p] != after[p]]
    assert {p for p in ports if before[p] == MORE[-1]} <= set(moved)
    assert len(moved) < 2 * len(ports) / len(MORE), len(moved)


# --- a flow moving between a local pair and the ext tunnel (the backend's node) ----------------

F_DSR = 1  # TBY_EXT_F_DSR


@pytest.fixture
def backend_node(bpf_dir: Path, pin_root: str) -> Iterator[Node]:
    """This node holds the only backend (POD_IP); REMOTE_NODE_IP is another ingress node."""
    with ExitStack() as stack:
        n = make_node(stack, bpf_dir, pin_root)
        n.program((lb_service(), [slice_of(addrs=(P.POD_IP,))]))
        yield n


def via_peer(sport: int, flags: str, fe: str = LB_IP) -> bytes:
    inner = IP(src=P.EXTERNAL_IP, dst=P.POD_IP) / TCP(sport=sport, dport=8080, flags=flags)
    return tunnelled(P.REMOTE_NODE_IP, P.NODE_IP, fe, 80, F_DSR, inner)


def test_a_local_flow_arriving_through_another_ingress_node_is_kept(backend_node: Node) -> None:
    n = backend_node
    syn = frame(P.EXTERNAL_IP, LB_IP, TCP(sport=50000, dport=80, flags="S"))
    verdict, out, _ = n.run("tby_from_host", syn)
    assert verdict == TC_ACT_OK and out[IP].dst == P.POD_IP, "the local pair"
    for i in range(2):  # the ECMP router now sends the flow to the peer, which tunnels it here
        verdict, out, delta = n.run("tby_from_host", via_peer(50000, "A"))
        assert verdict == TC_ACT_OK and out[IP].dst == P.POD_IP and TCP in out
        assert delta.get(Reason.EXT_RX) == 1 and delta.get(Reason.DROP_EXT_FLOW) is None
        assert delta.get(Reason.EXT_MOVED) == (1 if i == 0 else None), "counted once"
    rev = n.ct_entry(P.EXTERNAL_IP, 50000, P.POD_IP, 8080)
    assert rev.type == CtType.NAT_REV and rev.flags & CtFlags.MOVED
    reply = frame(P.POD_IP, P.EXTERNAL_IP, TCP(sport=8080, dport=50000, flags="SA"))
    verdict, out, _ = n.run("tby_from_wl", reply)
    assert (out[IP].src, out[TCP].sport) == (LB_IP, 80), "the pod still answers as the LB IP"


def test_a_forwarded_flow_arriving_at_its_backends_node_directly_is_kept(
    backend_node: Node,
) -> None:
    n = backend_node
    verdict, _, _ = n.run("tby_from_host", via_peer(51000, "S"))
    assert verdict == TC_ACT_OK
    assert n.ct_entry(P.EXTERNAL_IP, 51000, P.POD_IP, 8080).type == CtType.EXT
    ack = frame(P.EXTERNAL_IP, LB_IP, TCP(sport=51000, dport=80, flags="A"))
    verdict, out, delta = n.run("tby_from_host", ack)  # the router moved it to this node
    assert verdict == TC_ACT_OK and out[IP].dst == P.POD_IP
    assert delta.get(Reason.EXT_MOVED) == 1 and delta.get(Reason.NAT_NEW) == 1
    assert n.ct_entry(P.EXTERNAL_IP, 51000, P.POD_IP, 8080).type == CtType.NAT_REV


def test_another_frontends_forwarded_flow_is_still_a_collision(backend_node: Node) -> None:
    """The same client port to the same backend through another frontend is the documented
    collision: the new flow is refused (ICMP), the first one keeps its entry."""
    n = backend_node
    verdict, _, _ = n.run("tby_from_host", via_peer(52000, "S", fe="198.51.100.99"))
    assert verdict == TC_ACT_OK
    syn = frame(P.EXTERNAL_IP, LB_IP, TCP(sport=52000, dport=80, flags="S"))
    verdict, out, delta = n.run("tby_from_host", syn)
    assert delta.get(Reason.DROP_CT_FULL) == 1 and delta.get(Reason.EXT_MOVED) is None
    assert ICMP in out and (out[ICMP].type, out[ICMP].code) == (3, 3), "port unreachable"
    assert (out[IP].src, out[IP].dst) == (LB_IP, P.EXTERNAL_IP), f"verdict {verdict}"
    assert n.ct_entry(P.EXTERNAL_IP, 52000, P.POD_IP, 8080).type == CtType.EXT


# --- the NAT manager's tables on real maps --------------------------------------------------------


def _table_in_map(n: Node) -> dict[int, tuple[str, int]]:
    return {
        k.slot: (str(ipaddress.IPv4Address(v.addr)), v.port)
        for k, v in n.dp.map(MAGLEV_SPEC).lookup_batch()
    }


def _desired(*svcs: dict[str, object], addrs: tuple[str, ...] = MORE) -> dict[str, Any]:
    out = {}
    for svc in svcs:
        name = svc["metadata"]["name"]  # type: ignore[index]
        nat = service_nat(svc, [slice_of(name, addrs=addrs)], "node1", P.NODE_IP)
        out[nat.key] = nat
    return out


def test_tables_survive_a_restart_follow_backends_and_go_with_the_annotation(
    bpf_dir: Path, pin_root: str
) -> None:
    with ExitStack() as stack:
        n = make_node(stack, bpf_dir, pin_root)
        maps = [n.dp.map(s) for s in (FRONTENDS_SPEC, BACKENDS_SPEC, SOURCE_RANGES_SPEC)]
        assert not n.nat.apply(_desired(lb_service())).errors
        want = maglev.backend_table([(a, 8080) for a in MORE], M)
        assert _table_in_map(n) == dict(enumerate(want))
        restarted = NatManager(*maps, n.dp.map(MAGLEV_SPEC))  # the agent restarts
        assert restarted.apply(_desired(lb_service())).writes == 0, "adopted as it is"
        result = restarted.apply(_desired(lb_service(), addrs=MORE[:-1]))
        smaller = maglev.backend_table([(a, 8080) for a in MORE[:-1]], M)
        assert _table_in_map(n) == dict(enumerate(smaller))
        changed = sum(1 for a, b in zip(want, smaller, strict=True) if a != b)
        assert result.writes < changed + 10, "only the slots that moved (and the NAT entries)"
        restarted.apply(_desired(lb_service(annotated=False), addrs=MORE[:-1]))
        assert _table_in_map(n) == {}
        flags = {k.describe(): v.flags for k, v in maps[0].lookup_batch()}
        assert not flags[f"{LB_IP}:80/TCP"] & NAT_MAGLEV


def test_over_the_cap_the_later_service_is_refused_with_a_warning(
    bpf_dir: Path, pin_root: str
) -> None:
    with ExitStack() as stack:
        n = make_node(stack, bpf_dir, pin_root)
        cap = MaglevConfig(max_services=1)
        first = lb_service()
        assert n.nat.apply(_desired(first), maglev=cap).warnings == []
        second = service("zweb", externalIPs=["198.51.100.8"])
        second["metadata"]["annotations"] = {MAGLEV_ANNOTATION: "maglev"}  # type: ignore[index]
        second["spec"]["clusterIP"] = "100.64.0.11"  # type: ignore[index]
        result = n.nat.apply(_desired(first, second), maglev=cap)
        assert not result.errors
        assert result.warnings == [
            f"default/zweb: over bpfMaglevMaxServices (1 Maglev tables of {M} slots): its "
            "external traffic picks backends at random"
        ]
        assert len(_table_in_map(n)) == M, "the first service's table, untouched"
        flags = {k.describe(): v.flags for k, v in n.dp.map(FRONTENDS_SPEC).lookup_batch()}
        assert flags[f"{LB_IP}:80/TCP"] & NAT_MAGLEV
        assert not flags["198.51.100.8:80/TCP"] & NAT_MAGLEV
        result = n.nat.apply(
            _desired(second), maglev=cap
        )  # the first goes: the second gets its place
        assert result.warnings == [] and len(_table_in_map(n)) == M
        flags = {k.describe(): v.flags for k, v in n.dp.map(FRONTENDS_SPEC).lookup_batch()}
        assert flags["198.51.100.8:80/TCP"] & NAT_MAGLEV

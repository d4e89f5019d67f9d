"""Service NAT under BPF_PROG_TEST_RUN: Service + EndpointSlice YAML -> calc -> NAT manager ->
maps, then packets through the programs, one packet-life scenario per branch.

test_run injects on loopback (ifindex 1), so "the client pod's veth" is ifindex 1.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import packets as P
import pytest
from scapy.all import ICMP, IP, TCP, UDP, Ether, raw
from scapy.layers.inet import TCPerror, UDPerror

from tabby.bpf.libbpf import TC_ACT_OK, TC_ACT_SHOT
from tabby.bpf.maps.conntrack import CONNTRACK_SPEC, CtKey, CtType
from tabby.bpf.maps.counters import Reason
from tabby.bpf.maps.nat import BACKENDS_SPEC, FRONTENDS_SPEC, SOURCE_RANGES_SPEC, BackendKey
from tabby.bpf.maps.routes import RouteFlags, RouteValue
from tabby.bpf.objects import DatapathObjects
from tabby.calc.services import service_nat
from tabby.dataplane.nat import NatManager

pytestmark = pytest.mark.root

TC_ACT_REDIRECT = 7
VIP = "100.64.0.10"
LB_IP = "198.51.100.7"
NODEPORT = 30080
BACKENDS = ("100.96.0.70", "100.96.0.71", "100.96.0.72")  # remote pods
NODE = "node1"


def service(
    name: str = "web", ports: list[dict[str, Any]] | None = None, **spec: Any
) -> dict[str, Any]:
    body = {"clusterIP": VIP, "ports": ports or [{"port": 80, "targetPort": 8080}], **spec}
    body.setdefault("type", "ClusterIP")
    return {"metadata": {"namespace": "default", "name": name}, "spec": body}


def slice_of(
    name: str = "web", addrs: tuple[str, ...] = BACKENDS, port: int = 8080, **cond: bool
) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "default",
            "name": f"{name}-1",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": [{"port": port, "protocol": "TCP"}, {"port": port, "protocol": "UDP"}],
        "endpoints": [
            {"addresses": [a], "conditions": {"ready": True, **cond}, "nodeName": "node2"}
            for a in addrs
        ],
    }


class Node:
    """One fake node: its datapath, routes, a NAT manager and packet helpers."""

    def __init__(self, dp: DatapathObjects) -> None:
        self.dp = dp
        self.runner = P.Runner(dp)
        routes = dp.routes()
        routes.upsert(f"{P.POD_IP}/32", RouteValue.local_workload(1))
        routes.upsert("100.96.0.64/26", RouteValue.remote_workload(P.REMOTE_NODE_IP))
        routes.upsert(f"{P.NODE_IP}/32", RouteValue.local_host())
        self.nat = NatManager(
            *(dp.map(s) for s in (FRONTENDS_SPEC, BACKENDS_SPEC, SOURCE_RANGES_SPEC))
        )
        self.ct = dp.map(CONNTRACK_SPEC)

    def program(self, *pairs: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
        desired = {}
        for svc, slices in pairs:
            nat = service_nat(svc, slices, NODE, P.NODE_IP)
            desired[nat.key] = nat
        assert not self.nat.apply(desired).errors

    def run(self, prog: str, frame: bytes) -> tuple[int, Ether, dict[Reason, int]]:
        verdict, out, delta = self.runner.run(prog, frame)
        return verdict, Ether(out), delta

    def ct_entry(self, src: str, sport: int, dst: str, dport: int, proto: int = 6) -> Any:
        return self.ct.lookup(CtKey.make(src, sport, dst, dport, proto))


@pytest.fixture
def node(datapath: DatapathObjects) -> Iterator[Node]:
    yield Node(datapath)


def frame(src: str, dst: str, l4: Any, payload: bytes = b"hello") -> bytes:
    return raw(Ether(src=P.POD_MAC, dst=P.HOST_MAC) / IP(src=src, dst=dst) / l4 / payload)


def assert_checksums_valid(pkt: Ether) -> None:
    """Rebuilding the packet with checksums recomputed by scapy gives the same bytes."""
    again = pkt.copy()
    del again[IP].chksum
    for layer in (TCP, UDP, ICMP):
        if layer in again and not (layer is UDP and pkt[UDP].chksum == 0):
            del again[layer].chksum
    assert raw(Ether(raw(again))) == raw(pkt)


def test_clusterip_tcp_flow_forward_established_and_reply(node: Node) -> None:
    node.program((service(), [slice_of()]))
    verdict, out, delta = node.run(
        "tby_from_wl", frame(P.POD_IP, VIP, TCP(sport=40000, dport=80, flags="S"))
    )
    assert verdict == TC_ACT_OK and delta.get(Reason.NAT_NEW) == 1
    backend = out[IP].dst
    assert backend in BACKENDS and out[TCP].dport == 8080
    assert out[IP].src == P.POD_IP and out[TCP].sport == 40000  # pod -> ClusterIP: no SNAT
    assert_checksums_valid(out)
    fwd = node.ct_entry(P.POD_IP, 40000, VIP, 80)
    rev = node.ct_entry(P.POD_IP, 40000, backend, 8080)
    assert fwd.type == CtType.NAT_FWD and rev.type == CtType.NAT_REV

    # the next packet of the flow sticks to the same backend
    verdict, out, delta = node.run(
        "tby_from_wl", frame(P.POD_IP, VIP, TCP(sport=40000, dport=80, flags="A"))
    )
    assert (out[IP].dst, delta.get(Reason.NAT_FWD)) == (backend, 1)

    # the backend's reply, arriving for the client pod, gets the service address back
    reply = frame(backend, P.POD_IP, TCP(sport=8080, dport=40000, flags="SA"))
    verdict, out, delta = node.run("tby_to_wl", reply)
    assert verdict == TC_ACT_OK and delta.get(Reason.NAT_REV) == 1
    assert (out[IP].src, out[TCP].sport, out[IP].dst) == (VIP, 80, P.POD_IP)
    assert_checksums_valid(out)


def test_udp_flow_and_its_fragments(node: Node) -> None:
    node.program(
        (service(ports=[{"port": 53, "targetPort": 8080, "protocol": "UDP"}]), [slice_of()])
    )
    big = IP(src=P.POD_IP, dst=VIP, id=777) / UDP(sport=5353, dport=53) / (b"x" * 3000)
    first, *rest = [Ether(src=P.POD_MAC, dst=P.HOST_MAC) / f for f in big.fragment(1400)]
    verdict, out, delta = node.run("tby_from_wl", raw(first))
    assert verdict == TC_ACT_OK and delta.get(Reason.NAT_NEW) == 1
    backend = out[IP].dst
    for frag in rest:
        verdict, out, delta = node.run("tby_from_wl", raw(frag))
        assert verdict == TC_ACT_OK and delta.get(Reason.NAT_FRAG) == 1
        assert out[IP].dst == backend
        again = out.copy()
        del again[IP].chksum
        assert raw(Ether(raw(again))) == raw(out)


def test_no_endpoints_rejects_with_icmp_port_unreachable(node: Node) -> None:
    node.program((service(), []))
    syn = frame(P.POD_IP, VIP, TCP(sport=40001, dport=80, flags="S"))
    verdict, out, delta = node.run("tby_from_wl", syn)
    assert verdict == TC_ACT_REDIRECT and delta.get(Reason.NAT_REJECT) == 1
    assert (out[IP].src, out[IP].dst) == (VIP, P.POD_IP)
    assert (out[ICMP].type, out[ICMP].code) == (3, 3)
    assert (out.src, out.dst) == (P.HOST_MAC, P.POD_MAC)
    quoted = raw(out[ICMP].payload)
    assert len(quoted) == 40  # the offending IP header and its TCP header
    assert (IP(quoted).src, IP(quoted).dst, int.from_bytes(quoted[22:24], "big")) == (
        P.POD_IP,
        VIP,
        80,
    )
    assert_checksums_valid(out)


def test_local_policy_without_local_endpoint_drops(node: Node) -> None:
    node.program((service(internalTrafficPolicy="Local"), [slice_of()]))  # endpoints on node2
    verdict, _, delta = node.run("tby_from_wl", frame(P.POD_IP, VIP, TCP(sport=1000, dport=80)))
    assert verdict == TC_ACT_SHOT and delta.get(Reason.DROP_NO_LOCAL) == 1


def test_backends_spread_evenly_and_affinity_sticks(node: Node) -> None:
    node.program((service(), [slice_of()]))
    seen = Counter()
    for sport in range(20000, 20600):
        _, out, _ = node.run(
            "tby_from_wl", frame(P.POD_IP, VIP, TCP(sport=sport, dport=80, flags="S"))
        )
        seen[out[IP].dst] += 1
    assert set(seen) == set(BACKENDS)
    assert all(120 <= n <= 280 for n in seen.values()), seen  # 200 expected each

    node.program((service(sessionAffinity="ClientIP"), [slice_of()]))
    picked = set()
    for sport in range(30000, 30030):
        _, out, _ = node.run(
            "tby_from_wl", frame(P.POD_IP, VIP, TCP(sport=sport, dport=80, flags="S"))
        )
        picked.add(out[IP].dst)
    assert len(picked) == 1


def test_nodeport_from_outside_to_a_remote_backend_is_snated_and_replies_return(node: Node) -> None:
    node.program(
        (
            service(
                type="NodePort", ports=[{"port": 80, "targetPort": 8080, "nodePort": NODEPORT}]
            ),
            [slice_of()],
        )
    )
    syn = frame(P.EXTERNAL_IP, P.NODE_IP, TCP(sport=50000, dport=NODEPORT, flags="S"))
    verdict, out, delta = node.run("tby_from_host", syn)
    assert verdict == TC_ACT_OK and delta.get(Reason.NAT_NEW) == 1
    backend, snat_port = out[IP].dst, out[TCP].sport
    assert backend in BACKENDS and out[IP].src == P.NODE_IP
    assert_checksums_valid(out)
    reply = frame(backend, P.NODE_IP, TCP(sport=8080, dport=snat_port, flags="SA"))
    verdict, out, delta = node.run("tby_from_host", reply)
    assert delta.get(Reason.NAT_REV) == 1
    assert (out[IP].src, out[TCP].sport) == (P.NODE_IP, NODEPORT)
    assert (out[IP].dst, out[TCP].dport) == (P.EXTERNAL_IP, 50000)
    assert_checksums_valid(out)


def test_two_clients_same_port_through_snat_get_distinct_ports(node: Node) -> None:
    node.program(
        (
            service(
                type="NodePort", ports=[{"port": 80, "targetPort": 8080, "nodePort": NODEPORT}]
            ),
            [slice_of(addrs=BACKENDS[:1])],
        )
    )
    tuples = set()
    for client in ("203.0.113.7", "203.0.113.8"):
        _, out, _ = node.run(
            "tby_from_host", frame(client, P.NODE_IP, TCP(sport=50000, dport=NODEPORT, flags="S"))
        )
        tuples.add((out[IP].src, out[TCP].sport))
    assert len(tuples) == 2


def test_hairpin_pod_to_itself_through_its_service(node: Node) -> None:
    node.program((service(), [slice_of(addrs=(P.POD_IP,))]))
    verdict, out, _ = node.run(
        "tby_from_wl", frame(P.POD_IP, VIP, TCP(sport=40002, dport=80, flags="S"))
    )
    assert (out[IP].src, out[IP].dst, out[TCP].dport) == ("169.254.1.1", P.POD_IP, 8080)
    reply = frame(P.POD_IP, "169.254.1.1", TCP(sport=8080, dport=40002, flags="SA"))
    verdict, out, delta = node.run("tby_from_wl", reply)
    assert delta.get(Reason.NAT_REV) == 1
    assert (out[IP].src, out[TCP].sport, out[IP].dst, out[TCP].dport) == (VIP, 80, P.POD_IP, 40002)
    assert_checksums_valid(out)


def test_load_balancer_source_ranges(node: Node) -> None:
    lb = service(
        type="LoadBalancer",
        ports=[{"port": 80, "targetPort": 8080, "nodePort": NODEPORT}],
        loadBalancerSourceRanges=["203.0.113.0/28"],
    )
    lb["status"] = {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
    node.program((lb, [slice_of()]))
    verdict, out, _ = node.run(
        "tby_from_host", frame("203.0.113.7", LB_IP, TCP(sport=1, dport=80, flags="S"))
    )
    assert verdict == TC_ACT_OK and out[IP].dst in BACKENDS
    verdict, _, delta = node.run(
        "tby_from_host", frame("203.0.113.99", LB_IP, TCP(sport=1, dport=80, flags="S"))
    )
    assert verdict == TC_ACT_SHOT and delta.get(Reason.DROP_SRC_RANGE) == 1


def test_endpoint_removal_keeps_established_flow_but_new_flows_avoid_it(node: Node) -> None:
    node.program((service(), [slice_of()]))
    _, out, _ = node.run("tby_from_wl", frame(P.POD_IP, VIP, TCP(sport=41000, dport=80, flags="S")))
    first = out[IP].dst
    remaining = tuple(b for b in BACKENDS if b != first)
    node.program((service(), [slice_of(addrs=remaining)]))
    _, out, _ = node.run("tby_from_wl", frame(P.POD_IP, VIP, TCP(sport=41000, dport=80, flags="A")))
    assert out[IP].dst == first  # the open connection drains
    for sport in range(42000, 42050):
        _, out, _ = node.run(
            "tby_from_wl", frame(P.POD_IP, VIP, TCP(sport=sport, dport=80, flags="S"))
        )
        assert out[IP].dst in remaining


def test_serving_terminating_fallback(node: Node) -> None:
    node.program((service(), [slice_of(ready=False, serving=True, terminating=True)]))
    verdict, out, delta = node.run(
        "tby_from_wl", frame(P.POD_IP, VIP, TCP(sport=43000, dport=80, flags="S"))
    )
    assert delta.get(Reason.NAT_NEW) == 1 and out[IP].dst in BACKENDS


def test_non_service_traffic_is_untouched(node: Node) -> None:
    node.program((service(), [slice_of()]))
    data = frame(P.POD_IP, "100.96.0.70", TCP(sport=44000, dport=80, flags="S"))
    verdict, out, delta = node.run("tby_from_wl", data)
    assert verdict == TC_ACT_OK and raw(out) == data and Reason.NAT_NEW not in delta


def test_icmp_error_from_a_backend_is_translated_back(node: Node) -> None:
    node.program(
        (service(ports=[{"port": 53, "targetPort": 8080, "protocol": "UDP"}]), [slice_of()])
    )
    _, out, _ = node.run("tby_from_wl", frame(P.POD_IP, VIP, UDP(sport=5353, dport=53)))
    backend = out[IP].dst
    quote = IP(src=P.POD_IP, dst=backend) / UDP(sport=5353, dport=8080) / b"q"
    error = raw(Ether() / IP(src=backend, dst=P.POD_IP) / ICMP(type=3, code=3) / quote)
    verdict, out, delta = node.run("tby_to_wl", error)
    assert verdict == TC_ACT_OK and delta.get(Reason.NAT_ICMP_ERR) == 1
    inner = out[ICMP].payload
    assert (out[IP].src, out[IP].dst) == (VIP, P.POD_IP)
    assert (inner.src, inner.dst, inner[UDPerror].sport, inner[UDPerror].dport) == (
        P.POD_IP,
        VIP,
        5353,
        53,
    )
    again = out.copy()
    del again[IP].chksum, again[ICMP].chksum, again[ICMP].payload.chksum
    assert raw(Ether(raw(again))) == raw(out)  # outer, ICMP and quoted IP checksums all valid


def test_icmp_error_for_a_snated_nodeport_flow_reaches_the_client(node: Node) -> None:
    node.program(
        (
            service(
                type="NodePort", ports=[{"port": 80, "targetPort": 8080, "nodePort": NODEPORT}]
            ),
            [slice_of(addrs=BACKENDS[:1])],
        )
    )
    syn = frame(P.EXTERNAL_IP, P.NODE_IP, TCP(sport=50001, dport=NODEPORT, flags="S"))
    _, out, _ = node.run("tby_from_host", syn)
    snat_port = out[TCP].sport
    quote = IP(src=P.NODE_IP, dst=BACKENDS[0]) / TCP(sport=snat_port, dport=8080, flags="S")
    error = raw(
        Ether()
        / IP(src="172.20.64.1", dst=P.NODE_IP)
        / ICMP(type=3, code=4, nexthopmtu=1400)
        / quote
    )
    verdict, out, delta = node.run("tby_from_host", error)
    assert delta.get(Reason.NAT_ICMP_ERR) == 1
    inner = out[ICMP].payload
    assert (out[IP].src, out[IP].dst) == ("172.20.64.1", P.EXTERNAL_IP)  # a router's error
    assert (inner.src, inner[TCPerror].sport, inner.dst, inner[TCPerror].dport) == (
        P.EXTERNAL_IP,
        50001,
        P.NODE_IP,
        NODEPORT,
    )


def _syn(sport: int, flags: str = "S") -> bytes:
    return frame(P.POD_IP, VIP, TCP(sport=sport, dport=80, flags=flags))


def test_syn_retransmit_keeps_its_pair_but_a_reused_port_starts_over(node: Node) -> None:
    node.program((service(), [slice_of()]))
    _, out, _ = node.run("tby_from_wl", _syn(45000))
    first = out[IP].dst
    _, out, delta = node.run("tby_from_wl", _syn(45000))  # retransmitted SYN
    assert (out[IP].dst, delta.get(Reason.NAT_FWD)) == (first, 1)
    # the connection closes both ways...
    node.run("tby_from_wl", _syn(45000, "FA"))
    node.run("tby_to_wl", frame(first, P.POD_IP, TCP(sport=8080, dport=45000, flags="FA")))
    # ...and a new connection from the same port is a new flow
    _, _, delta = node.run("tby_from_wl", _syn(45000))
    assert delta.get(Reason.NAT_NEW) == 1


def test_syn_on_a_pair_whose_backend_left_picks_a_live_one(node: Node) -> None:
    node.program((service(), [slice_of()]))
    _, out, _ = node.run("tby_from_wl", _syn(46000, "S"))
    gone = out[IP].dst
    node.run("tby_from_wl", _syn(46000, "A"))
    node.program((service(), [slice_of(addrs=tuple(b for b in BACKENDS if b != gone))]))
    _, out, delta = node.run("tby_from_wl", _syn(46000, "S"))
    assert delta.get(Reason.NAT_NEW) == 1 and out[IP].dst != gone


def test_nodeport_to_the_nodes_own_address_is_not_snated(node: Node) -> None:
    svc = service(type="NodePort", ports=[{"port": 80, "targetPort": 6443, "nodePort": NODEPORT}])
    node.program((svc, [slice_of(addrs=(P.NODE_IP,), port=6443)]))
    syn = frame(P.EXTERNAL_IP, P.NODE_IP, TCP(sport=50002, dport=NODEPORT, flags="S"))
    _, out, _ = node.run("tby_from_host", syn)
    assert (out[IP].src, out[IP].dst, out[TCP].dport) == (P.EXTERNAL_IP, P.NODE_IP, 6443)
    # the node's own reply leaves through the data interface, where to-host translates it
    reply = frame(P.NODE_IP, P.EXTERNAL_IP, TCP(sport=6443, dport=50002, flags="SA"))
    _, out, delta = node.run("tby_to_host", reply)
    assert delta.get(Reason.NAT_REV) == 1 and out[TCP].sport == NODEPORT


def test_direct_connection_reusing_a_closed_service_tuple_is_not_translated(node: Node) -> None:
    node.program((service(), [slice_of(addrs=BACKENDS[:1])]))
    backend = BACKENDS[0]
    node.run("tby_from_wl", _syn(47000))
    node.run("tby_from_wl", _syn(47000, "FA"))
    node.run("tby_to_wl", frame(backend, P.POD_IP, TCP(sport=8080, dport=47000, flags="FA")))
    # the pod now connects to the backend's own address from the same port
    direct = frame(P.POD_IP, backend, TCP(sport=47000, dport=8080, flags="S"))
    _, out, _ = node.run("tby_from_wl", direct)
    assert raw(out) == direct
    reply = frame(backend, P.POD_IP, TCP(sport=8080, dport=47000, flags="SA"))
    _, out, delta = node.run("tby_to_wl", reply)
    assert raw(out) == reply and Reason.NAT_REV not in delta


def _dump(node: Node) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    fe = {bytes(k): bytes(v) for k, v in node.dp.map(FRONTENDS_SPEC).lookup_batch()}
    be = {bytes(k): bytes(v) for k, v in node.dp.map(BACKENDS_SPEC).lookup_batch()}
    return fe, be


def test_a_restarted_manager_adopts_unchanged_sets_and_cleans_the_rest(node: Node) -> None:
    web, gone = service(), service("gone", ports=[{"port": 81, "targetPort": 8080}])
    gone["spec"]["clusterIP"] = "100.64.0.99"
    node.program((web, [slice_of()]), (gone, [slice_of("gone", addrs=BACKENDS[:1])]))
    before_fe, before_be = _dump(node)
    _, out, _ = node.run("tby_from_wl", _syn(48000))  # a flow open across the restart

    # "the agent restarted": a new manager on the same pins, one service fewer
    node.nat = NatManager(
        *(node.dp.map(s) for s in (FRONTENDS_SPEC, BACKENDS_SPEC, SOURCE_RANGES_SPEC))
    )
    result = node.nat.apply({"default/web": service_nat(web, [slice_of()], NODE, P.NODE_IP)})
    assert not result.errors
    after_fe, after_be = _dump(node)
    web_fe = {k: v for k, v in before_fe.items() if k in after_fe}
    assert after_fe == web_fe and len(after_fe) == 1  # web kept as it was, gone deleted
    assert after_be == {k: v for k, v in before_be.items() if k in after_be}
    assert len(after_be) == len(BACKENDS)
    assert result.writes == 2  # gone's frontend and backend deleted: nothing of web rewritten
    _, again, delta = node.run("tby_from_wl", _syn(48000, "A"))
    assert again[IP].dst == out[IP].dst and delta.get(Reason.NAT_FWD) == 1


def test_a_restarted_manager_rewrites_an_adopted_set_with_a_hole(node: Node) -> None:
    """A pinned set missing an ordinal (not a state tabby leaves) is not trusted: the restart
    writes the service's set again under a new id and deletes every backend of the old one."""
    web = service()
    node.program((web, [slice_of()]))
    fe_map, be_map = node.dp.map(FRONTENDS_SPEC), node.dp.map(BACKENDS_SPEC)
    (old_key, old_fe), *_ = fe_map.lookup_batch()
    assert old_fe.count == len(BACKENDS)
    be_map.delete(BackendKey(id=old_fe.id, ordinal=1))  # the hole

    node.nat = NatManager(
        *(node.dp.map(s) for s in (FRONTENDS_SPEC, BACKENDS_SPEC, SOURCE_RANGES_SPEC))
    )
    result = node.nat.apply({"default/web": service_nat(web, [slice_of()], NODE, P.NODE_IP)})
    assert not result.errors
    fe = fe_map.lookup(old_key)
    assert fe is not None and fe.id != old_fe.id and fe.count == len(BACKENDS)
    got = {be.describe() for _, be in be_map.lookup_batch()}
    assert got == {f"{b}:8080" for b in BACKENDS}  # the new set, whole; the old one gone
    assert {k.id for k, _ in be_map.lookup_batch()} == {fe.id}


def test_nat_outgoing_masquerades_pods_leaving_the_cluster_only(node: Node) -> None:
    routes = node.dp.routes()
    routes.upsert(f"{P.POD_IP}/32", RouteValue.make(RouteFlags.LOCAL_WL | RouteFlags.NAT_OUT, 1))
    out_of_cluster = frame(P.POD_IP, P.EXTERNAL_IP, TCP(sport=49000, dport=443, flags="S"))
    _, out, delta = node.run("tby_to_host", out_of_cluster)
    assert delta.get(Reason.NAT_MASQ) == 1
    assert (out[IP].src, out[IP].dst, out[TCP].dport) == (P.NODE_IP, P.EXTERNAL_IP, 443)
    assert_checksums_valid(out)
    reply = frame(P.EXTERNAL_IP, P.NODE_IP, TCP(sport=443, dport=out[TCP].sport, flags="SA"))
    _, back, delta = node.run("tby_from_host", reply)
    assert delta.get(Reason.NAT_REV) == 1
    assert (back[IP].src, back[IP].dst, back[TCP].dport) == (P.EXTERNAL_IP, P.POD_IP, 49000)
    # inside the pools (a remote pod's block): no SNAT
    to_pod = frame(P.POD_IP, BACKENDS[0], TCP(sport=49001, dport=80, flags="S"))
    _, out, delta = node.run("tby_to_host", to_pod)
    assert raw(out) == to_pod and Reason.NAT_MASQ not in delta
    # a pod of a pool without natOutgoing: no SNAT either
    routes.upsert(f"{P.POD_IP}/32", RouteValue.local_workload(1))
    plain = frame(P.POD_IP, P.EXTERNAL_IP, TCP(sport=49002, dport=443, flags="S"))
    _, out, delta = node.run("tby_to_host", plain)
    assert raw(out) == plain and Reason.NAT_MASQ not in delta


def test_a_client_port_reused_for_another_frontend_on_the_same_backend(node: Node) -> None:
    """Port 48500 talked to backend B through one service and closed; reused through another
    service that lands on B too, the translated tuple is the same: the closed pair gives way.
    While the first flow is still open, the second is refused (the documented collision)."""
    other = service("other", ports=[{"port": 81, "targetPort": 8080}])
    other["spec"]["clusterIP"] = "100.64.0.98"
    one = (BACKENDS[0],)
    node.program((service(), [slice_of(addrs=one)]), (other, [slice_of("other", addrs=one)]))
    node.run("tby_from_wl", _syn(48500))
    second = frame(P.POD_IP, "100.64.0.98", TCP(sport=48500, dport=81, flags="S"))
    verdict, _, delta = node.run("tby_from_wl", second)
    assert verdict == TC_ACT_REDIRECT and delta.get(Reason.DROP_CT_FULL) == 1  # still open
    node.run("tby_from_wl", _syn(48500, "FA"))
    node.run("tby_to_wl", frame(BACKENDS[0], P.POD_IP, TCP(sport=8080, dport=48500, flags="FA")))
    verdict, out, delta = node.run("tby_from_wl", second)
    assert verdict == TC_ACT_OK and delta.get(Reason.NAT_NEW) == 1 and out[IP].dst == BACKENDS[0]
    assert node.ct_entry(P.POD_IP, 48500, VIP, 80) is None  # the closed pair's FWD went with it

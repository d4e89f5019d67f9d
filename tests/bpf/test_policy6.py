"""NetworkPolicy over IPv6 under BPF_PROG_TEST_RUN: NetworkPolicy YAML with dual-stack pods ->
calc.policy -> PolicyManager -> tby_pol_ep6 / tby_pol_peer6 / tby_pol_port, then crafted IPv6
packets through tby_from_wl (egress) and tby_to_wl (ingress); verdicts cached in tby_pol_ct6.

test_run injects on loopback (ifindex 1): the local pods' IPv6 addresses are on ifindex 1 in
tby_wl6 so that from-workload's anti-spoofing lets them send.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import packets as P
import pytest
from policy_objs import SERVER_FROM_CLIENT_8080, netpol, pod, rules, syn
from scapy.all import (
    TCP,
    UDP,
    Ether,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RS,
    IPv6,
    raw,
)
from scapy.layers.inet6 import ICMPv6PacketTooBig

from tabby.bpf.libbpf import TC_ACT_OK, TC_ACT_SHOT
from tabby.bpf.maps.conntrack import Ct6Key
from tabby.bpf.maps.counters import Reason
from tabby.bpf.maps.policy import POL_CT6_SPEC, SPECS, PolicyMaps
from tabby.bpf.maps.workloads6 import WORKLOADS6_SPEC, Workload6Key, Workload6Value
from tabby.bpf.objects import DatapathObjects
from tabby.dataplane.policy import PolicyManager

pytestmark = pytest.mark.root

SERVER4, SERVER = "100.96.0.5", "fd00:96::5"  # x/server, local
CLIENT4, CLIENT = "100.96.0.9", "fd00:96::9"  # x/client, local
REMOTE4, REMOTE = "100.96.0.70", "fd00:96::46"  # y/remote, another node
ONLY6 = "fd00:96::20"  # x/only6, local, IPv6-only
OUTSIDER = "2001:db8::7"  # no pod
ROUTER = "fd00:20:1::1"


class Node:
    def __init__(self, dp: DatapathObjects) -> None:
        self.runner = P.Runner(dp)
        wl6 = dp.map(WORKLOADS6_SPEC)
        for ip in (SERVER, CLIENT):
            wl6.update(Workload6Key.make(ip), Workload6Value(ifindex=1))
        self.maps = PolicyMaps(*(dp.map(s) for s in SPECS))
        self.manager = PolicyManager(self.maps)
        self.ct6 = dp.map(POL_CT6_SPEC)

    def program(self, *policies: dict[str, Any]) -> None:
        pods = [
            pod("x", "server", "n1", {"app": "server"}, SERVER4, SERVER),
            pod("x", "client", "n1", {"app": "client"}, CLIENT4, CLIENT),
            pod("y", "remote", "n2", {"app": "remote"}, REMOTE4, REMOTE),
            pod("x", "only6", "n1", {"app": "only6"}, "", ONLY6),
        ]
        result = self.manager.apply(rules(pods, policies))
        assert not result.errors

    def run(self, prog: str, frame: bytes) -> tuple[int, dict[Reason, int]]:
        verdict, _, delta = self.runner.run(prog, frame)
        return verdict, delta

    def flow(self, src: str, sport: int, dst: str, dport: int, proto: int = 6) -> Any:
        key = Ct6Key(sport=sport, dport=dport, proto=proto)
        key.src[:] = ipaddress.IPv6Address(src).packed
        key.dst[:] = ipaddress.IPv6Address(dst).packed
        return self.ct6.lookup(key)


@pytest.fixture
def node(datapath: DatapathObjects) -> Iterator[Node]:
    yield Node(datapath)


def frame(src: str, dst: str, l4: Any) -> bytes:
    return raw(Ether(src=P.POD_MAC, dst=P.HOST_MAC) / IPv6(src=src, dst=dst) / l4 / b"hi")


def test_unselected_pods_pass_without_state(node: Node) -> None:
    node.program()
    verdict, delta = node.run("tby_to_wl", frame(REMOTE, SERVER, syn(40000, 81)))
    assert verdict == TC_ACT_OK and Reason.POL6_NEW not in delta
    assert node.flow(REMOTE, 40000, SERVER, 81) is None


@pytest.mark.parametrize(
    ("desc", "src", "l4", "verdict", "reason"),
    [
        ("allowed peer and port", CLIENT, syn(40001, 8080), TC_ACT_OK, Reason.POL6_NEW),
        ("allowed peer, other port", CLIENT, syn(40002, 8081), TC_ACT_SHOT, Reason.DROP_POL6_IN),
        ("allowed peer, UDP", CLIENT, UDP(sport=1, dport=8080), TC_ACT_SHOT, Reason.DROP_POL6_IN),
        ("other pod", REMOTE, syn(40004, 8080), TC_ACT_SHOT, Reason.DROP_POL6_IN),
        ("no pod", OUTSIDER, syn(40005, 8080), TC_ACT_SHOT, Reason.DROP_POL6_IN),
        (
            "ICMPv6 echo (no port rule)",
            CLIENT,
            ICMPv6EchoRequest(),
            TC_ACT_SHOT,
            Reason.DROP_POL6_IN,
        ),
        ("neighbor solicitation", "fe80::1", ICMPv6ND_NS(tgt=SERVER), TC_ACT_OK, Reason.PASS_ND),
        ("neighbor advertisement", ROUTER, ICMPv6ND_NA(tgt=ROUTER), TC_ACT_OK, Reason.PASS_ND),
    ],
)
def test_ingress_decisions(
    node: Node, desc: str, src: str, l4: Any, verdict: int, reason: Reason
) -> None:
    node.program(SERVER_FROM_CLIENT_8080)
    got, delta = node.run("tby_to_wl", frame(src, SERVER, l4))
    assert (got, delta.get(reason)) == (verdict, 1), desc


def test_the_ipv4_side_of_the_same_policy_is_unchanged(node: Node) -> None:
    node.program(SERVER_FROM_CLIENT_8080)
    v4 = raw(Ether(src=P.POD_MAC, dst=P.HOST_MAC) / P.IP(src=REMOTE4, dst=SERVER4) / syn(1, 8080))
    verdict, delta = node.run("tby_to_wl", v4)
    assert (verdict, delta.get(Reason.DROP_POL_IN)) == (TC_ACT_SHOT, 1)
    v4 = raw(Ether(src=P.POD_MAC, dst=P.HOST_MAC) / P.IP(src=CLIENT4, dst=SERVER4) / syn(1, 8080))
    assert node.run("tby_to_wl", v4)[0] == TC_ACT_OK


def test_verdict_cached_and_syn_rejudged_after_a_policy_change(node: Node) -> None:
    node.program(SERVER_FROM_CLIENT_8080)
    assert node.run("tby_to_wl", frame(CLIENT, SERVER, syn(40000, 8080)))[0] == TC_ACT_OK
    assert node.flow(CLIENT, 40000, SERVER, 8080).pol == 2  # TBY_CTP_IN
    node.program(netpol("deny", podSelector={}))  # the allowing policy is gone
    ack = frame(CLIENT, SERVER, TCP(sport=40000, dport=8080, flags="A"))
    verdict, delta = node.run("tby_to_wl", ack)
    assert verdict == TC_ACT_OK and not delta.get(Reason.POL6_NEW)  # established: kept
    verdict, delta = node.run("tby_to_wl", frame(CLIENT, SERVER, syn(40000, 8080)))
    assert (verdict, delta.get(Reason.DROP_POL6_IN)) == (TC_ACT_SHOT, 1)  # a new connection
    assert node.run("tby_to_wl", ack)[0] == TC_ACT_SHOT  # and its verdict is gone


def test_reply_passes_where_the_reverse_direction_is_denied(node: Node) -> None:
    deny_out = netpol(
        "deny-out", podSelector={"matchLabels": {"app": "server"}}, policyTypes=["Egress"]
    )
    node.program(SERVER_FROM_CLIENT_8080, deny_out)
    assert node.run("tby_to_wl", frame(CLIENT, SERVER, syn(40000, 8080)))[0] == TC_ACT_OK
    reply = frame(SERVER, CLIENT, TCP(sport=8080, dport=40000, flags="SA"))
    verdict, delta = node.run("tby_from_wl", reply)
    assert verdict == TC_ACT_OK and not delta.get(Reason.DROP_POL6_OUT)
    verdict, delta = node.run("tby_from_wl", frame(SERVER, CLIENT, syn(8080, 40001)))
    assert (verdict, delta.get(Reason.DROP_POL6_OUT)) == (TC_ACT_SHOT, 1)
    # router solicitation to the gateway still leaves: the pod keeps its default route
    verdict, delta = node.run("tby_from_wl", frame(SERVER, "ff02::2", ICMPv6ND_RS()))
    assert (verdict, delta.get(Reason.PASS_ND)) == (TC_ACT_OK, 1)


def test_egress_ip_block_128_and_udp_flow_state(node: Node) -> None:
    egress = netpol(
        "client-out",
        podSelector={"matchLabels": {"app": "client"}},
        policyTypes=["Egress"],
        egress=[
            {
                "to": [{"ipBlock": {"cidr": f"{OUTSIDER}/128"}}],
                "ports": [{"protocol": "UDP", "port": 53}],
            },
            {
                "to": [{"ipBlock": {"cidr": "fd00:96::/64", "except": [f"{REMOTE}/128"]}}],
                "ports": [{"protocol": "TCP", "port": 8000, "endPort": 8100}],
            },
        ],
    )
    node.program(egress)
    verdict, delta = node.run("tby_from_wl", frame(CLIENT, OUTSIDER, UDP(sport=5353, dport=53)))
    assert (verdict, delta.get(Reason.POL6_NEW)) == (TC_ACT_OK, 1)
    assert (
        node.run("tby_from_wl", frame(CLIENT, "2001:db8::8", UDP(sport=5353, dport=53)))[0]
        == TC_ACT_SHOT
    )
    assert (
        node.run("tby_from_wl", frame(CLIENT, OUTSIDER, UDP(sport=5353, dport=54)))[0]
        == TC_ACT_SHOT
    )
    assert node.run("tby_from_wl", frame(CLIENT, SERVER, syn(1, 8099)))[0] == TC_ACT_OK
    assert node.run("tby_from_wl", frame(CLIENT, SERVER, syn(1, 8101)))[0] == TC_ACT_SHOT
    verdict, delta = node.run("tby_from_wl", frame(CLIENT, REMOTE, syn(1, 8080)))
    assert (verdict, delta.get(Reason.DROP_POL6_OUT)) == (TC_ACT_SHOT, 1), "except /128"
    # the DNS reply comes back: the client's ingress is not isolated; its from-wl egress flow
    # entry is what a second datagram of the same socket meets (no new lookup)
    verdict, delta = node.run("tby_from_wl", frame(CLIENT, OUTSIDER, UDP(sport=5353, dport=53)))
    assert verdict == TC_ACT_OK and not delta.get(Reason.POL6_NEW)


def test_icmpv6_packet_too_big_about_an_admitted_flow_passes(node: Node) -> None:
    node.program(
        SERVER_FROM_CLIENT_8080, netpol("deny-out", podSelector={}, policyTypes=["Egress"])
    )
    assert node.run("tby_to_wl", frame(CLIENT, SERVER, syn(40000, 8080)))[0] == TC_ACT_OK
    # the server's reply was too big for a router on the way: the error comes to the server
    quoted = IPv6(src=SERVER, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="A")
    ptb = frame(ROUTER, SERVER, ICMPv6PacketTooBig(mtu=1280) / raw(quoted))
    assert node.run("tby_to_wl", ptb)[0] == TC_ACT_OK
    other = IPv6(src=SERVER, dst=CLIENT) / TCP(sport=8080, dport=40999, flags="A")
    ptb = frame(ROUTER, SERVER, ICMPv6PacketTooBig(mtu=1280) / raw(other))
    assert node.run("tby_to_wl", ptb)[0] == TC_ACT_SHOT, "about no admitted flow"


def test_ipv6_endpoint_follows_the_ipv4_one_through_change_restart_and_removal(node: Node) -> None:
    node.program(SERVER_FROM_CLIENT_8080)
    first = node.maps.endpoint(SERVER)
    assert first is not None and first.set == node.maps.endpoint(SERVER4).set
    # an agent restart adopts the pinned entries: both addresses are rewritten under a new set
    node.manager = PolicyManager(node.maps)
    node.program(SERVER_FROM_CLIENT_8080)
    again = node.maps.endpoint(SERVER)
    assert again is not None and again.set == node.maps.endpoint(SERVER4).set != first.set
    assert {k.set // 2 for k in node.maps.peer_keys()} == {again.set}, "old set swept"
    assert node.run("tby_to_wl", frame(CLIENT, SERVER, syn(40010, 8080)))[0] == TC_ACT_OK
    node.program()  # no policy any more: not isolated, no entry either family
    assert node.maps.endpoint(SERVER) is None and node.maps.endpoint(SERVER4) is None
    assert node.maps.peer_keys() == []
    assert node.run("tby_to_wl", frame(REMOTE, SERVER, syn(40011, 81)))[0] == TC_ACT_OK


def test_an_ipv6_only_pod_is_its_own_endpoint_and_survives_a_restart(node: Node) -> None:
    deny = netpol("deny", podSelector={"matchLabels": {"app": "only6"}})
    node.program(deny)
    assert node.maps.endpoint(ONLY6) is not None
    node.manager = PolicyManager(node.maps)  # agent restart: adopted, rewritten, swept
    node.program(deny)
    assert node.maps.endpoint(ONLY6) is not None, "kept: still desired"
    verdict, delta = node.run("tby_to_wl", frame(CLIENT, ONLY6, syn(40020, 8080)))
    assert (verdict, delta.get(Reason.DROP_POL6_IN)) == (TC_ACT_SHOT, 1)
    node.program()
    assert node.maps.endpoint(ONLY6) is None


def test_an_ipv6_nodeport_to_an_isolated_pod_is_judged_on_the_translated_tuple(
    node: Node, datapath: DatapathObjects
) -> None:
    """from-host DNATs (and, no route here, SNATs to the node) -> to-workload judges the pod's
    ingress on node -> pod; the pod's reply passes its egress deny (a reply of that flow) before
    nat6 translates it back to nodePort -> client: the order keeps tby_ct6 working."""
    from test_nat6 import CLIENT6, NODE_IP6, NODEPORT, service

    from tabby.bpf.maps.nat import BACKENDS6_SPEC, FRONTENDS6_SPEC
    from tabby.calc.services import service_nat
    from tabby.dataplane.nat import NatManager

    nat6 = NatManager(datapath.map(FRONTENDS6_SPEC), datapath.map(BACKENDS6_SPEC), None, family=6)
    svc, slices = service((SERVER,))
    nat = service_nat(svc, slices, "node1", P.NODE_IP, NODE_IP6)
    assert nat.ipv6 is not None and not nat6.apply({nat.key: nat.ipv6}).errors
    from_node = netpol(
        "server-from-node",
        podSelector={"matchLabels": {"app": "server"}},
        policyTypes=["Ingress", "Egress"],
        ingress=[{"from": [{"ipBlock": {"cidr": f"{NODE_IP6}/128"}}]}],
    )
    node.program(from_node)
    first = frame(CLIENT6, NODE_IP6, TCP(sport=50000, dport=NODEPORT, flags="S"))
    verdict, out, delta = node.runner.run("tby_from_host", first)
    assert verdict == TC_ACT_OK and delta.get(Reason.NAT6_NEW) == 1
    dnat = Ether(out)
    assert (dnat[IPv6].src, dnat[IPv6].dst) == (NODE_IP6, SERVER)
    verdict, delta = node.run("tby_to_wl", out)
    assert (verdict, delta.get(Reason.POL6_NEW)) == (TC_ACT_OK, 1), "the node's /128 admits"
    reply = frame(SERVER, NODE_IP6, TCP(sport=8080, dport=50000, flags="SA"))
    verdict, back, delta = node.runner.run("tby_from_wl", reply)
    assert verdict == TC_ACT_OK and delta.get(Reason.NAT6) == 1, "egress deny: a reply passes"
    back_pkt = Ether(back)
    assert (back_pkt[IPv6].src, back_pkt[TCP].sport) == (NODE_IP6, NODEPORT)
    assert (back_pkt[IPv6].dst, back_pkt[TCP].dport) == (CLIENT6, 50000)
    # the server opening a flow of its own to the client is still its egress's to judge
    verdict, delta = node.run("tby_from_wl", frame(SERVER, CLIENT6, syn(8080, 50001)))
    assert (verdict, delta.get(Reason.DROP_POL6_OUT)) == (TC_ACT_SHOT, 1)


def test_an_idle_cached_flow_expires_by_the_conntrack_timeouts(node: Node) -> None:
    allow_udp = netpol(
        "server-udp",
        podSelector={"matchLabels": {"app": "server"}},
        ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}],
    )
    node.program(allow_udp)
    dgram = frame(CLIENT, SERVER, UDP(sport=5000, dport=53))
    assert node.run("tby_to_wl", dgram)[0] == TC_ACT_OK
    node.program(netpol("deny", podSelector={}))
    assert node.run("tby_to_wl", dgram)[0] == TC_ACT_OK, "cached: the flow keeps going"
    key = Ct6Key(sport=5000, dport=53, proto=17)
    key.src[:] = ipaddress.IPv6Address(CLIENT).packed
    key.dst[:] = ipaddress.IPv6Address(SERVER).packed
    entry = node.ct6.lookup(key)
    entry.seen_ns = 0  # idle for longer than UDP's 60 s
    node.ct6.update(key, entry)
    verdict, delta = node.run("tby_to_wl", dgram)
    assert (verdict, delta.get(Reason.DROP_POL6_IN)) == (TC_ACT_SHOT, 1), "judged again"

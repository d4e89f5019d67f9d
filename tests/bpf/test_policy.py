"""NetworkPolicy under BPF_PROG_TEST_RUN: NetworkPolicy YAML -> calc.policy -> PolicyManager ->
maps, then crafted packets through tby_from_wl (egress, after NAT) and tby_to_wl (ingress).

test_run injects on loopback (ifindex 1), so every local pod's veth is ifindex 1 here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import packets as P
import pytest
from policy_objs import SERVER_FROM_CLIENT_8080, netpol, pod, rules, syn
from scapy.all import ICMP, IP, TCP, UDP, Ether, raw

from tabby.bpf.libbpf import TC_ACT_OK, TC_ACT_SHOT
from tabby.bpf.maps.conntrack import CONNTRACK_SPEC, CtKey, CtType, PolVerdict
from tabby.bpf.maps.counters import Reason
from tabby.bpf.maps.nat import BACKENDS_SPEC, FRONTENDS_SPEC, SOURCE_RANGES_SPEC
from tabby.bpf.maps.policy import PolicyMaps
from tabby.bpf.maps.routes import RouteValue
from tabby.bpf.objects import DatapathObjects
from tabby.calc.services import service_nat
from tabby.dataplane.nat import NatManager
from tabby.dataplane.policy import PolicyManager

pytestmark = pytest.mark.root

SERVER = P.POD_IP  # x/server, local
CLIENT = P.OTHER_POD_IP  # x/client, local
REMOTE = P.REMOTE_POD_IP  # y/remote, another node
VIP = "100.64.0.10"


class Node:
    def __init__(self, dp: DatapathObjects) -> None:
        self.runner = P.Runner(dp)
        routes = dp.routes()
        for ip in (SERVER, CLIENT):
            routes.upsert(f"{ip}/32", RouteValue.local_workload(1))
        routes.upsert("100.96.0.64/26", RouteValue.remote_workload(P.REMOTE_NODE_IP))
        routes.upsert(f"{P.NODE_IP}/32", RouteValue.local_host())
        self.maps = PolicyMaps(*(dp.map(s) for s in _policy_specs()))
        self.manager = PolicyManager(self.maps)
        self.nat = NatManager(
            *(dp.map(s) for s in (FRONTENDS_SPEC, BACKENDS_SPEC, SOURCE_RANGES_SPEC))
        )
        self.ct = dp.map(CONNTRACK_SPEC)

    def program(self, *policies: dict[str, Any]) -> None:
        pods = [
            pod("x", "server", "n1", {"app": "server"}, SERVER),
            pod("x", "client", "n1", {"app": "client"}, CLIENT),
            pod("y", "remote", "n2", {"app": "remote"}, REMOTE),
        ]
        result = self.manager.apply(rules(pods, policies))
        assert not result.errors

    def run(self, prog: str, frame: bytes) -> tuple[int, Ether, dict[Reason, int]]:
        verdict, out, delta = self.runner.run(prog, frame)
        return verdict, Ether(out), delta

    def ct_entry(self, src: str, sport: int, dst: str, dport: int, proto: int = 6) -> Any:
        return self.ct.lookup(CtKey.make(src, sport, dst, dport, proto))


def _policy_specs() -> tuple[Any, ...]:
    from tabby.bpf.maps.policy import SPECS

    return SPECS


@pytest.fixture
def node(datapath: DatapathObjects) -> Iterator[Node]:
    yield Node(datapath)


def frame(src: str, dst: str, l4: Any) -> bytes:
    return raw(Ether(src=P.POD_MAC, dst=P.HOST_MAC) / IP(src=src, dst=dst) / l4 / b"hi")


def test_unselected_pods_pass_without_state(node: Node) -> None:
    node.program()
    verdict, _, delta = node.run("tby_to_wl", frame(REMOTE, SERVER, syn(40000, 81)))
    assert verdict == TC_ACT_OK and Reason.POL_NEW not in delta
    assert node.ct_entry(REMOTE, 40000, SERVER, 81) is None


@pytest.mark.parametrize(
    ("desc", "src", "l4", "verdict", "reason"),
    [
        ("allowed peer and port", CLIENT, syn(40001, 8080), TC_ACT_OK, Reason.POL_NEW),
        ("allowed peer, other port", CLIENT, syn(40002, 8081), TC_ACT_SHOT, Reason.DROP_POL_IN),
        (
            "allowed peer, UDP",
            CLIENT,
            UDP(sport=40003, dport=8080),
            TC_ACT_SHOT,
            Reason.DROP_POL_IN,
        ),
        ("other pod", REMOTE, syn(40004, 8080), TC_ACT_SHOT, Reason.DROP_POL_IN),
        ("ICMP (no port rule)", CLIENT, ICMP(), TC_ACT_SHOT, Reason.DROP_POL_IN),
        ("this node (kubelet)", P.NODE_IP, syn(40005, 9999), TC_ACT_OK, Reason.POL_NEW),
    ],
)
def test_ingress_decisions(
    node: Node, desc: str, src: str, l4: Any, verdict: int, reason: Reason
) -> None:
    node.program(SERVER_FROM_CLIENT_8080)
    got, _, delta = node.run("tby_to_wl", frame(src, SERVER, l4))
    assert (got, delta.get(reason)) == (verdict, 1), desc


def test_verdict_cached_on_conntrack_and_syn_rejudged(node: Node) -> None:
    node.program(SERVER_FROM_CLIENT_8080)
    assert node.run("tby_to_wl", frame(CLIENT, SERVER, syn(40000, 8080)))[0] == TC_ACT_OK
    entry = node.ct_entry(CLIENT, 40000, SERVER, 8080)
    assert entry.type == CtType.PLAIN and entry.pol == PolVerdict.IN
    node.program(netpol("deny", podSelector={}))  # the allowing policy is gone
    ack = frame(CLIENT, SERVER, TCP(sport=40000, dport=8080, flags="A"))
    verdict, _, delta = node.run("tby_to_wl", ack)
    assert verdict == TC_ACT_OK and not delta.get(Reason.POL_NEW)  # established: no lookup
    verdict, _, delta = node.run("tby_to_wl", frame(CLIENT, SERVER, syn(40000, 8080)))
    assert (verdict, delta.get(Reason.DROP_POL_IN)) == (TC_ACT_SHOT, 1)  # a new connection
    assert node.run("tby_to_wl", ack)[0] == TC_ACT_SHOT  # and its verdict is gone


def test_reply_passes_where_the_reverse_direction_is_denied(node: Node) -> None:
    deny_out = netpol(
        "deny-out", podSelector={"matchLabels": {"app": "server"}}, policyTypes=["Egress"]
    )
    node.program(SERVER_FROM_CLIENT_8080, deny_out)
    assert node.run("tby_to_wl", frame(CLIENT, SERVER, syn(40000, 8080)))[0] == TC_ACT_OK
    reply = frame(SERVER, CLIENT, TCP(sport=8080, dport=40000, flags="SA"))
    verdict, _, delta = node.run("tby_from_wl", reply)
    assert verdict == TC_ACT_OK and not delta.get(Reason.DROP_POL_OUT)
    verdict, _, delta = node.run("tby_from_wl", frame(SERVER, CLIENT, syn(8080, 40001)))
    assert (verdict, delta.get(Reason.DROP_POL_OUT)) == (TC_ACT_SHOT, 1)
    # the client's own side: its reply path (to_wl) is not isolated at all
    assert node.run("tby_to_wl", reply)[0] == TC_ACT_OK


def test_egress_judged_after_service_nat(node: Node) -> None:
    svc = {
        "metadata": {"namespace": "y", "name": "remote"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": VIP,
            "ports": [{"port": 80, "targetPort": 8080}],
        },
    }
    eps = {
        "metadata": {
            "namespace": "y",
            "name": "remote-1",
            "labels": {"kubernetes.io/service-name": "remote"},
        },
        "addressType": "IPv4",
        "ports": [{"port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [REMOTE], "conditions": {"ready": True}, "nodeName": "n2"}],
    }
    nat = service_nat(svc, [eps], "n1", P.NODE_IP)
    assert not node.nat.apply({nat.key: nat}).errors
    to_remote = netpol(
        "client-to-remote",
        podSelector={"matchLabels": {"app": "client"}},
        policyTypes=["Egress"],
        egress=[
            {
                "to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                "ports": [{"port": "http"}],
            }
        ],
    )
    node.program(to_remote)
    verdict, out, delta = node.run("tby_from_wl", frame(CLIENT, VIP, syn(40000, 80)))
    assert verdict == TC_ACT_OK and out[IP].dst == REMOTE and delta.get(Reason.POL_NEW) == 1
    assert node.ct_entry(CLIENT, 40000, REMOTE, 8080).pol == PolVerdict.OUT  # the REV half
    # the reply, once reverse-translated (frontend -> client), passes the client's ingress too
    node.program(to_remote, netpol("client-in", podSelector={"matchLabels": {"app": "client"}}))
    reply = frame(VIP, CLIENT, TCP(sport=80, dport=40000, flags="SA"))
    assert node.run("tby_to_wl", reply)[0] == TC_ACT_OK
    # the direct address on the named port's number: the same verdict
    assert node.run("tby_from_wl", frame(CLIENT, REMOTE, syn(40001, 8080)))[0] == TC_ACT_OK
    verdict, _, delta = node.run("tby_from_wl", frame(CLIENT, REMOTE, syn(40002, 80)))
    assert (verdict, delta.get(Reason.DROP_POL_OUT)) == (TC_ACT_SHOT, 1)
    verdict, _, delta = node.run("tby_from_wl", frame(CLIENT, SERVER, syn(40003, 8080)))
    assert (verdict, delta.get(Reason.DROP_POL_OUT)) == (TC_ACT_SHOT, 1)


def test_ip_block_except_and_end_port(node: Node) -> None:
    pol = netpol(
        "blocks",
        podSelector={"matchLabels": {"app": "server"}},
        ingress=[
            {
                "from": [{"ipBlock": {"cidr": "100.96.0.0/16", "except": ["100.96.0.64/26"]}}],
                "ports": [{"port": 8000, "endPort": 8100, "protocol": "UDP"}],
            }
        ],
    )
    node.program(pol)
    cases = [
        (CLIENT, 8050, TC_ACT_OK),
        (CLIENT, 8101, TC_ACT_SHOT),
        (REMOTE, 8050, TC_ACT_SHOT),  # in the except
        ("100.97.0.1", 8000, TC_ACT_SHOT),  # outside the cidr
    ]
    for i, (src, dport, want) in enumerate(cases):
        got = node.run("tby_to_wl", frame(src, SERVER, UDP(sport=50000 + i, dport=dport)))[0]
        assert got == want, (src, dport)


def test_policy_update_switches_sets_and_removal_clears(node: Node) -> None:
    node.program(SERVER_FROM_CLIENT_8080)
    first = node.maps.endpoint(SERVER)
    assert first is not None
    node.program(SERVER_FROM_CLIENT_8080)  # unchanged: not rewritten
    assert node.maps.endpoint(SERVER).set == first.set
    node.program(netpol("all", podSelector={}, ingress=[{}]))
    second = node.maps.endpoint(SERVER)
    assert second.set != first.set
    assert all(k.set // 2 != first.set for k in node.maps.peer_keys())
    assert node.run("tby_to_wl", frame(REMOTE, SERVER, syn(40000, 1)))[0] == TC_ACT_OK
    node.program()
    assert node.maps.endpoint_items() == {} and node.maps.peer_keys() == []
    assert node.maps.port_keys() == []


def test_icmp_errors_of_admitted_flows_are_related(node: Node) -> None:
    """A port unreachable about an admitted UDP flow passes an egress that denies ICMP; an
    error about a flow never admitted does not."""
    deny_out = netpol(
        "deny-out", podSelector={"matchLabels": {"app": "server"}}, policyTypes=["Egress"]
    )
    allow_udp = netpol(
        "udp",
        podSelector={"matchLabels": {"app": "server"}},
        ingress=[{"ports": [{"protocol": "UDP"}]}],
    )
    node.program(SERVER_FROM_CLIENT_8080, deny_out, allow_udp)
    datagram = IP(src=CLIENT, dst=SERVER) / UDP(sport=41000, dport=9999) / b"q"
    assert node.run("tby_to_wl", raw(Ether() / datagram))[0] == TC_ACT_OK
    unreachable = Ether() / IP(src=SERVER, dst=CLIENT) / ICMP(type=3, code=3) / raw(datagram)
    verdict, _, delta = node.run("tby_from_wl", raw(unreachable))
    assert verdict == TC_ACT_OK and not delta.get(Reason.DROP_POL_OUT)
    other = IP(src=CLIENT, dst=SERVER) / UDP(sport=41001, dport=9999) / b"q"  # never seen
    stray = Ether() / IP(src=SERVER, dst=CLIENT) / ICMP(type=3, code=3) / raw(other)
    verdict, _, delta = node.run("tby_from_wl", raw(stray))
    assert (verdict, delta.get(Reason.DROP_POL_OUT)) == (TC_ACT_SHOT, 1)


def test_an_icmp_error_about_an_isolated_servers_own_reply_is_related(node: Node) -> None:
    """PMTU discovery for an isolated server: a router's fragmentation needed quotes the
    server's reply (server -> client), the reverse of the tuple its ingress admitted; it must
    reach the server, though the router is no peer its policy allows."""
    node.program(SERVER_FROM_CLIENT_8080)
    assert node.run("tby_to_wl", frame(CLIENT, SERVER, syn(42000, 8080)))[0] == TC_ACT_OK
    reply = IP(src=SERVER, dst=CLIENT, flags="DF") / TCP(sport=8080, dport=42000, flags="A")
    router = "172.20.64.1"
    too_big = Ether() / IP(src=router, dst=SERVER) / ICMP(type=3, code=4, nexthopmtu=1400)
    verdict, _, delta = node.run("tby_to_wl", raw(too_big / raw(reply / (b"x" * 8))))
    assert verdict == TC_ACT_OK and not delta.get(Reason.DROP_POL_IN)
    other = IP(src=SERVER, dst=CLIENT) / TCP(sport=8080, dport=42001, flags="A")  # never seen
    stray = Ether() / IP(src=router, dst=SERVER) / ICMP(type=3, code=4) / raw(other)
    verdict, _, delta = node.run("tby_to_wl", raw(stray))
    assert (verdict, delta.get(Reason.DROP_POL_IN)) == (TC_ACT_SHOT, 1)


def test_restarted_manager_adopts_then_rewrites_without_a_gap(node: Node) -> None:
    """An agent restart: a new manager finds the pinned sets, keeps them in force until each
    endpoint is rewritten under a fresh id, then sweeps the adopted ids' entries."""
    node.program(SERVER_FROM_CLIENT_8080)
    old = node.maps.endpoint(SERVER)
    n_peers = len(node.maps.peer_keys())
    node.manager = PolicyManager(node.maps)  # what a restarted agent builds
    node.manager._adopt()
    # adopted: still enforced before the first apply
    assert node.run("tby_to_wl", frame(REMOTE, SERVER, syn(40000, 8080)))[0] == TC_ACT_SHOT
    node.program(SERVER_FROM_CLIENT_8080)
    new = node.maps.endpoint(SERVER)
    assert new.set != old.set and len(node.maps.peer_keys()) == n_peers
    assert all(k.set // 2 == new.set for k in node.maps.peer_keys())
    assert node.run("tby_to_wl", frame(CLIENT, SERVER, syn(40001, 8080)))[0] == TC_ACT_OK
    assert node.run("tby_to_wl", frame(REMOTE, SERVER, syn(40002, 8080)))[0] == TC_ACT_SHOT

"""IP-in-IP on the data interface under BPF_PROG_TEST_RUN: tby_to_host encapsulates packets
routed to an IP-in-IP block, tby_from_host decapsulates what a known node sends us.

Each row: the packet in, the verdict, the counted reasons, and what must come out (the outer
header's fields and checksum, the inner packet byte for byte). Packet lives chain programs:
encapsulate, hand the result to the peer, decapsulate; a NodePort flow DNATed by from-host to a
backend behind IP-in-IP leaves to-host encapsulated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import packets as P
import pytest
from scapy.all import ICMP, IP, TCP, UDP, Ether, Raw, raw

from tabby.bpf.libbpf import TC_ACT_OK, TC_ACT_SHOT
from tabby.bpf.maps.counters import Reason
from tabby.bpf.maps.nat import BACKENDS_SPEC, FRONTENDS_SPEC, SOURCE_RANGES_SPEC
from tabby.bpf.maps.routes import RouteValue
from tabby.bpf.objects import DatapathObjects
from tabby.calc.services import service_nat
from tabby.dataplane.nat import NatManager

pytestmark = pytest.mark.root

IPIP_POD = "100.96.0.200"  # in 100.96.0.192/26, a block of REMOTE_NODE_IP via IP-in-IP
VXLAN_POD = "100.96.0.70"  # in 100.96.0.64/26, via VXLAN (the tunnel device's business)
PLAIN_POD = "100.96.0.130"  # in 100.96.0.128/26, routed plainly (CrossSubnet, same subnet)
LOOP_POD = "100.96.1.5"  # an IP-in-IP block whose next hop is this node: never encapsulated
UNKNOWN_NODE = "172.20.64.99"  # no node of the cluster
DATA_MTU = 1500


def install_routes(dp: DatapathObjects) -> None:
    routes = dp.routes()
    routes.upsert(f"{P.POD_IP}/32", RouteValue.local_workload(1))
    routes.upsert("100.96.0.192/26", RouteValue.remote_workload(P.REMOTE_NODE_IP, encap="ipip"))
    routes.upsert("100.96.0.64/26", RouteValue.remote_workload(P.REMOTE_NODE_IP, encap="vxlan"))
    routes.upsert("100.96.0.128/26", RouteValue.remote_workload(P.REMOTE_NODE_IP, encap=None))
    routes.upsert("100.96.1.0/26", RouteValue.remote_workload(P.NODE_IP, encap="ipip"))
    routes.upsert(f"{P.NODE_IP}/32", RouteValue.local_host())
    routes.upsert(f"{P.REMOTE_NODE_IP}/32", RouteValue.remote_host(P.REMOTE_NODE_IP))


def inner(dst: str = IPIP_POD, l4: Any = None, payload: bytes = b"hello", **ip: Any) -> IP:
    l4 = TCP(sport=40000, dport=8080, flags="S") if l4 is None else l4
    return IP(src=P.POD_IP, dst=dst, ttl=63, **ip) / l4 / payload


def frame(pkt: IP) -> bytes:
    return raw(Ether(src=P.HOST_MAC, dst=P.POD_MAC) / pkt)


def outer(src: str, dst: str, body: Any, **ip: Any) -> bytes:
    return raw(Ether(src=P.HOST_MAC, dst=P.POD_MAC) / IP(src=src, dst=dst, proto=4, **ip) / body)


def assert_outer_checksum_valid(out: Ether) -> None:
    again = out[IP].copy()
    del again.chksum
    assert IP(raw(again)).chksum == out[IP].chksum


@pytest.fixture
def runner(datapath: DatapathObjects) -> P.Runner:
    install_routes(datapath)
    return P.Runner(datapath)


# --- encapsulation (tby_to_host) ---------------------------------------------------------------


@dataclass(frozen=True)
class Encap:
    desc: str
    inner: Callable[[], IP]
    df: bool = True  # expected DF on the outer header
    tos: int = 0

    def __str__(self) -> str:
        return self.desc


ENCAP = [
    Encap("tcp syn", lambda: inner(flags="DF")),
    Encap("udp", lambda: inner(l4=UDP(sport=5353, dport=53), flags="DF")),
    Encap("icmp echo", lambda: inner(l4=ICMP(id=7, seq=1), flags="DF")),
    Encap("no DF inner: no DF outer", lambda: inner(), df=False),
    Encap("DSCP and ECN copied", lambda: inner(tos=0xB9, flags="DF"), tos=0xB9),
    Encap("non-first fragment", lambda: IP(src=P.POD_IP, dst=IPIP_POD, proto=6, frag=100, ttl=63)
          / Raw(b"x" * 8), df=False),
    Encap("at the MTU edge: 1480 inner -> 1500 outer",
          lambda: inner(flags="DF", payload=b"m" * (DATA_MTU - 20 - 40))),
]  # fmt: skip


@pytest.mark.parametrize("case", ENCAP, ids=str)
def test_encapsulation(runner: P.Runner, case: Encap) -> None:
    pkt = case.inner()
    data = frame(pkt)
    verdict, out_raw, delta = runner.run("tby_to_host", data)
    assert (verdict, delta) == (TC_ACT_OK, {Reason.ENCAP_IPIP: 1})
    out = Ether(out_raw)
    assert raw(out)[:14] == data[:14], "the L2 header the kernel resolved is kept"
    o = out[IP]
    assert (o.version, o.ihl, o.proto, o.ttl) == (4, 5, 4, 64)
    assert (o.src, o.dst) == (P.NODE_IP, P.REMOTE_NODE_IP)
    assert o.len == len(raw(pkt)) + 20 and len(out_raw) == len(data) + 20
    assert bool(o.flags.DF) is case.df and o.frag == 0 and o.tos == case.tos
    assert o.id == pkt.id
    assert_outer_checksum_valid(out)
    assert out_raw[34:] == data[14:], "the inner packet is untouched"
    if case.desc.startswith("at the MTU edge"):
        assert o.len == DATA_MTU


PASS_UNTOUCHED = [
    P.Case("vxlan block: the tunnel device's", lambda: frame(inner(dst=VXLAN_POD)), TC_ACT_OK,
           Reason.ENCAP_IPIP),
    P.Case("plain block (CrossSubnet, same subnet)", lambda: frame(inner(dst=PLAIN_POD)),
           TC_ACT_OK, Reason.ENCAP_IPIP),
    P.Case("next hop is this node", lambda: frame(inner(dst=LOOP_POD)), TC_ACT_OK,
           Reason.ENCAP_IPIP),
    P.Case("a node address", lambda: frame(inner(dst=P.REMOTE_NODE_IP)), TC_ACT_OK,
           Reason.ENCAP_IPIP),
    P.Case("outside the cluster", lambda: frame(inner(dst=P.EXTERNAL_IP)), TC_ACT_OK,
           Reason.ENCAP_IPIP),
    P.Case("arp", P.arp, TC_ACT_OK, Reason.ENCAP_IPIP),
]  # fmt: skip


@pytest.mark.parametrize("case", PASS_UNTOUCHED, ids=str)
def test_what_is_not_encapsulated_leaves_untouched(runner: P.Runner, case: P.Case) -> None:
    data = case.packet()
    verdict, out, delta = runner.run("tby_to_host", data)
    assert (verdict, out) == (case.verdict, data)
    assert case.reason not in delta


# --- decapsulation (tby_from_host) -------------------------------------------------------------


@dataclass(frozen=True)
class Decap:
    desc: str
    packet: Callable[[], bytes]
    verdict: int
    reasons: dict[Reason, int]
    inner: Callable[[], IP] | None = None  # what must come out (after the Ethernet header)

    def __str__(self) -> str:
        return self.desc


def back(**ip: Any) -> IP:
    """A remote pod's packet to a local pod, as the peer node wraps it."""
    return IP(src=IPIP_POD, dst=P.POD_IP, ttl=63, flags="DF", **ip) / TCP(
        sport=8080, dport=40000, flags="SA"
    ) / b"reply"  # fmt: skip


DECAP = [
    Decap("from a known node", lambda: outer(P.REMOTE_NODE_IP, P.NODE_IP, back(), flags="DF"),
          TC_ACT_OK, {Reason.DECAP_IPIP: 1}, back),
    Decap("outer with IP options", lambda: outer(P.REMOTE_NODE_IP, P.NODE_IP, back(),
          options=[b"\x01\x01\x01\x00"]), TC_ACT_OK, {Reason.DECAP_IPIP: 1}, back),
    Decap("udp inner", lambda: outer(P.REMOTE_NODE_IP, P.NODE_IP,
          IP(src=IPIP_POD, dst=P.POD_IP) / UDP(sport=53, dport=5353) / b"a"), TC_ACT_OK,
          {Reason.DECAP_IPIP: 1}, lambda: IP(src=IPIP_POD, dst=P.POD_IP) / UDP(sport=53,
          dport=5353) / b"a"),
    Decap("from an address that is no node", lambda: outer(UNKNOWN_NODE, P.NODE_IP, back()),
          TC_ACT_SHOT, {Reason.DROP_IPIP_SRC: 1}),
    Decap("from a pod address", lambda: outer(IPIP_POD, P.NODE_IP, back()), TC_ACT_SHOT,
          {Reason.DROP_IPIP_SRC: 1}),
    Decap("truncated: 8 bytes after the outer header", lambda: outer(
          P.REMOTE_NODE_IP, P.NODE_IP, Raw(b"\x45" + b"\0" * 7)), TC_ACT_SHOT,
          {Reason.DROP_MALFORMED: 1}),
    Decap("outer tot_len beyond the frame", lambda: outer(P.REMOTE_NODE_IP, P.NODE_IP, back(),
          len=400), TC_ACT_OK, {}),  # not parsed: left to the stack, which drops it
    Decap("inner is not IPv4", lambda: outer(P.REMOTE_NODE_IP, P.NODE_IP,
          Raw(b"\x60" + b"\0" * 39)), TC_ACT_SHOT, {Reason.DECAP_IPIP: 1,
          Reason.DROP_MALFORMED: 1}),
    Decap("outer fragment", lambda: outer(P.REMOTE_NODE_IP, P.NODE_IP, Raw(raw(back())[:24]),
          flags="MF"), TC_ACT_SHOT, {Reason.DROP_IPIP_FRAG: 1}),
]  # fmt: skip


@pytest.mark.parametrize("case", DECAP, ids=str)
def test_decapsulation(runner: P.Runner, case: Decap) -> None:
    data = case.packet()
    verdict, out, delta = runner.run("tby_from_host", data)
    assert (verdict, delta) == (case.verdict, case.reasons)
    if case.inner is not None:
        assert out[:14] == data[:14] and out[14:] == raw(case.inner())
    elif verdict == TC_ACT_OK:
        assert out == data


@pytest.mark.parametrize(
    "dst", [P.REMOTE_NODE_IP, "172.20.32.77"], ids=["addressed to another node", "transit"]
)
def test_ipip_not_addressed_to_us_passes_untouched(runner: P.Runner, dst: str) -> None:
    data = outer(P.REMOTE_NODE_IP, dst, back())
    verdict, out, delta = runner.run("tby_from_host", data)
    assert (verdict, out, delta) == (TC_ACT_OK, data, {})


# --- packet lives ------------------------------------------------------------------------------


def test_encapsulated_by_us_decapsulated_by_the_peer_gives_the_packet_back(
    runner: P.Runner,
) -> None:
    data = frame(inner(flags="DF", payload=b"z" * 1000))
    _, wrapped, _ = runner.run("tby_to_host", data)
    # the peer's view: the same outer header addressed from it to us (this fake node is both)
    turned = Ether(wrapped)
    turned[IP].src, turned[IP].dst = P.REMOTE_NODE_IP, P.NODE_IP
    del turned[IP].chksum
    verdict, out, delta = runner.run("tby_from_host", raw(turned))
    assert (verdict, delta) == (TC_ACT_OK, {Reason.DECAP_IPIP: 1})
    assert out == data


def test_nodeport_to_a_backend_behind_ipip_is_natted_then_encapsulated(
    datapath: DatapathObjects, runner: P.Runner
) -> None:
    nat = NatManager(
        *(datapath.map(s) for s in (FRONTENDS_SPEC, BACKENDS_SPEC, SOURCE_RANGES_SPEC))
    )
    svc = {
        "metadata": {"namespace": "default", "name": "web"},
        "spec": {
            "type": "NodePort",
            "clusterIP": "100.64.0.10",
            "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080}],
        },
    }
    eps = {
        "metadata": {
            "namespace": "default",
            "name": "web-1",
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": "IPv4",
        "ports": [{"port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [IPIP_POD], "conditions": {"ready": True}, "nodeName": "n2"}],
    }
    desired = {(n := service_nat(svc, [eps], "node1", P.NODE_IP)).key: n}
    assert not nat.apply(desired).errors

    syn = frame(IP(src=P.EXTERNAL_IP, dst=P.NODE_IP) / TCP(sport=50000, dport=30080, flags="S"))
    verdict, dnat, delta = runner.run("tby_from_host", syn)
    assert verdict == TC_ACT_OK and delta.get(Reason.NAT_NEW) == 1
    assert Ether(dnat)[IP].dst == IPIP_POD
    # the kernel forwards it out of the data interface: to-host wraps it for the backend's node
    verdict, out, delta = runner.run("tby_to_host", dnat)
    assert verdict == TC_ACT_OK and delta.get(Reason.ENCAP_IPIP) == 1
    o = Ether(out)
    assert (o[IP].src, o[IP].dst, o[IP].proto) == (P.NODE_IP, P.REMOTE_NODE_IP, 4)
    assert out[34:] == dnat[14:]
    # the backend's reply comes back wrapped by its node: decapsulated, then translated back
    reply = IP(src=IPIP_POD, dst=P.NODE_IP) / TCP(
        sport=8080, dport=Ether(dnat)[TCP].sport, flags="SA"
    )
    verdict, out, delta = runner.run("tby_from_host", outer(P.REMOTE_NODE_IP, P.NODE_IP, reply))
    assert verdict == TC_ACT_OK
    assert delta == {Reason.DECAP_IPIP: 1, Reason.NAT_REV: 1}
    back_out = Ether(out)
    assert (back_out[IP].src, back_out[TCP].sport) == (P.NODE_IP, 30080)
    assert (back_out[IP].dst, back_out[TCP].dport) == (P.EXTERNAL_IP, 50000)

"""IPv6 NodePorts per packet (nat6.h) under BPF_PROG_TEST_RUN: Service + IPv6 EndpointSlice ->
calc -> NatManager(family=6) -> tby_nat_fe6/be6, then packets through tby_from_host.

test_run's netns has no route to the backends, so the backend counts as remote (nat6_remote:
no usable route -> SNAT, replies come back through this node): the SNAT path is the one shown.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import packets as P
import pytest
from scapy.all import TCP, UDP, Ether, IPv6, raw

from tabby.bpf.libbpf import TC_ACT_OK, TC_ACT_SHOT
from tabby.bpf.maps.counters import Reason
from tabby.bpf.maps.nat import BACKENDS6_SPEC, FRONTENDS6_SPEC
from tabby.bpf.objects import DatapathObjects
from tabby.calc.services import service_nat
from tabby.dataplane.nat import NatManager

pytestmark = pytest.mark.root

NODE_IP6 = "fd00:20:1::11"
CLIENT6 = "fd00:ffff::7"
VIP6 = "fd00:64::10"
NODEPORT = 30080
BACKENDS6 = ("fd00:96::41", "fd00:96::42")


def service(
    addrs: tuple[str, ...] = BACKENDS6, **extra: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    svc = {
        "metadata": {"namespace": "default", "name": "web6"},
        "spec": {
            "type": "NodePort",
            "clusterIP": VIP6,
            "clusterIPs": [VIP6],
            "ports": [
                {
                    "name": "t",
                    "port": 80,
                    "targetPort": 8080,
                    "protocol": "TCP",
                    "nodePort": NODEPORT,
                },
                {
                    "name": "u",
                    "port": 53,
                    "targetPort": 8081,
                    "protocol": "UDP",
                    "nodePort": NODEPORT,
                },
            ],  # fmt: skip
            **extra,
        },
    }
    sl = {
        "addressType": "IPv6",
        "ports": [
            {"name": "t", "port": 8080, "protocol": "TCP"},
            {"name": "u", "port": 8081, "protocol": "UDP"},
        ],
        "endpoints": [
            {"addresses": [a], "conditions": {"ready": True}, "nodeName": "node2"} for a in addrs
        ],
    }
    return svc, [sl]


class Node:
    def __init__(self, dp: DatapathObjects) -> None:
        self.runner = P.Runner(dp)
        self.nat6 = NatManager(dp.map(FRONTENDS6_SPEC), dp.map(BACKENDS6_SPEC), None, family=6)

    def program(self, addrs: tuple[str, ...] = BACKENDS6, **extra: Any) -> None:
        svc, slices = service(addrs, **extra)
        nat = service_nat(svc, slices, "node1", P.NODE_IP, NODE_IP6)
        assert nat.ipv6 is not None
        assert not self.nat6.apply({nat.key: nat.ipv6}).errors

    def run(self, frame: bytes) -> tuple[int, Ether, dict[Reason, int]]:
        verdict, out, delta = self.runner.run("tby_from_host", frame)
        return verdict, Ether(out), delta


@pytest.fixture
def node(datapath: DatapathObjects) -> Iterator[Node]:
    yield Node(datapath)


def frame(src: str, dst: str, l4: Any, payload: bytes = b"hello") -> bytes:
    return raw(Ether(src=P.POD_MAC, dst=P.HOST_MAC) / IPv6(src=src, dst=dst) / l4 / payload)


def assert_checksum_valid(pkt: Ether) -> None:
    """scapy recomputing the L4 checksum (pseudo-header included) gives the same bytes."""
    again = pkt.copy()
    for layer in (TCP, UDP):
        if layer in again:
            del again[layer].chksum
    assert raw(Ether(raw(again))) == raw(pkt)


@pytest.mark.parametrize("l4", [TCP, UDP], ids=["tcp", "udp"])
def test_nodeport6_is_dnated_and_snated_and_the_reply_returns(node: Node, l4: Any) -> None:
    node.program()
    first = l4(sport=50000, dport=NODEPORT, **({"flags": "S"} if l4 is TCP else {}))
    verdict, out, delta = node.run(frame(CLIENT6, NODE_IP6, first))
    assert verdict == TC_ACT_OK and delta.get(Reason.NAT6_NEW) == 1
    backend = out[IPv6].dst
    assert backend in BACKENDS6 and out[IPv6].src == NODE_IP6, "SNAT to the node"
    assert (out[l4].sport, out[l4].dport) == (50000, 8080 if l4 is TCP else 8081)
    assert_checksum_valid(out)
    # the next packet of the flow: the same backend, counted as translated
    again = l4(sport=50000, dport=NODEPORT, **({"flags": "A"} if l4 is TCP else {}))
    verdict, out2, delta = node.run(frame(CLIENT6, NODE_IP6, again, b"more"))
    assert delta.get(Reason.NAT6) == 1 and out2[IPv6].dst == backend
    assert_checksum_valid(out2)
    reply = l4(sport=out[l4].dport, dport=50000, **({"flags": "SA"} if l4 is TCP else {}))
    verdict, back, delta = node.run(frame(backend, NODE_IP6, reply, b"x" * 300))
    assert verdict == TC_ACT_OK and delta.get(Reason.NAT6) == 1
    assert (back[IPv6].src, back[l4].sport) == (NODE_IP6, NODEPORT)
    assert (back[IPv6].dst, back[l4].dport) == (CLIENT6, 50000)
    assert_checksum_valid(back)


def test_cluster_ip6_and_strangers_pass_untouched_and_no_endpoints_drops(node: Node) -> None:
    node.program()
    to_vip = frame(CLIENT6, VIP6, TCP(sport=1, dport=80, flags="S"))
    verdict, out, delta = node.run(to_vip)
    assert verdict == TC_ACT_OK and raw(out) == to_vip and not delta.get(Reason.NAT6_NEW)
    other = frame(CLIENT6, NODE_IP6, TCP(sport=1, dport=22, flags="S"))
    verdict, out, _ = node.run(other)
    assert verdict == TC_ACT_OK and raw(out) == other
    node.program(addrs=())
    verdict, _, delta = node.run(frame(CLIENT6, NODE_IP6, TCP(sport=2, dport=NODEPORT)))
    assert verdict == TC_ACT_SHOT and delta.get(Reason.NAT_REJECT) == 1


def test_external_traffic_policy_local_without_a_local_endpoint_drops(node: Node) -> None:
    node.program(externalTrafficPolicy="Local")  # both backends are on node2, we are node1
    verdict, _, delta = node.run(frame(CLIENT6, NODE_IP6, TCP(sport=3, dport=NODEPORT)))
    assert verdict == TC_ACT_SHOT and delta.get(Reason.DROP_NO_LOCAL) == 1

"""The ext tunnel (bpfExternalServiceMode Tunnel / DSR) under BPF_PROG_TEST_RUN: the ingress
node's from-host wrapping a NodePort flow for the backend's node, the backend's node unwrapping
and recording it, and the backend's reply leaving by the mode's path. One fake node plays both
roles: as ingress its backends are in 100.96.0.64/26 on REMOTE_NODE_IP; as the backend's node its
local pod is POD_IP and REMOTE_NODE_IP is the ingress node.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import packets as P
import pytest
from scapy.all import ICMP, IP, TCP, UDP, Ether, Raw, raw
from scapy.layers.inet import UDPerror
from scapy.layers.vxlan import VXLAN
from test_nat import BACKENDS, NODEPORT, Node, assert_checksums_valid, frame, service, slice_of

from tabby.bpf import libbpf
from tabby.bpf.libbpf import TC_ACT_OK, TC_ACT_SHOT, SkBuffCtx
from tabby.bpf.maps.conntrack import CtFlags, CtKey, CtType, CtValue
from tabby.bpf.maps.counters import Reason
from tabby.bpf.maps.routes import RouteValue
from tabby.bpf.objects import DatapathConfig, DatapathObjects

pytestmark = pytest.mark.root

TC_ACT_REDIRECT = 7
EXT_VNI = 0x7AB1E  # exttun.h TBY_EXT_VNI
F_DSR, F_REPLY = 1, 2  # TBY_EXT_F_*
UDP_NODEPORT = 30081


@pytest.fixture(params=["Tunnel", "DSR"])
def node(request: pytest.FixtureRequest, bpf_dir: Path, pin_root: str) -> Iterator[Node]:
    config = DatapathConfig.build(
        vni=4242, host_ip=P.NODE_IP, ext_mode=request.param, data_ifindex=1, data_mtu=1500
    )
    with DatapathObjects(pin_root, config, bpf_dir) as dp:
        n = Node(dp)
        dp.routes().upsert(f"{P.REMOTE_NODE_IP}/32", RouteValue.remote_host(P.REMOTE_NODE_IP))
        n.program(
            (
                service(
                    type="NodePort",
                    ports=[
                        {"name": "t", "port": 80, "targetPort": 8080, "nodePort": NODEPORT},
                        {
                            "name": "u",
                            "port": 81,
                            "targetPort": 8080,
                            "protocol": "UDP",
                            "nodePort": UDP_NODEPORT,
                        },
                    ],
                ),
                [named_slice()],
            )
        )
        n.mode = request.param  # type: ignore[attr-defined]
        yield n


def named_slice() -> dict[str, object]:
    """The remote backends, with the port names the two-port service asks for."""
    one = slice_of()
    one["ports"] = [
        {"name": "t", "port": 8080, "protocol": "TCP"},
        {"name": "u", "port": 8080, "protocol": "UDP"},
    ]
    return one


def header_checksum_ok(ip: IP) -> bool:
    """RFC 1071 over the IPv4 header sums to 0xffff."""
    words = struct.unpack(f"!{ip.ihl * 2}H", raw(ip)[: ip.ihl * 4])
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def ext_header(pkt: Ether) -> tuple[str, int, int, Ether]:
    """(frontend address, frontend port, flags, inner packet) of an ext tunnel packet."""
    body = raw(pkt[VXLAN].payload)
    addr, port, flags = struct.unpack("!4sHB", body[:7])
    assert body[12:14] == b"\x08\x00", "ends with ETH_P_IP"
    return ".".join(str(b) for b in addr), port, flags, IP(body[14:])


def tunnelled(src: str, dst: str, fe: str, fe_port: int, flags: int, inner: IP) -> bytes:
    """An ext tunnel packet as a peer node sends it."""
    hdr = struct.pack("!4sHB5xH", bytes(int(x) for x in fe.split(".")), fe_port, flags, 0x0800)
    return raw(
        Ether(src=P.POD_MAC, dst=P.HOST_MAC)
        / IP(src=src, dst=dst, flags="DF")
        / UDP(sport=50123, dport=4789, chksum=0)
        / VXLAN(vni=EXT_VNI, flags=0x08)
        / Raw(hdr)
        / inner
    )


def test_ingress_wraps_a_nodeport_flow_for_the_backends_node(node: Node) -> None:
    syn = frame(P.EXTERNAL_IP, P.NODE_IP, TCP(sport=50000, dport=NODEPORT, flags="S"))
    verdict, out, delta = node.run("tby_from_host", syn)
    assert verdict == TC_ACT_REDIRECT, "bpf_redirect_neigh out of the data interface"
    assert delta.get(Reason.EXT_FWD) == 1 and delta.get(Reason.NAT_NEW) == 1
    outer = out[IP]
    assert (outer.src, outer.dst, outer.ttl, outer.flags) == (P.NODE_IP, P.REMOTE_NODE_IP, 64, 2)
    assert out[UDP].dport == 4789 and out[UDP].chksum == 0 and out[VXLAN].vni == EXT_VNI
    assert outer.len == len(raw(outer)) and out[UDP].len == len(raw(out[UDP]))
    fe, fe_port, flags, inner = ext_header(out)
    assert (fe, fe_port) == (P.NODE_IP, NODEPORT)
    assert flags == (F_DSR if node.mode == "DSR" else 0)  # type: ignore[attr-defined]
    assert inner.src == P.EXTERNAL_IP and inner.dst in BACKENDS and inner[TCP].dport == 8080
    # both headers' checksums are right (the outer built here, the inner rewritten by NAT)
    assert header_checksum_ok(outer)
    assert_checksums_valid(Ether(raw(Ether() / inner)))
    fwd = node.ct_entry(P.EXTERNAL_IP, 50000, P.NODE_IP, NODEPORT)
    assert fwd.type == CtType.NAT_FWD and fwd.nat_saddr == 0, "no SNAT"
    want = CtFlags.TUNNEL | (CtFlags.DSR if node.mode == "DSR" else 0)  # type: ignore[attr-defined]
    assert fwd.flags == want
    # the next packet of the flow takes the same way
    ack = frame(P.EXTERNAL_IP, P.NODE_IP, TCP(sport=50000, dport=NODEPORT, flags="A"))
    verdict, again_out, delta = node.run("tby_from_host", ack)
    assert verdict == TC_ACT_REDIRECT and ext_header(again_out)[3].dst == inner.dst


def test_a_df_datagram_that_no_longer_fits_gets_fragmentation_needed(node: Node) -> None:
    big = frame(P.EXTERNAL_IP, P.NODE_IP, UDP(sport=5353, dport=UDP_NODEPORT), b"x" * (1500 - 28))
    pkt = Ether(big)
    pkt[IP].flags = "DF"
    del pkt[IP].chksum
    verdict, out, delta = node.run("tby_from_host", raw(pkt))
    assert verdict == TC_ACT_REDIRECT and delta.get(Reason.EXT_FRAG_NEEDED) == 1
    assert (out[IP].src, out[IP].dst) == (P.NODE_IP, P.EXTERNAL_IP), "from what the client reached"
    assert (out[ICMP].type, out[ICMP].code, out[ICMP].nexthopmtu) == (3, 4, 1450)
    quoted = out[ICMP].payload
    assert (quoted.dst, quoted[UDPerror].dport) == (P.NODE_IP, UDP_NODEPORT), "the original"
    assert_checksums_valid(out)
    # without DF nothing here could fragment it
    verdict, _, delta = node.run("tby_from_host", big)
    assert verdict == TC_ACT_SHOT and delta.get(Reason.DROP_EXT_TOO_BIG) == 1


def test_the_backends_node_unwraps_records_and_answers_by_the_mode(node: Node) -> None:
    dsr = node.mode == "DSR"  # type: ignore[attr-defined]
    inner = IP(src=P.EXTERNAL_IP, dst=P.POD_IP) / TCP(sport=50000, dport=8080, flags="S")
    wrapped = tunnelled(
        P.REMOTE_NODE_IP, P.NODE_IP, P.REMOTE_NODE_IP, NODEPORT, F_DSR if dsr else 0, inner
    )
    verdict, out, delta = node.run("tby_from_host", wrapped)
    # the stack delivers it (the fast path, fwd.h, is off here: tests/bpf/test_fwd.py)
    assert verdict == TC_ACT_OK and delta.get(Reason.EXT_RX) == 1
    assert raw(out[IP]) == raw(IP(raw(inner))), "the inner packet, as the ingress node sent it"
    ext = node.ct_entry(P.EXTERNAL_IP, 50000, P.POD_IP, 8080)
    assert ext.type == CtType.EXT and ext.tun_ip == int(ipaddress.IPv4Address(P.REMOTE_NODE_IP))

    reply = frame(P.POD_IP, P.EXTERNAL_IP, TCP(sport=8080, dport=50000, flags="SA"))
    verdict, out, delta = node.run("tby_from_wl", reply)
    if dsr:
        assert verdict == TC_ACT_OK and delta.get(Reason.EXT_REPLY_DSR) == 1
        assert (out[IP].src, out[TCP].sport) == (P.REMOTE_NODE_IP, NODEPORT), "as the frontend"
        assert out[IP].dst == P.EXTERNAL_IP
        assert_checksums_valid(out)
    else:
        assert verdict == TC_ACT_REDIRECT and delta.get(Reason.EXT_REPLY_TUN) == 1
        assert (out[IP].src, out[IP].dst) == (P.NODE_IP, P.REMOTE_NODE_IP)
        fe, fe_port, flags, back = ext_header(out)
        assert (fe, fe_port, flags) == (P.REMOTE_NODE_IP, NODEPORT, F_REPLY)
        assert (back.src, back[TCP].sport, back.dst) == (P.POD_IP, 8080, P.EXTERNAL_IP)


def test_to_host_skips_nat_for_a_packet_this_node_already_handled(node: Node) -> None:
    """mark.h: a packet an earlier program of this node marked (an ext tunnel packet, a DSR
    reply) is not looked up again on its way out; an unmarked one still is."""
    syn = frame(P.EXTERNAL_IP, P.NODE_IP, TCP(sport=50004, dport=NODEPORT, flags="S"))
    backend = ext_header(node.run("tby_from_host", syn)[1])[3].dst
    reply = frame(backend, P.EXTERNAL_IP, TCP(sport=8080, dport=50004, flags="SA"))
    marked = SkBuffCtx(mark=P.MARK_NAT_DONE | 0x4000)  # kube-proxy's bit is kept apart
    verdict, out, _ = libbpf.test_run(node.runner.dp.prog_fd("tby_to_host"), reply, marked)
    assert verdict == TC_ACT_OK and out == reply, "untouched"
    verdict, out, delta = node.run("tby_to_host", reply)
    assert verdict == TC_ACT_OK and delta.get(Reason.NAT_REV) == 1
    assert (out[IP].src, out[TCP].sport) == (P.NODE_IP, NODEPORT), "unmarked: translated"


def test_the_ingress_node_turns_a_tunnelled_reply_back(node: Node) -> None:
    syn = frame(P.EXTERNAL_IP, P.NODE_IP, TCP(sport=50001, dport=NODEPORT, flags="S"))
    _, out, _ = node.run("tby_from_host", syn)
    backend = ext_header(out)[3].dst
    inner = IP(src=backend, dst=P.EXTERNAL_IP) / TCP(sport=8080, dport=50001, flags="SA")
    wrapped = tunnelled(P.REMOTE_NODE_IP, P.NODE_IP, P.NODE_IP, NODEPORT, F_REPLY, inner)
    verdict, out, delta = node.run("tby_from_host", wrapped)
    assert verdict == TC_ACT_OK and delta.get(Reason.NAT_REV) == 1
    assert (out[IP].src, out[TCP].sport) == (P.NODE_IP, NODEPORT)
    assert (out[IP].dst, out[TCP].dport) == (P.EXTERNAL_IP, 50001)
    assert_checksums_valid(out)


def test_ext_tunnel_from_a_stranger_is_dropped_and_pod_vxlan_passes(node: Node) -> None:
    inner = IP(src=P.EXTERNAL_IP, dst=P.POD_IP) / TCP(sport=1, dport=8080, flags="S")
    forged = tunnelled(P.EXTERNAL_IP, P.NODE_IP, P.NODE_IP, NODEPORT, 0, inner)
    verdict, _, delta = node.run("tby_from_host", forged)
    assert verdict == TC_ACT_SHOT and delta.get(Reason.DROP_EXT_SRC) == 1
    pod_vxlan = raw(
        Ether(src=P.POD_MAC, dst=P.HOST_MAC)
        / IP(src=P.REMOTE_NODE_IP, dst=P.NODE_IP)
        / UDP(sport=50000, dport=4789)
        / VXLAN(vni=4242)
        / Ether()
        / inner
    )
    verdict, out, delta = node.run("tby_from_host", pod_vxlan)
    assert verdict == TC_ACT_OK and raw(out) == pod_vxlan and not delta, "the VXLAN device's"
    # its outer header is never looked up: not even a conntrack entry of that very tuple (none
    # exists in life) translates it
    node.ct.update(
        CtKey.make(P.REMOTE_NODE_IP, 50000, P.NODE_IP, 4789, socket.IPPROTO_UDP),
        CtValue(type=CtType.NAT_FWD, nat_addr=int(ipaddress.IPv4Address(P.POD_IP)), nat_port=8080),
    )
    verdict, out, delta = node.run("tby_from_host", pod_vxlan)
    assert verdict == TC_ACT_OK and raw(out) == pod_vxlan and not delta


def test_the_backends_node_refuses_a_colliding_flow_with_port_unreachable(node: Node) -> None:
    """The documented collision: the client port already reaches this backend through another
    frontend (another ingress node's NodePort). The second flow's SYN comes back as ICMP port
    unreachable from the frontend it was sent to (ECONNREFUSED, never a hang); the first flow's
    entry is untouched; a non-SYN packet of the second flow is dropped."""
    other_fe = "172.20.64.13"
    first = IP(src=P.EXTERNAL_IP, dst=P.POD_IP) / TCP(sport=50002, dport=8080, flags="S")
    wrapped = tunnelled(P.REMOTE_NODE_IP, P.NODE_IP, P.REMOTE_NODE_IP, NODEPORT, 0, first)
    assert node.run("tby_from_host", wrapped)[0] == TC_ACT_OK
    second = tunnelled(P.REMOTE_NODE_IP, P.NODE_IP, other_fe, NODEPORT, 0, first)
    verdict, out, delta = node.run("tby_from_host", second)
    assert verdict == TC_ACT_REDIRECT and delta.get(Reason.EXT_REFUSED) == 1
    assert (out[IP].src, out[IP].dst) == (other_fe, P.EXTERNAL_IP)
    assert (out[ICMP].type, out[ICMP].code) == (3, 3)
    quoted = out[ICMP].payload
    assert (quoted.src, quoted.dst) == (P.EXTERNAL_IP, other_fe), "what the client sent"
    assert_checksums_valid(out)
    ext = node.ct_entry(P.EXTERNAL_IP, 50002, P.POD_IP, 8080)
    assert ext.type == CtType.EXT and ext.nat_addr == int(ipaddress.IPv4Address(P.REMOTE_NODE_IP))
    ack = IP(src=P.EXTERNAL_IP, dst=P.POD_IP) / TCP(sport=50002, dport=8080, flags="A")
    verdict, _, delta = node.run(
        "tby_from_host", tunnelled(P.REMOTE_NODE_IP, P.NODE_IP, other_fe, NODEPORT, 0, ack)
    )
    assert verdict == TC_ACT_SHOT and delta.get(Reason.DROP_EXT_FLOW) == 1

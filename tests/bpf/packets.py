"""Packet builders for the BPF_PROG_TEST_RUN suites (scapy), well-formed and deliberately broken,
and the Runner that feeds them to a program and reports verdict and counter delta.

Every builder returns bytes ready for libbpf.test_run. Broken packets stay long enough for the
kernel's own test_run checks (14 bytes of Ethernet, 20 of IPv4), or the run fails with EINVAL
before the program sees anything; the truncated-IP case needs live injection instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from scapy.all import ARP, ICMP, IP, TCP, UDP, Ether, IPv6, Packet, Raw, fuzz, raw

from tabby.bpf import libbpf
from tabby.bpf.maps.counters import Reason
from tabby.bpf.objects import DatapathObjects

POD_MAC = "02:fc:00:00:00:05"
HOST_MAC = "ee:ee:ee:ee:ee:ee"

MARK_NAT_DONE = 0x07A00000  # mark.h TBY_MARK_NAT_DONE: handled on this node
POD_IP = "100.96.0.5"  # a pod of this node
OTHER_POD_IP = "100.96.0.9"  # another pod of this node (another veth)
REMOTE_POD_IP = "100.96.0.70"  # in 100.96.0.64/26, a block of node 172.20.64.12
NODE_IP = "172.20.32.10"
REMOTE_NODE_IP = "172.20.64.12"
EXTERNAL_IP = "203.0.113.7"


def eth() -> Ether:
    return Ether(src=POD_MAC, dst=HOST_MAC)


def tcp(src: str = POD_IP, dst: str = REMOTE_POD_IP, payload: bytes = b"hello") -> bytes:
    return raw(eth() / IP(src=src, dst=dst) / TCP(sport=40000, dport=80, flags="S") / payload)


def udp(src: str = POD_IP, dst: str = REMOTE_POD_IP, payload: bytes = b"q") -> bytes:
    return raw(eth() / IP(src=src, dst=dst) / UDP(sport=5353, dport=53) / payload)


def icmp(src: str = POD_IP, dst: str = REMOTE_POD_IP) -> bytes:
    return raw(eth() / IP(src=src, dst=dst) / ICMP(id=7, seq=1) / b"ping")


def fragment(src: str = POD_IP, dst: str = REMOTE_POD_IP) -> bytes:
    """A non-first fragment: no L4 header, must not be judged by one."""
    return raw(eth() / IP(src=src, dst=dst, proto=6, frag=100) / Raw(b"x" * 4))


def arp() -> bytes:
    return raw(Ether(src=POD_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=POD_IP, pdst="169.254.1.1"))


def ipv6(src: str = "fd00::5") -> bytes:
    return raw(eth() / IPv6(src=src, dst="fd00::1") / UDP(sport=1, dport=2))


def other_ethertype() -> bytes:
    return raw(Ether(src=POD_MAC, dst=HOST_MAC, type=0x88B5) / Raw(b"\0" * 46))


def ihl_below_5(src: str = POD_IP) -> bytes:
    return raw(eth() / IP(src=src, dst=REMOTE_POD_IP, ihl=4) / TCP())


def version_6_in_ipv4_frame(src: str = POD_IP) -> bytes:
    return raw(eth() / IP(src=src, dst=REMOTE_POD_IP, version=6) / TCP())


def tot_len_beyond_frame(src: str = POD_IP) -> bytes:
    return raw(eth() / IP(src=src, dst=REMOTE_POD_IP, len=400) / TCP())


def tot_len_below_header(src: str = POD_IP) -> bytes:
    return raw(eth() / IP(src=src, dst=REMOTE_POD_IP, len=12) / TCP())


def truncated_tcp(src: str = POD_IP) -> bytes:
    """IP says TCP, but only 8 bytes of it follow."""
    pkt = eth() / IP(src=src, dst=REMOTE_POD_IP, proto=6) / Raw(b"\0" * 8)
    return raw(pkt)


def tcp_doff_below_5(src: str = POD_IP) -> bytes:
    return raw(eth() / IP(src=src, dst=REMOTE_POD_IP) / TCP(dataofs=4))


def udp_len_below_8(src: str = POD_IP) -> bytes:
    return raw(eth() / IP(src=src, dst=REMOTE_POD_IP) / UDP(len=4) / b"abcd")


def padded_tcp(src: str = POD_IP) -> bytes:
    """A minimum-size Ethernet frame: padding after tot_len is legal."""
    data = tcp(src=src, payload=b"")
    return data + b"\0" * max(0, 60 - len(data))


def fuzzed(count: int, src: str = POD_IP, seed_layer: type[Packet] = TCP) -> Iterator[bytes]:
    """Random IPv4 headers and L4 headers (scapy fuzz), Ethernet kept valid.

    Frames the kernel refuses to run (under 34 bytes) are skipped by the caller's helper.
    """
    for _ in range(count):
        yield raw(eth() / fuzz(IP(src=src, dst=REMOTE_POD_IP) / seed_layer()))


class Runner:
    """Runs one program on raw frames and reports the verdict and the counter delta."""

    def __init__(self, dp: DatapathObjects) -> None:
        self.dp = dp
        self.counters = dp.counters()

    def run(self, prog: str, data: bytes) -> tuple[int, bytes, dict[Reason, int]]:
        before = {r: self.counters.get(r) for r in Reason}
        verdict, out, _ = libbpf.test_run(self.dp.prog_fd(prog), data)
        delta = {r: self.counters.get(r) - n for r, n in before.items()}
        return verdict, out, {r: d for r, d in delta.items() if d}


@dataclass(frozen=True)
class Case:
    """One row of a table-driven packet test: what goes in, the verdict and the counted reason."""

    desc: str
    packet: Callable[[], bytes]
    verdict: int
    reason: Reason

    def __str__(self) -> str:
        return self.desc

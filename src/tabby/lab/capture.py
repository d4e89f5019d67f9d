"""Packet capture on a lab link (tcpdump in the link's namespace), read back with scapy."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from scapy.all import rdpcap
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6


class Capture:
    def __init__(self) -> None:
        self.packets: list[Any] = []

    def vxlan(self, port: int = 4789) -> list[Any]:
        return [p for p in self.packets if UDP in p and p[UDP].dport == port]

    def plain_between(self, a: str, b: str) -> list[Any]:
        """Packets whose OUTER header is a<->b (i.e. not encapsulated)."""
        return [p for p in self.packets if IP in p and {p[IP].src, p[IP].dst} == {a, b}]

    def plain6_between(self, a: str, b: str) -> list[Any]:
        """IPv6 packets whose OUTER header is a<->b (an IPv6 header on the wire, not inside
        anything else)."""
        return [
            p
            for p in self.packets
            if IPv6 in p and IP not in p and {p[IPv6].src, p[IPv6].dst} == {a, b}
        ]

    def inner_between(self, a: str, b: str, port: int = 4789) -> list[Any]:
        out = []
        for p in self.vxlan(port):
            inner = p[UDP].payload.payload  # UDP / VXLAN / Ether / IP
            ip = inner.getlayer(IP) if inner else None
            if ip is not None and {ip.src, ip.dst} == {a, b}:
                out.append(p)
        return out

    def ipip_between(self, a: str, b: str) -> list[Any]:
        """IP-in-IP packets (IP protocol 4) whose INNER header is a<->b."""
        out = []
        for p in self.packets:
            if IP in p and p[IP].proto == 4:
                ip = p[IP].payload
                if isinstance(ip, IP) and {ip.src, ip.dst} == {a, b}:
                    out.append(p)
        return out


@contextmanager
def capture(netns: str, iface: str, bpf_filter: str = "") -> Iterator[Capture]:
    """Capture on ``iface`` inside ``netns`` for the duration of the block."""
    cap = Capture()
    fd, path = tempfile.mkstemp(suffix=".pcap", prefix="tabby-")
    os.close(fd)
    argv = [
        "nsenter",
        f"--net=/run/netns/{netns}",
        "tcpdump",
        "-i",
        iface,
        "-nn",
        "-U",
        "--immediate-mode",
        "-s",
        "256",
        "-w",
        path,
    ] + ([bpf_filter] if bpf_filter else [])
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # "listening on ...": the capture is armed
        if "listening" not in line:
            raise RuntimeError(f"tcpdump did not start: {line.strip()}")
        yield cap
        time.sleep(0.2)  # let the last packets of the block reach the file (-U flushes each)
    finally:
        proc.terminate()
        proc.wait(timeout=5)
        try:
            cap.packets = list(rdpcap(path)) if os.path.getsize(path) > 24 else []
        finally:
            os.unlink(path)

"""The IPv6 anti-spoofing map: this node's pods' IPv6 addresses -> their host-side veths.

Desired state is {IPv6 address: host interface name} (calc: the pods' IPv6 podIPs); ``apply``
writes the difference only. What is pinned is adopted at start, so a restarted agent deletes
only entries of pods that are gone. An interface that does not exist yet is skipped (and
reported): the pod's IPv6 traffic is dropped as spoofed until its veth exists, never admitted.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from tabby.bpf import libbpf
from tabby.bpf.maps.workloads6 import Workload6Key, Workload6Value


class Workload6Manager:
    def __init__(self, bpf_map: libbpf.Map[Any, Any]) -> None:
        self.map = bpf_map
        self.programmed: dict[str, int] = {
            str(ipaddress.IPv6Address(bytes(k.addr))): int(v.ifindex)
            for k, v in ((k, self.map.lookup(k)) for k in list(self.map.keys()))
            if v is not None
        }

    def apply(self, desired: dict[str, str]) -> list[str]:
        errors: list[str] = []
        want: dict[str, int] = {}
        for addr, ifname in desired.items():
            try:
                want[addr] = socket.if_nametoindex(ifname)
            except OSError:
                errors.append(f"IPv6 anti-spoofing: {ifname} of {addr} does not exist yet")
        try:
            for addr, ifindex in want.items():
                if self.programmed.get(addr) != ifindex:
                    self.map.update(Workload6Key.make(addr), Workload6Value(ifindex=ifindex))
                    self.programmed[addr] = ifindex
            for addr in [a for a in self.programmed if a not in want]:
                self.map.delete(Workload6Key.make(addr))
                del self.programmed[addr]
        except OSError as e:
            errors.append(f"IPv6 anti-spoofing map: {e}")
        return errors

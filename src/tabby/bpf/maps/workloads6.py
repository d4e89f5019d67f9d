"""IPv6 anti-spoofing (mirror of types.h): a local pod's IPv6 address -> its host-side veth.

tby_from_wl drops an IPv6 packet whose source is neither link-local/unspecified nor the pod's
own address on the veth it came in (``dataplane/workloads6.py`` keeps the map).
"""

from __future__ import annotations

import ctypes
import ipaddress

from tabby.bpf.maps.spec import BPF_MAP_TYPE_HASH, MapSpec


class Workload6Key(ctypes.Structure):
    """struct tby_wl6_key."""

    _fields_ = [("addr", ctypes.c_uint8 * 16)]

    @classmethod
    def make(cls, addr: str) -> Workload6Key:
        key = cls()
        key.addr[:] = ipaddress.IPv6Address(addr).packed
        return key

    def describe(self) -> str:
        return str(ipaddress.IPv6Address(bytes(self.addr)))


class Workload6Value(ctypes.Structure):
    """struct tby_wl6_val."""

    _fields_ = [("ifindex", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


WORKLOADS6_SPEC = MapSpec("tby_wl6", BPF_MAP_TYPE_HASH, Workload6Key, Workload6Value, 16384)

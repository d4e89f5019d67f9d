"""The service NAT maps (mirror of types.h): frontends, backend sets, affinity, source ranges.

A frontend (VIP:port/proto) names a backend set by ``id`` and says how many ordinals it has;
``tby_nat_be`` holds (id, ordinal) -> backend. The datapath picks ordinal = random % count, so a
set is written backends-first and shrunk frontend-first (``dataplane/nat.py`` keeps that order).
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import socket

from tabby.bpf.maps.spec import (
    BPF_F_NO_PREALLOC,
    BPF_MAP_TYPE_HASH,
    BPF_MAP_TYPE_LPM_TRIE,
    BPF_MAP_TYPE_LRU_HASH,
    MapSpec,
)

_be16 = ctypes.c_uint16.__ctype_be__
_be32 = ctypes.c_uint32.__ctype_be__

PROTOCOLS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}


class NatFlags(enum.IntFlag):
    """TBY_NAT_* of types.h (checked by tests/layout)."""

    AFFINITY = 1 << 0
    DROP_EMPTY = 1 << 1
    SRC_RANGES = 1 << 2
    EXTERNAL = 1 << 3
    MAGLEV = 1 << 4


def _ip(addr: str) -> int:
    return int(ipaddress.IPv4Address(addr))


def _str(addr: int) -> str:
    return str(ipaddress.IPv4Address(addr))


class FrontendKey(ctypes.Structure):
    """struct tby_nat_fe_key."""

    _fields_ = [
        ("addr", _be32),
        ("port", _be16),
        ("proto", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8),
    ]

    @classmethod
    def make(cls, addr: str, port: int, protocol: str) -> FrontendKey:
        return cls(addr=_ip(addr), port=port, proto=PROTOCOLS[protocol])

    def describe(self) -> str:
        return f"{_str(self.addr)}:{self.port}/{PROTOCOL_NAMES.get(self.proto, self.proto)}"


class FrontendValue(ctypes.Structure):
    """struct tby_nat_fe_val."""

    _fields_ = [
        ("id", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("affinity_s", ctypes.c_uint32),
    ]


class BackendKey(ctypes.Structure):
    """struct tby_nat_be_key."""

    _fields_ = [("id", ctypes.c_uint32), ("ordinal", ctypes.c_uint32)]


class BackendValue(ctypes.Structure):
    """struct tby_nat_be_val."""

    _fields_ = [("addr", _be32), ("port", _be16), ("_pad", ctypes.c_uint16)]

    @classmethod
    def make(cls, addr: str, port: int) -> BackendValue:
        return cls(addr=_ip(addr), port=port)

    def describe(self) -> str:
        return f"{_str(self.addr)}:{self.port}"


class AffinityKey(ctypes.Structure):
    """struct tby_nat_aff_key."""

    _fields_ = [("id", ctypes.c_uint32), ("client", _be32)]


class AffinityValue(ctypes.Structure):
    """struct tby_nat_aff_val."""

    _fields_ = [
        ("seen_ns", ctypes.c_uint64),
        ("addr", _be32),
        ("port", _be16),
        ("ordinal", ctypes.c_uint16),
    ]


class SourceRangeKey(ctypes.Structure):
    """struct tby_nat_src_key: LPM over (id, client CIDR); prefixlen counts the id's 32 bits."""

    _fields_ = [("prefixlen", ctypes.c_uint32), ("id", ctypes.c_uint32), ("addr", _be32)]

    @classmethod
    def make(cls, set_id: int, cidr: str) -> SourceRangeKey:
        net = ipaddress.IPv4Network(cidr, strict=False)
        return cls(prefixlen=32 + net.prefixlen, id=set_id, addr=int(net.network_address))


class Frontend6Key(ctypes.Structure):
    """struct tby_nat_fe6_key: an IPv6 ClusterIP frontend."""

    _fields_ = [
        ("addr", ctypes.c_uint8 * 16),
        ("port", _be16),
        ("proto", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8),
    ]

    @classmethod
    def make(cls, addr: str, port: int, protocol: str) -> Frontend6Key:
        key = cls(port=port, proto=PROTOCOLS[protocol])
        key.addr[:] = ipaddress.IPv6Address(addr).packed
        return key

    def describe(self) -> str:
        ip = ipaddress.IPv6Address(bytes(self.addr))
        return f"[{ip}]:{self.port}/{PROTOCOL_NAMES.get(self.proto, self.proto)}"


class Backend6Value(ctypes.Structure):
    """struct tby_nat_be6_val."""

    _fields_ = [("addr", ctypes.c_uint8 * 16), ("port", _be16), ("_pad", ctypes.c_uint16)]

    @classmethod
    def make(cls, addr: str, port: int) -> Backend6Value:
        value = cls(port=port)
        value.addr[:] = ipaddress.IPv6Address(addr).packed
        return value

    def describe(self) -> str:
        return f"[{ipaddress.IPv6Address(bytes(self.addr))}]:{self.port}"


FRONTENDS6_SPEC = MapSpec("tby_nat_fe6", BPF_MAP_TYPE_HASH, Frontend6Key, FrontendValue, 16384)
BACKENDS6_SPEC = MapSpec("tby_nat_be6", BPF_MAP_TYPE_HASH, BackendKey, Backend6Value, 65536)
FRONTENDS_SPEC = MapSpec("tby_nat_fe", BPF_MAP_TYPE_HASH, FrontendKey, FrontendValue, 131072)
BACKENDS_SPEC = MapSpec("tby_nat_be", BPF_MAP_TYPE_HASH, BackendKey, BackendValue, 524288)
AFFINITY_SPEC = MapSpec("tby_nat_aff", BPF_MAP_TYPE_LRU_HASH, AffinityKey, AffinityValue, 65536)
SOURCE_RANGES_SPEC = MapSpec(
    "tby_nat_src",
    BPF_MAP_TYPE_LPM_TRIE,
    SourceRangeKey,
    ctypes.c_uint32,
    16384,
    map_flags=BPF_F_NO_PREALLOC,
)

"""Conntrack (mirror of types.h): the two halves of every NAT pair, and the fragment map.

FWD is keyed by the tuple the client sent (client -> frontend) and holds the backend (and the
SNAT source, if any); REV is keyed by the translated tuple and holds the frontend to restore on
replies (and the original client when the forward packet was SNATed). EXT, on a backend's node,
is a flow an ingress node forwarded in the ext tunnel (frontend, ingress node, Tunnel or DSR).
All live in one LRU map.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
from dataclasses import dataclass

from tabby.bpf.maps.nat import PROTOCOL_NAMES
from tabby.bpf.maps.spec import BPF_MAP_TYPE_LRU_HASH, MapSpec

_be16 = ctypes.c_uint16.__ctype_be__
_be32 = ctypes.c_uint32.__ctype_be__


class CtType(enum.IntEnum):
    """TBY_CT_NAT_* of types.h."""

    NAT_FWD = 1
    NAT_REV = 2
    EXT = 3
    PLAIN = 4  # no NAT: a flow carrying a policy verdict only


class CtFlags(enum.IntFlag):
    """TBY_CTF_* of types.h: how a forwarded flow travels."""

    TUNNEL = 1 << 0
    DSR = 1 << 1
    MOVED = 1 << 2  # a local pair's flow now arriving through another ingress node


class PolVerdict(enum.IntFlag):
    """TBY_CTP_* of types.h: the ends whose NetworkPolicy admitted the flow on this node."""

    OUT = 1 << 0
    IN = 1 << 1


class TcpFlags(enum.IntFlag):
    """TBY_CT_SYN... of types.h: TCP flags seen on the flow."""

    SYN = 1 << 0
    SYNACK = 1 << 1
    FIN_FWD = 1 << 2
    FIN_REV = 1 << 3
    RST = 1 << 4


def _str(addr: int) -> str:
    return str(ipaddress.IPv4Address(addr))


class CtKey(ctypes.Structure):
    """struct tby_ct_key."""

    _fields_ = [
        ("src", _be32),
        ("dst", _be32),
        ("sport", _be16),
        ("dport", _be16),
        ("proto", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 3),
    ]

    @classmethod
    def make(cls, src: str, sport: int, dst: str, dport: int, proto: int) -> CtKey:
        return cls(
            src=int(ipaddress.IPv4Address(src)),
            dst=int(ipaddress.IPv4Address(dst)),
            sport=sport,
            dport=dport,
            proto=proto,
        )

    def describe(self) -> str:
        proto = PROTOCOL_NAMES.get(self.proto, str(self.proto))
        return f"{proto} {_str(self.src)}:{self.sport} -> {_str(self.dst)}:{self.dport}"


class CtValue(ctypes.Structure):
    """struct tby_ct_val."""

    _fields_ = [
        ("created_ns", ctypes.c_uint64),
        ("seen_ns", ctypes.c_uint64),
        ("type", ctypes.c_uint8),
        ("tcp", ctypes.c_uint8),
        ("pol", ctypes.c_uint16),
        ("nat_addr", _be32),
        ("nat_port", _be16),
        ("nat_sport", _be16),
        ("nat_saddr", _be32),
        ("tun_ip", _be32),
        ("flags", ctypes.c_uint32),
    ]


class FragKey(ctypes.Structure):
    """struct tby_frag_key."""

    _fields_ = [
        ("src", _be32),
        ("dst", _be32),
        ("id", _be16),
        ("proto", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8),
    ]


class FragValue(ctypes.Structure):
    """struct tby_frag_val."""

    _fields_ = [("sport", _be16), ("dport", _be16)]


class Ct6Key(ctypes.Structure):
    """struct tby_ct6_key: an IPv6 NodePort flow's tuple as it arrives (one per direction)."""

    _fields_ = [
        ("src", ctypes.c_uint8 * 16),
        ("dst", ctypes.c_uint8 * 16),
        ("sport", _be16),
        ("dport", _be16),
        ("proto", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 3),
    ]


class Ct6Value(ctypes.Structure):
    """struct tby_ct6_val: the tuple that packet is rewritten to."""

    _fields_ = [
        ("src", ctypes.c_uint8 * 16),
        ("dst", ctypes.c_uint8 * 16),
        ("sport", _be16),
        ("dport", _be16),
        ("_pad", ctypes.c_uint32),
    ]


CONNTRACK6_SPEC = MapSpec("tby_ct6", BPF_MAP_TYPE_LRU_HASH, Ct6Key, Ct6Value, 65536)
CONNTRACK_SPEC = MapSpec("tby_ct", BPF_MAP_TYPE_LRU_HASH, CtKey, CtValue, 512000)
FRAGS_SPEC = MapSpec("tby_frags", BPF_MAP_TYPE_LRU_HASH, FragKey, FragValue, 16384)


@dataclass(frozen=True)
class CtEntry:
    """One decoded conntrack half, as the CLI and the tests read it."""

    key: str
    type: str
    nat: str
    snat: str
    tcp: str
    age_s: float
    idle_s: float
    path: str  # the ext tunnel: where a forwarded flow went (ingress) or came from (backend)
    policy: str = ""  # PolVerdict names, "OUT|IN": which ends' NetworkPolicy admitted the flow

    @classmethod
    def decode(cls, key: CtKey, val: CtValue, now_ns: int) -> CtEntry:
        nat = f"{_str(val.nat_addr)}:{val.nat_port}"
        snat = f"{_str(val.nat_saddr)}:{val.nat_sport}" if val.nat_saddr else ""
        kind = CtType(val.type).name if val.type in (1, 2, 3, 4) else f"type{val.type}"
        return cls(
            key=key.describe(),
            type=kind,
            nat=nat,
            snat=snat,
            tcp=str(TcpFlags(val.tcp).name or "") if val.tcp else "",
            age_s=max(0.0, (now_ns - val.created_ns) / 1e9),
            idle_s=max(0.0, (now_ns - val.seen_ns) / 1e9),
            path=_path(val),
            policy=str(PolVerdict(val.pol & 3).name or "") if val.pol & 3 else "",
        )


def _path(val: CtValue) -> str:
    """A forwarded flow's path, in words: ``tunnel to 172.20.64.2 (DSR)``."""
    mode = " (DSR)" if val.flags & CtFlags.DSR else " (Tunnel)"
    if val.type == CtType.EXT:
        return f"from ingress {_str(val.tun_ip)}{mode}"
    if val.flags & CtFlags.TUNNEL:
        return f"tunnel to {_str(val.tun_ip)}{mode}"
    if val.flags & CtFlags.MOVED:
        return "local pair, now through another ingress node"
    return ""

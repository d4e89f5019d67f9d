"""NetworkPolicy maps (mirror of types.h): endpoints, peer and port LPM tries.

``tby_pol_ep`` maps a local pod's address to its policy set and isolation; ``tby_pol_peer`` and
``tby_pol_port`` map (set * 2 + direction, prefix) to the bitmap of rule classes holding it
(docs/design/policy.md). IPv6: ``tby_pol_ep6`` (a pod's IPv6 address -> the same value as its IPv4
address) and ``tby_pol_peer6`` (IPv6 peer prefixes under the same sets and class bits); ports are
shared. ``tby_pol_ct6`` holds the verdicts of isolated pods' IPv6 flows (written by BPF only).
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
from typing import Any

from tabby.bpf import libbpf
from tabby.bpf.maps.conntrack import Ct6Key
from tabby.bpf.maps.spec import (
    BPF_F_NO_PREALLOC,
    BPF_MAP_TYPE_HASH,
    BPF_MAP_TYPE_LPM_TRIE,
    BPF_MAP_TYPE_LRU_HASH,
    MapSpec,
)

_be16 = ctypes.c_uint16.__ctype_be__
_be32 = ctypes.c_uint32.__ctype_be__

DIR_IN = 0  # POL_DIR_IN of policy.h
DIR_OUT = 1


class PolicyFlags(enum.IntFlag):
    """TBY_POL_* of types.h."""

    ISO_IN = 1 << 0
    ISO_OUT = 1 << 1


class EndpointValue(ctypes.Structure):
    """struct tby_pol_ep_val."""

    _fields_ = [
        ("set", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("any_in", ctypes.c_uint64),
        ("any_out", ctypes.c_uint64),
    ]


class PeerKey(ctypes.Structure):
    """struct tby_pol_peer_key (LPM: 32 bits of set, then the address)."""

    _fields_ = [("prefixlen", ctypes.c_uint32), ("set", ctypes.c_uint32), ("addr", _be32)]

    @classmethod
    def make(cls, set_dir: int, cidr: str) -> PeerKey:
        """``cidr`` as calc emits it ("a.b.c.d/n", host bits clear), parsed without ipaddress
        (thousands per apply)."""
        addr, _, plen = cidr.partition("/")
        a, b, c, d = (int(x) for x in addr.split("."))
        value = (a << 24) | (b << 16) | (c << 8) | d
        return cls(prefixlen=32 + int(plen or 32), set=set_dir, addr=value)

    @property
    def cidr(self) -> str:
        return f"{ipaddress.IPv4Address(self.addr)}/{self.prefixlen - 32}"


class PortKey(ctypes.Structure):
    """struct tby_pol_port_key (LPM: set, protocol, padding = 48 bits, then the port)."""

    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("set", ctypes.c_uint32),
        ("proto", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8),
        ("port", _be16),
    ]

    @classmethod
    def make(cls, set_dir: int, proto: int, port: int, plen: int) -> PortKey:
        return cls(prefixlen=48 + plen, set=set_dir, proto=proto, port=port)


class Endpoint6Key(ctypes.Structure):
    """struct tby_pol_ep6_key."""

    _fields_ = [("addr", ctypes.c_uint8 * 16)]

    @classmethod
    def make(cls, addr: str) -> Endpoint6Key:
        key = cls()
        key.addr[:] = ipaddress.IPv6Address(addr).packed
        return key

    @property
    def ip(self) -> str:
        return str(ipaddress.IPv6Address(bytes(self.addr)))


class Peer6Key(ctypes.Structure):
    """struct tby_pol_peer6_key (LPM: 32 bits of set, then the 128-bit address)."""

    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("set", ctypes.c_uint32),
        ("addr", ctypes.c_uint8 * 16),
    ]

    @classmethod
    def make(cls, set_dir: int, cidr: str) -> Peer6Key:
        net = ipaddress.IPv6Network(cidr)
        key = cls(prefixlen=32 + net.prefixlen, set=set_dir)
        key.addr[:] = net.network_address.packed
        return key

    @property
    def cidr(self) -> str:
        return f"{ipaddress.IPv6Address(bytes(self.addr))}/{self.prefixlen - 32}"


class PolCt6Value(ctypes.Structure):
    """struct tby_pol_ct6_val (key: conntrack.Ct6Key)."""

    _fields_ = [
        ("seen_ns", ctypes.c_uint64),
        ("pol", ctypes.c_uint16),
        ("tcp", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 5),
    ]


def _addr_key(addr: str) -> Any:
    return _be32(int(ipaddress.IPv4Address(addr)))


def is_ipv6(cidr: str) -> bool:
    """calc emits IPv4 as dotted quads and IPv6 with colons."""
    return ":" in cidr


ENDPOINTS_SPEC = MapSpec("tby_pol_ep", BPF_MAP_TYPE_HASH, _be32, EndpointValue, 16384)
PEERS_SPEC = MapSpec(
    "tby_pol_peer", BPF_MAP_TYPE_LPM_TRIE, PeerKey, ctypes.c_uint64, 262144, BPF_F_NO_PREALLOC
)
PORTS_SPEC = MapSpec(
    "tby_pol_port", BPF_MAP_TYPE_LPM_TRIE, PortKey, ctypes.c_uint64, 65536, BPF_F_NO_PREALLOC
)

ENDPOINTS6_SPEC = MapSpec("tby_pol_ep6", BPF_MAP_TYPE_HASH, Endpoint6Key, EndpointValue, 16384)
PEERS6_SPEC = MapSpec(
    "tby_pol_peer6", BPF_MAP_TYPE_LPM_TRIE, Peer6Key, ctypes.c_uint64, 262144, BPF_F_NO_PREALLOC
)
POL_CT6_SPEC = MapSpec("tby_pol_ct6", BPF_MAP_TYPE_LRU_HASH, Ct6Key, PolCt6Value, 131072)
SPECS = (ENDPOINTS_SPEC, PEERS_SPEC, PORTS_SPEC, ENDPOINTS6_SPEC, PEERS6_SPEC)


class PolicyMaps:
    """Typed access to the policy maps of one node (IPv4 and IPv6)."""

    def __init__(
        self,
        endpoints: libbpf.Map[Any, Any],
        peers: libbpf.Map[Any, Any],
        ports: libbpf.Map[Any, Any],
        endpoints6: libbpf.Map[Any, Any],
        peers6: libbpf.Map[Any, Any],
    ) -> None:
        self.endpoints, self.peers, self.ports = endpoints, peers, ports
        self.endpoints6, self.peers6 = endpoints6, peers6

    @classmethod
    def open_pinned(cls, pin_root: str) -> PolicyMaps:
        return cls(*(s.open_pinned(pin_root) for s in SPECS))

    def close(self) -> None:
        for m in (self.endpoints, self.peers, self.ports, self.endpoints6, self.peers6):
            m.close()

    def set_endpoint(self, addr: str, value: EndpointValue) -> None:
        if is_ipv6(addr):
            self.endpoints6.update(Endpoint6Key.make(addr), value)
        else:
            self.endpoints.update(_addr_key(addr), value)

    def delete_endpoint(self, addr: str) -> None:
        if is_ipv6(addr):
            self.endpoints6.delete(Endpoint6Key.make(addr))
        else:
            self.endpoints.delete(_addr_key(addr))

    def endpoint(self, addr: str) -> EndpointValue | None:
        if is_ipv6(addr):
            value6: EndpointValue | None = self.endpoints6.lookup(Endpoint6Key.make(addr))
            return value6
        value: EndpointValue | None = self.endpoints.lookup(_addr_key(addr))
        return value

    def endpoint_items(self) -> dict[str, EndpointValue]:
        """Every endpoint entry, IPv4 and IPv6, by address."""
        out = {str(ipaddress.IPv4Address(int(k.value))): v for k, v in self.endpoints.items()}
        out.update({k.ip: v for k, v in self.endpoints6.items()})
        return out

    def write_batch(
        self, peers: list[tuple[PeerKey | Peer6Key, int]], ports: list[tuple[PortKey, int]]
    ) -> int:
        """Every entry in batch updates (LPM tries take BPF_MAP_UPDATE_BATCH: ~20x fewer
        syscalls than one update each); returns the entries written."""
        peers4 = [(k, v) for k, v in peers if isinstance(k, PeerKey)]
        peers6 = [(k, v) for k, v in peers if isinstance(k, Peer6Key)]
        n = 0
        for bpf_map, items in ((self.peers, peers4), (self.peers6, peers6), (self.ports, ports)):
            if items:
                n += bpf_map.update_batch(
                    [k for k, _ in items], [ctypes.c_uint64(v) for _, v in items]
                )
        return n

    def delete_batch(self, peers: list[PeerKey | Peer6Key], ports: list[PortKey]) -> int:
        """Delete the keys (batched; one at a time from the first absent key on)."""
        peers4 = [k for k in peers if isinstance(k, PeerKey)]
        peers6 = [k for k in peers if isinstance(k, Peer6Key)]
        n = 0
        keys: list[Any]
        for bpf_map, keys in ((self.peers, peers4), (self.peers6, peers6), (self.ports, ports)):
            if not keys:
                continue
            try:
                n += bpf_map.delete_batch(keys)
            except OSError:  # an absent key stops the batch: finish one by one
                n += sum(bpf_map.delete(k) for k in keys)
        return n

    def peer_keys(self) -> list[PeerKey | Peer6Key]:
        """IPv4 and IPv6 peer keys (both have ``set`` and ``cidr``)."""
        return [*self.peers.keys(), *self.peers6.keys()]

    def port_keys(self) -> list[PortKey]:
        return list(self.ports.keys())


def peer_key(set_dir: int, cidr: str) -> PeerKey | Peer6Key:
    """The key of a peer prefix in the map of its family."""
    return Peer6Key.make(set_dir, cidr) if is_ipv6(cidr) else PeerKey.make(set_dir, cidr)

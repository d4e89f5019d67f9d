"""NetworkPolicy maps (mirror of types.h): endpoints, peer and port LPM tries.

``tby_pol_ep`` maps a local pod's address to its policy set and isolation; ``tby_pol_peer`` and
``tby_pol_port`` map (set * 2 + direction, prefix) to the bitmap of rule classes holding it
(docs/design/policy.md).
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
from typing import Any

from tabby.bpf import libbpf
from tabby.bpf.maps.spec import BPF_F_NO_PREALLOC, BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LPM_TRIE, MapSpec

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


def _addr_key(addr: str) -> Any:
    return _be32(int(ipaddress.IPv4Address(addr)))


ENDPOINTS_SPEC = MapSpec("tby_pol_ep", BPF_MAP_TYPE_HASH, _be32, EndpointValue, 16384)
PEERS_SPEC = MapSpec(
    "tby_pol_peer", BPF_MAP_TYPE_LPM_TRIE, PeerKey, ctypes.c_uint64, 262144, BPF_F_NO_PREALLOC
)
PORTS_SPEC = MapSpec(
    "tby_pol_port", BPF_MAP_TYPE_LPM_TRIE, PortKey, ctypes.c_uint64, 65536, BPF_F_NO_PREALLOC
)


class PolicyMaps:
    """Typed access to the three policy maps of one node."""

    def __init__(
        self,
        endpoints: libbpf.Map[Any, Any],
        peers: libbpf.Map[Any, Any],
        ports: libbpf.Map[Any, Any],
    ) -> None:
        self.endpoints, self.peers, self.ports = endpoints, peers, ports

    @classmethod
    def open_pinned(cls, pin_root: str) -> PolicyMaps:
        return cls(*(s.open_pinned(pin_root) for s in (ENDPOINTS_SPEC, PEERS_SPEC, PORTS_SPEC)))

    def close(self) -> None:
        for m in (self.endpoints, self.peers, self.ports):
            m.close()

    def set_endpoint(self, addr: str, value: EndpointValue) -> None:
        self.endpoints.update(_addr_key(addr), value)

    def delete_endpoint(self, addr: str) -> None:
        self.endpoints.delete(_addr_key(addr))

    def endpoint(self, addr: str) -> EndpointValue | None:
        value: EndpointValue | None = self.endpoints.lookup(_addr_key(addr))
        return value

    def endpoint_items(self) -> dict[str, EndpointValue]:
        return {str(ipaddress.IPv4Address(int(k.value))): v for k, v in self.endpoints.items()}

    def put_peer(self, set_dir: int, cidr: str, bits: int) -> None:
        self.peers.update(PeerKey.make(set_dir, cidr), ctypes.c_uint64(bits))

    def put_port(self, set_dir: int, proto: int, port: int, plen: int, bits: int) -> None:
        self.ports.update(PortKey.make(set_dir, proto, port, plen), ctypes.c_uint64(bits))

    def write_batch(
        self, peers: list[tuple[PeerKey, int]], ports: list[tuple[PortKey, int]]
    ) -> int:
        """Every entry in two batch updates (LPM tries take BPF_MAP_UPDATE_BATCH: ~20x
        fewer syscalls than one update each); returns the entries written."""
        n = 0
        for bpf_map, items in ((self.peers, peers), (self.ports, ports)):
            if items:
                n += bpf_map.update_batch(
                    [k for k, _ in items], [ctypes.c_uint64(v) for _, v in items]
                )
        return n

    def delete_batch(self, peers: list[PeerKey], ports: list[PortKey]) -> int:
        """Delete the keys (batched; one at a time from the first absent key on)."""
        n = 0
        for bpf_map, keys in ((self.peers, peers), (self.ports, ports)):
            try:
                n += bpf_map.delete_batch(keys)
            except OSError:  # an absent key stops the batch: finish one by one
                n += sum(bpf_map.delete(k) for k in keys)
        return n

    def delete_peer(self, set_dir: int, cidr: str) -> None:
        self.peers.delete(PeerKey.make(set_dir, cidr))

    def delete_port(self, set_dir: int, proto: int, port: int, plen: int) -> None:
        self.ports.delete(PortKey.make(set_dir, proto, port, plen))

    def peer_keys(self) -> list[PeerKey]:
        return list(self.peers.keys())

    def port_keys(self) -> list[PortKey]:
        return list(self.ports.keys())

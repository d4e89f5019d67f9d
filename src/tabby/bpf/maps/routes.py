"""tby_routes: the LPM trie from destination CIDR to how it is reached (mirror of types.h);
tby_wl_devs: what the fast path writes into a frame for a local pod (its MACs, MTU).

A route says what an address is (local/remote workload, local/remote host, a tunnel address)
and how to reach it (host veth ifindex, next-hop node, encapsulation). The datapath uses it for
anti-spoofing (from-workload), tunnel selection (tunnel egress) and VTEP checks (tunnel ingress).
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
from typing import Any

from tabby.bpf import libbpf
from tabby.bpf.maps.spec import BPF_F_NO_PREALLOC, BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LPM_TRIE, MapSpec

_be32 = ctypes.c_uint32.__ctype_be__


class RouteFlags(enum.IntFlag):
    """TBY_RT_* of types.h (checked by tests/layout)."""

    LOCAL_WL = 1 << 0
    REMOTE_WL = 1 << 1
    LOCAL_HOST = 1 << 2
    REMOTE_HOST = 1 << 3
    ENCAP_VXLAN = 1 << 4
    ENCAP_IPIP = 1 << 5
    TUNNEL_ADDR = 1 << 6
    NAT_OUT = 1 << 7
    NETNS = 1 << 8


# describe() words, in the order they are printed
_KIND_WORDS = (
    (RouteFlags.LOCAL_WL, "local-workload"),
    (RouteFlags.REMOTE_WL, "remote-workload"),
    (RouteFlags.LOCAL_HOST, "local-host"),
    (RouteFlags.REMOTE_HOST, "remote-host"),
    (RouteFlags.TUNNEL_ADDR, "tunnel-addr"),
)
_ENCAP_WORDS = (
    (RouteFlags.ENCAP_VXLAN, "vxlan"),
    (RouteFlags.ENCAP_IPIP, "ipip"),
    (RouteFlags.NAT_OUT, "nat-outgoing"),
)


class RouteKey(ctypes.Structure):
    """struct tby_route_key: the bpf_lpm_trie_key layout for IPv4."""

    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", _be32)]

    @classmethod
    def for_cidr(cls, cidr: str) -> RouteKey:
        """``"100.96.0.0/26"`` or a bare address (/32); host bits set is an error."""
        net = ipaddress.IPv4Network(cidr, strict=True)
        return cls(prefixlen=net.prefixlen, addr=int(net.network_address))

    @property
    def cidr(self) -> str:
        return f"{ipaddress.IPv4Address(self.addr)}/{self.prefixlen}"


class RouteValue(ctypes.Structure):
    """struct tby_route_val."""

    _fields_ = [
        ("flags", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("next_hop", _be32),
        ("netnsid", ctypes.c_uint32),  # NETNS: the pod's netns id in this node's netns
    ]

    @classmethod
    def make(cls, flags: RouteFlags, ifindex: int = 0, next_hop: str | None = None) -> RouteValue:
        hop = int(ipaddress.IPv4Address(next_hop)) if next_hop else 0
        return cls(flags=int(flags), ifindex=ifindex, next_hop=hop)

    @classmethod
    def local_workload(cls, ifindex: int, netnsid: int | None = None) -> RouteValue:
        """A pod on this node behind the host-side veth ``ifindex``; ``netnsid``: its netns as
        this node's netns numbers it (the veth's IFLA_LINK_NETNSID), if known."""
        value = cls.make(RouteFlags.LOCAL_WL, ifindex=ifindex)
        return value.with_netnsid(netnsid)

    def with_netnsid(self, netnsid: int | None) -> RouteValue:
        """A copy carrying the pod's netns id (NETNS), or without one (None)."""
        value = RouteValue.from_buffer_copy(bytes(self))
        value.flags &= ~int(RouteFlags.NETNS)
        value.netnsid = 0
        if netnsid is not None:
            value.flags |= int(RouteFlags.NETNS)
            value.netnsid = netnsid
        return value

    @classmethod
    def remote_workload(cls, next_hop: str, encap: str | None = "vxlan") -> RouteValue:
        """A pod block of the node ``next_hop``; ``encap`` is "vxlan", "ipip" or None."""
        return cls.make(RouteFlags.REMOTE_WL | _encap_flag(encap), next_hop=next_hop)

    @classmethod
    def local_host(cls) -> RouteValue:
        return cls.make(RouteFlags.LOCAL_HOST)

    @classmethod
    def remote_host(cls, node_ip: str) -> RouteValue:
        """Another node's address (its VTEP, when tunnelling)."""
        return cls.make(RouteFlags.REMOTE_HOST, next_hop=node_ip)

    @classmethod
    def tunnel_addr(cls, next_hop: str, encap: str | None = "vxlan") -> RouteValue:
        """The tunnel-device address of the node ``next_hop``."""
        return cls.make(RouteFlags.TUNNEL_ADDR | _encap_flag(encap), next_hop=next_hop)

    @property
    def route_flags(self) -> RouteFlags:
        return RouteFlags(self.flags)

    @property
    def next_hop_ip(self) -> str | None:
        return str(ipaddress.IPv4Address(self.next_hop)) if self.next_hop else None

    def describe(self, cidr: str) -> str:
        """A human line, e.g. ``100.96.0.64/26 remote-workload via 172.20.64.12 vxlan``."""
        flags = self.route_flags
        words = [cidr] + [w for f, w in _KIND_WORDS if f in flags]
        if self.ifindex:
            words.append(f"dev #{self.ifindex}")
        if RouteFlags.NETNS in flags:
            words.append(f"netnsid {self.netnsid}")
        if self.next_hop:
            words.append(f"via {self.next_hop_ip}")
        words += [w for f, w in _ENCAP_WORDS if f in flags]
        unknown = self.flags & ~sum(f for f in RouteFlags)
        if unknown:
            words.append(f"flags+{unknown:#x}")
        return " ".join(words)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RouteValue):
            return NotImplemented
        return bytes(self) == bytes(other)

    def __hash__(self) -> int:
        return hash(bytes(self))

    def __repr__(self) -> str:
        return f"RouteValue({self.describe('*')})"


def _encap_flag(encap: str | None) -> RouteFlags:
    if encap is None:
        return RouteFlags(0)
    try:
        return {"vxlan": RouteFlags.ENCAP_VXLAN, "ipip": RouteFlags.ENCAP_IPIP}[encap]
    except KeyError:
        raise ValueError(f"unknown encapsulation {encap!r} (vxlan, ipip or None)") from None


ROUTES_SPEC = MapSpec(
    base_name="tby_routes",
    map_type=BPF_MAP_TYPE_LPM_TRIE,
    key_type=RouteKey,
    value_type=RouteValue,
    max_entries=65536,
    map_flags=BPF_F_NO_PREALLOC,
)


def _mac_bytes(mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return raw


def _mac_text(raw: Any) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))


class WlDevValue(ctypes.Structure):
    """struct tby_wl_dev_val: a local pod's veth as the fast path delivers to it (key: the
    host-side veth's ifindex)."""

    _fields_ = [
        ("mac", ctypes.c_uint8 * 6),  # the pod's interface
        ("host_mac", ctypes.c_uint8 * 6),  # the host-side veth, the pod's gateway
        ("mtu", ctypes.c_uint16),
        ("_pad", ctypes.c_uint16),
    ]

    @classmethod
    def make(cls, mac: str, host_mac: str, mtu: int) -> WlDevValue:
        value = cls(mtu=mtu)
        value.mac[:] = _mac_bytes(mac)
        value.host_mac[:] = _mac_bytes(host_mac)
        return value

    @property
    def pod_mac(self) -> str:
        return _mac_text(self.mac)

    @property
    def gateway_mac(self) -> str:
        """The host-side veth's: the pod's gateway, the frames' source."""
        return _mac_text(self.host_mac)

    def describe(self, ifindex: int) -> str:
        """``dev #12 mac 7e:..:1f via 52:..:fa mtu 1450``."""
        return f"dev #{ifindex} mac {self.pod_mac} via {self.gateway_mac} mtu {self.mtu}"


WL_DEVS_SPEC = MapSpec("tby_wl_devs", BPF_MAP_TYPE_HASH, ctypes.c_uint32, WlDevValue, 16384)


class RoutesMap:
    """Typed access to tby_routes, keyed by CIDR strings."""

    def __init__(self, bpf_map: libbpf.Map[Any, Any]) -> None:
        self.map = bpf_map

    def upsert(self, cidr: str, value: RouteValue) -> None:
        self.map.update(RouteKey.for_cidr(cidr), value)

    def delete(self, cidr: str) -> bool:
        """Remove the exact prefix; False if it was absent."""
        return self.map.delete(RouteKey.for_cidr(cidr))

    def get(self, cidr: str) -> RouteValue | None:
        """The exact prefix's value (not a longest-prefix match)."""
        value: RouteValue | None = self.map.lookup(RouteKey.for_cidr(cidr))
        return value

    def dump(self) -> dict[str, RouteValue]:
        """Every route; LPM tries have no batch lookup, so this walks get_next_key."""
        return {key.cidr: value for key, value in self.map.items()}

    def describe(self) -> list[str]:
        return [v.describe(c) for c, v in sorted(self.dump().items(), key=_cidr_order)]


def _cidr_order(item: tuple[str, RouteValue]) -> tuple[int, int]:
    net = ipaddress.IPv4Network(item[0])
    return int(net.network_address), net.prefixlen

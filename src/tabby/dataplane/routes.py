"""Routes: the BPF route map (what the programs know) and the node's kernel routes to peers.

The BPF map is adopted at start (dumped once) and then written as a delta. Kernel routes carry
tabby's routing protocol number, so only routes recognisably ours are ever replaced or swept.

An IP-in-IP block's kernel route points at the L2 next hop of its node: the node itself when it
is on-link, else the gateway the node's own route to it uses (the fabric router). tby_to_host
keeps the Ethernet header the kernel resolved and inserts the outer IP header, so that next hop
must be the one the outer packet needs. The route's MTU is the data interface's minus 20 (or
ipipMTU): forwarded and node-originated packets are clamped (PMTU) before the header is added.
"""

from __future__ import annotations

import ctypes
import logging
import socket
from typing import Any

from pyroute2 import IPRoute

from tabby.bpf import libbpf
from tabby.bpf.maps.routes import RouteFlags, RoutesMap, RouteValue, WlDevValue
from tabby.calc import names
from tabby.calc.mtu import pod_mtu
from tabby.calc.nodestate import KernelRoute, Route
from tabby.netlink import links

log = logging.getLogger(__name__)
RTPROT_TABBY = 88  # our routes in `ip route` show as "proto 88"


class RouteMapManager:
    """tby_routes, and tby_wl_devs beside it: a local pod's veth as the fast path delivers to
    it without the FIB (its MACs and MTU, read once per host veth with its netns id)."""

    def __init__(self, routes: RoutesMap, devs: libbpf.Map[Any, Any] | None = None) -> None:
        self.map = routes
        self.devs = devs
        self.programmed: dict[str, RouteValue] = dict(routes.dump())  # adopt what is pinned
        self.veths: dict[int, links.VethEnds | None] = {}  # host veth ifindex -> its two ends
        # adopted too: a restart rewrites nothing that is right
        self.devs_programmed: dict[int, bytes] = (
            {int(k.value): bytes(v) for k, v in devs.items()} if devs is not None else {}
        )

    def apply(self, desired: dict[str, Route]) -> list[str]:
        errors = []
        want: dict[str, RouteValue] = {}
        for cidr, route in desired.items():
            ifindex = 0
            if route.ifname:
                try:
                    ifindex = socket.if_nametoindex(route.ifname)
                except OSError:
                    errors.append(f"route {cidr}: interface {route.ifname} not found yet")
                    continue
            value = RouteValue.make(RouteFlags(route.flags), ifindex, route.next_hop)
            if ifindex and RouteFlags.LOCAL_WL in RouteFlags(route.flags):
                # the pod's netns id: nat.h resolves a port clash with the pod's own sockets
                ends = self._veth(ifindex)
                value = value.with_netnsid(ends.netnsid if ends else None)
            want[cidr] = value
        live = {value.ifindex for value in want.values()}
        self.veths = {i: ends for i, ends in self.veths.items() if i in live}
        for cidr, value in want.items():
            if cidr not in self.programmed or bytes(self.programmed[cidr]) != bytes(value):
                self.map.upsert(cidr, value)
                self.programmed[cidr] = value
        for cidr in set(self.programmed) - set(want):
            self.map.delete(cidr)
            del self.programmed[cidr]
        return errors + self._apply_devs()

    def _veth(self, ifindex: int) -> links.VethEnds | None:
        """A local pod's veth, asked once per host veth (two netlink requests)."""
        if ifindex not in self.veths:
            with links.rtnl() as ipr:
                self.veths[ifindex] = links.veth_ends(ipr, ifindex)
        return self.veths[ifindex]

    def _apply_devs(self) -> list[str]:
        """tby_wl_devs after the routes: a pod whose MAC could not be read has no entry, and
        the fast path asks the FIB for it as before."""
        if self.devs is None:
            return []
        want = {
            ifindex: bytes(WlDevValue.make(ends.peer_mac, ends.mac, ends.mtu))
            for ifindex, ends in self.veths.items()
            if ends is not None and ends.peer_mac
        }
        try:
            for ifindex, value in want.items():
                if self.devs_programmed.get(ifindex) != value:
                    self.devs.update(ctypes.c_uint32(ifindex), WlDevValue.from_buffer_copy(value))
                    self.devs_programmed[ifindex] = value
            for ifindex in [i for i in self.devs_programmed if i not in want]:
                self.devs.delete(ctypes.c_uint32(ifindex))
                del self.devs_programmed[ifindex]
        except OSError as e:
            return [f"local pod devices map: {e}"]
        return []


class KernelRouteManager:
    def __init__(self, data_iface: str = "eth0") -> None:
        self.data_iface = data_iface
        # cidr -> (route, how it was programmed: the resolved IP-in-IP next hop and MTU)
        self.programmed: dict[str, tuple[KernelRoute, tuple[str, int] | None]] = {}

    def apply(
        self, desired: dict[str, KernelRoute], tunnel_ip: str | None, ipip_mtu: int = 0
    ) -> list[str]:
        """``ipip_mtu``: FelixConfiguration ipipMTU; 0 derives it from the data interface."""
        errors = []
        with links.rtnl() as ipr:
            present = self._ours(ipr)
            tunnel_idx = links.ifindex(ipr, names.TUNNEL_DEVICE)
            data_idx = links.ifindex(ipr, self.data_iface)
            hops: dict[str, str | None] = {}  # peer -> L2 next hop, resolved once per apply
            if ipip_mtu == 0 and data_idx is not None:
                ipip_mtu = pod_mtu(links.link_mtu(ipr, self.data_iface) or 1500, "ipip")
            for cidr, route in desired.items():
                how: tuple[str, int] | None = None
                if route.encap == "ipip":
                    if route.gateway not in hops:
                        hops[route.gateway] = _l2_next_hop(ipr, route.gateway)
                    hop = hops[route.gateway]
                    if hop is None or data_idx is None:
                        errors.append(f"route {cidr}: no route to node {route.gateway}")
                        continue
                    how = (hop, ipip_mtu)
                if self.programmed.get(cidr) == (route, how) and cidr in present:
                    continue
                try:
                    if how is not None:
                        links.replace_route(
                            ipr,
                            dst=cidr,
                            gateway=how[0],
                            oif=data_idx,
                            metrics={"mtu": how[1]},
                            proto=RTPROT_TABBY,
                        )
                    elif route.encap == "vxlan":
                        if tunnel_idx is None:
                            errors.append(f"route {cidr}: {names.TUNNEL_DEVICE} missing")
                            continue
                        kw = dict(
                            dst=cidr, oif=tunnel_idx, scope=links.RT_SCOPE_LINK, proto=RTPROT_TABBY
                        )
                        if tunnel_ip:
                            kw["prefsrc"] = tunnel_ip
                        links.replace_route(ipr, **kw)
                    else:
                        links.replace_route(
                            ipr, dst=cidr, gateway=route.gateway, proto=RTPROT_TABBY
                        )
                    self.programmed[cidr] = (route, how)
                except Exception as e:  # noqa: BLE001 - netlink errors carry the reason
                    errors.append(f"route {cidr}: {e}")
            for cidr in present - set(desired):
                links.delete_route(ipr, dst=cidr, proto=RTPROT_TABBY)
                self.programmed.pop(cidr, None)
        return errors

    @staticmethod
    def _ours(ipr: IPRoute) -> set[str]:
        out = set()
        for r in ipr.route("dump", family=2, proto=RTPROT_TABBY):
            out.add(f"{r.get('RTA_DST')}/{r['dst_len']}")
        return out


def _l2_next_hop(ipr: IPRoute, peer: str) -> str | None:
    """Where the node's own route to ``peer`` goes first: its gateway, else ``peer`` (on-link)."""
    try:
        found = ipr.route("get", dst=peer)  # a lookup only: nothing is sent
    except Exception:  # noqa: BLE001 - unreachable: the caller reports it
        return None
    for r in found:
        if r.get("RTA_OIF"):
            return str(r.get("RTA_GATEWAY") or peer)
    return None

"""Routes: the BPF route map (what the programs know) and the node's kernel routes to peers.

The BPF map is adopted at start (dumped once) and then written as a delta. Kernel routes carry
tabby's routing protocol number, so only routes recognisably ours are ever replaced or swept.
"""

from __future__ import annotations

import logging
import socket

from pyroute2 import IPRoute

from tabby.bpf.maps.routes import RouteFlags, RoutesMap, RouteValue
from tabby.calc import names
from tabby.calc.nodestate import KernelRoute, Route
from tabby.netlink import links

log = logging.getLogger(__name__)
RTPROT_TABBY = 88  # our routes in `ip route` show as "proto 88"


class RouteMapManager:
    def __init__(self, routes: RoutesMap) -> None:
        self.map = routes
        self.programmed: dict[str, RouteValue] = dict(routes.dump())  # adopt what is pinned

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
            want[cidr] = RouteValue.make(RouteFlags(route.flags), ifindex, route.next_hop)
        for cidr, value in want.items():
            if cidr not in self.programmed or bytes(self.programmed[cidr]) != bytes(value):
                self.map.upsert(cidr, value)
                self.programmed[cidr] = value
        for cidr in set(self.programmed) - set(want):
            self.map.delete(cidr)
            del self.programmed[cidr]
        return errors


class KernelRouteManager:
    def __init__(self) -> None:
        self.programmed: dict[str, KernelRoute] = {}

    def apply(self, desired: dict[str, KernelRoute], tunnel_ip: str | None) -> list[str]:
        errors = []
        with links.rtnl() as ipr:
            present = self._ours(ipr)
            tunnel_idx = links.ifindex(ipr, names.TUNNEL_DEVICE)
            for cidr, route in desired.items():
                if self.programmed.get(cidr) == route and cidr in present:
                    continue
                try:
                    if route.encap == "vxlan":
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
                    self.programmed[cidr] = route
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

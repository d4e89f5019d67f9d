"""The node's one collect-metadata VXLAN device, ``tby.vxlan``.

It carries no per-peer state: tby_tun_egress sets each packet's tunnel key (VNI, remote node)
from the route map. It is NOARP, so the kernel needs no neighbour per peer; the receiver's
tby_tun_ingress accepts such frames (addressed to the sender's own MAC) as PACKET_HOST.
Its address is the node's tunnel address from IPAM, the source of node -> remote pod traffic,
so replies come back through the tunnel.
"""

from __future__ import annotations

import logging
import os

from pyroute2 import IPRoute

from tabby.calc import names
from tabby.calc.mtu import pod_mtu
from tabby.netlink import links

log = logging.getLogger(__name__)


class TunnelManager:
    def __init__(self, data_iface: str) -> None:
        self.data_iface = data_iface

    def apply(
        self, wanted: bool, vni: int, port: int, tunnel_ip: str | None, mtu: int = 0
    ) -> list[str]:
        """``mtu``: FelixConfiguration vxlanMTU; 0 derives it from the data interface."""
        with links.rtnl() as ipr:
            idx = links.ifindex(ipr, names.TUNNEL_DEVICE)
            if not wanted:
                if idx is not None:
                    links.delete_link(ipr, names.TUNNEL_DEVICE)
                    log.info("removed %s", names.TUNNEL_DEVICE)
                return []
            data_mtu = links.link_mtu(ipr, self.data_iface) or 1500
            mtu = mtu or pod_mtu(data_mtu, "vxlan")
            if idx is not None and not self._matches(ipr, idx, port):
                links.delete_link(ipr, names.TUNNEL_DEVICE)
                idx = None
            if idx is None:
                ipr.link(
                    "add",
                    ifname=names.TUNNEL_DEVICE,
                    kind="vxlan",
                    vxlan_collect_metadata=1,
                    vxlan_port=port,
                    vxlan_learning=0,
                )
                idx = links.ifindex(ipr, names.TUNNEL_DEVICE)
                assert idx is not None
                log.info("created %s (port %d, mtu %d)", names.TUNNEL_DEVICE, port, mtu)
            ipr.link("set", index=idx, mtu=mtu, flags=links.IFF_NOARP, mask=links.IFF_NOARP)
            ipr.link("set", index=idx, state="up")
            links.write_sysctl(f"net/ipv4/conf/{names.TUNNEL_DEVICE}/rp_filter", "0")
            # IPv4 only (IPv6 pools are never encapsulated): without this the kernel sends
            # its own link-local IPv6 (MLD reports at link up and whenever IPv6 forwarding is
            # switched), which tby_tun_egress can only drop, counted as drop_no_route
            if os.path.isdir(
                f"/proc/sys/net/ipv6/conf/{names.TUNNEL_DEVICE}"
            ):  # a kernel with IPv6
                links.write_sysctl(f"net/ipv6/conf/{names.TUNNEL_DEVICE}/disable_ipv6", "1")
            self._set_address(ipr, idx, tunnel_ip)
        return []

    @staticmethod
    def _matches(ipr: IPRoute, idx: int, port: int) -> bool:
        info = ipr.link("get", index=idx)[0].get(("IFLA_LINKINFO", "IFLA_INFO_DATA"))
        return info is not None and info.get("IFLA_VXLAN_PORT") == port

    @staticmethod
    def _set_address(ipr: IPRoute, idx: int, tunnel_ip: str | None) -> None:
        have = {a.get("IFA_ADDRESS") for a in ipr.get_addr(index=idx, family=2)}
        for addr in have - {tunnel_ip}:
            ipr.addr("del", index=idx, address=addr, prefixlen=32)
        if tunnel_ip and tunnel_ip not in have:
            ipr.addr("add", index=idx, address=tunnel_ip, prefixlen=32)

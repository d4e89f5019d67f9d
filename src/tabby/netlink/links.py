"""Small pyroute2 helpers used by the CNI plugin, the agent and the lab.

Every helper acts in the calling thread's network namespace (enter it with netns.enter_netns);
an IPRoute socket is opened after the switch, never carried across namespaces.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255  # in a delete: match a route of any scope (what `ip route del` sends)
RTNH_F_ONLINK = 4
IFF_NOARP = 0x80
IFA_F_NODAD = 0x02  # an IPv6 address usable at once, without duplicate address detection
ENOENT, EEXIST, ENODEV = 2, 17, 19


@contextmanager
def rtnl() -> Iterator[IPRoute]:
    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def ifindex(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


SIOCGIFMTU = 0x8921  # linux/sockios.h


def mtu_of(name: str) -> int | None:
    """The interface's MTU in the calling thread's netns (one ioctl, no netlink dump)."""
    req = struct.pack("16si", name.encode()[:15], 0)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return int(struct.unpack("16si", fcntl.ioctl(s, SIOCGIFMTU, req))[1])
    except OSError:
        return None


def link_attr(ipr: IPRoute, index: int, attr: str) -> object:
    return ipr.link("get", index=index)[0].get(attr)


@dataclass(frozen=True)
class VethEnds:
    """A host-side veth and its peer, as the calling thread's netns sees them."""

    netnsid: int | None  # the peer's netns (IFLA_LINK_NETNSID); None: no peer elsewhere
    mac: str  # the host-side veth's
    mtu: int
    peer_mac: str | None  # the peer's (the pod's interface), None if it could not be read


def veth_ends(ipr: IPRoute, index: int) -> VethEnds | None:
    """A host-side veth and its peer (two netlink requests); None if the link is gone.

    The netns id is assigned by the kernel when it first reports the link. The peer is asked
    for in its own netns by that id (IFLA_IF_NETNSID, kernel 4.20+), without entering it."""
    try:
        link = ipr.link("get", index=index)[0]
    except NetlinkError:
        return None
    nsid, peer = link.get("IFLA_LINK_NETNSID"), link.get("IFLA_LINK")
    peer_mac = None
    if nsid is not None and peer:
        try:
            found = ipr.link("get", index=int(peer), IFLA_IF_NETNSID=int(nsid))
            peer_mac = str(found[0].get("IFLA_ADDRESS"))
        except NetlinkError:
            pass
    return VethEnds(
        None if nsid is None else int(nsid),
        str(link.get("IFLA_ADDRESS")),
        int(link.get("IFLA_MTU")),
        peer_mac,
    )


def link_mtu(ipr: IPRoute, name: str) -> int | None:
    idx = ifindex(ipr, name)
    return None if idx is None else int(str(link_attr(ipr, idx, "IFLA_MTU")))


def default_route_device(ipr: IPRoute) -> str | None:
    """The interface of the IPv4 default route: the node's data interface when nothing says else."""
    for route in ipr.route("get", dst="1.1.1.1"):  # a lookup only: nothing is sent
        oif = route.get("RTA_OIF")
        if oif:
            return str(link_attr(ipr, int(oif), "IFLA_IFNAME"))
    return None


SO_NETNS_COOKIE = 71  # linux/socket.h (Python's socket module lacks it)


def netns_cookie() -> int:
    """The cookie of the calling thread's network namespace (what bpf_get_netns_cookie says)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def write_sysctl(path: str, value: str) -> None:
    """Write /proc/sys/<path> (slash-separated: interface names may hold dots) in this netns."""
    fd = os.open("/proc/sys/" + path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def delete_link(ipr: IPRoute, name: str) -> bool:
    idx = ifindex(ipr, name)
    if idx is None:
        return False
    try:
        ipr.link("del", index=idx)
    except NetlinkError as e:
        if e.code != ENODEV:
            raise
    return True


def replace_route(ipr: IPRoute, **kw: object) -> None:
    ipr.route("replace", **kw)


def delete_route(ipr: IPRoute, **kw: object) -> None:
    """Delete the route matching ``kw``; already gone is fine. Without a scope, any scope
    matches: pyroute2 would send universe, which never matches a scope-link route (the kernel
    answers ESRCH, taken for "already gone", and the route stayed)."""
    kw.setdefault("scope", RT_SCOPE_NOWHERE)
    try:
        ipr.route("del", **kw)
    except NetlinkError as e:
        if e.code not in (ENOENT, 3):  # ESRCH: already gone
            raise

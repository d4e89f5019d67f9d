"""What ADD, DEL and CHECK do to the node: a veth per pod, a /32 each way, an address from IPAM.

Calico's layout: the pod gets ``<ip>/32`` on its interface and a default route via 169.254.1.1,
which the host side answers for by proxy ARP; the node gets ``<ip>/32 dev tby<hash>``.
With an IPv6 pool the pod is dual-stack: it also gets ``<ip6>/128`` and a default route via
fe80::ecee:eeff:feee:eeee, an address of the host-side veth itself (so the node answers the
pod's neighbor solicitation), and the node gets ``<ip6>/128 dev tby<hash>``; no duplicate
address detection on either side (IPAM hands an address out once).
ADD is idempotent for one container id (IPAM returns the same address) and undoes its own
partial work when a later step fails, so a failed ADD leaves nothing behind.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from tabby.calc import names
from tabby.calc.mtu import workload_mtu
from tabby.cni.ipam import BlockIPAM, IPAMError
from tabby.cni.plugin import (
    E_INVALID_ENV,
    E_IO,
    E_TRY_AGAIN,
    E_UNKNOWN_CONTAINER,
    CNIError,
    Request,
)
from tabby.datastore import open_datastore
from tabby.datastore.api import DatastoreError
from tabby.netlink import links
from tabby.netlink.netns import enter_netns, netns_path


def _ipam(req: Request) -> BlockIPAM:
    try:
        return BlockIPAM(open_datastore(req.config["datastore"]))
    except DatastoreError as e:
        raise CNIError(E_TRY_AGAIN, f"datastore unavailable: {e}") from e


def _mtu(req: Request, ipam: BlockIPAM) -> int:
    """The config's ``mtu``, else Calico's auto MTU: the data interface's minus the overhead of
    the encapsulations the pools and FelixConfiguration enable (or their configured MTUs)."""
    configured = int(req.config.get("mtu", 0) or 0)
    if configured:
        return configured
    with links.rtnl() as ipr:
        dev = req.config.get("dataInterface") or links.default_route_device(ipr)
        data_mtu = links.link_mtu(ipr, dev) if dev else None
    felix = ipam.ds.get("FelixConfiguration", "default") or {}
    pools = ipam.ds.list("IPPool")[0]
    return workload_mtu(data_mtu or 1500, felix.get("spec", {}) or {}, pools)


def add(req: Request) -> dict[str, Any]:
    path = netns_path(req.netns)
    if not os.path.exists(path):
        raise CNIError(E_INVALID_ENV, f"CNI_NETNS {req.netns}: no such network namespace")
    ipam = _ipam(req)
    try:
        ip = ipam.assign(req.config["nodename"], req.handle)
        ip6 = ipam.assign(req.config["nodename"], req.handle, 6) if ipam.has_pool(6) else None
    except (IPAMError, DatastoreError) as e:
        ipam.release(req.handle)
        raise CNIError(E_TRY_AGAIN, f"IPAM: {e}") from e
    host = names.host_ifname(req.pod_namespace, req.pod_name)
    try:
        host_mac, pod_mac = _wire(req, path, host, ip, _mtu(req, ipam), ip6)
    except Exception as e:
        _unwire(host)
        ipam.release(req.handle)
        raise CNIError(E_IO, f"wiring {req.pod_namespace}/{req.pod_name} failed: {e}") from e
    ips = [{"address": f"{ip}/32", "gateway": names.POD_GATEWAY, "interface": 1}]
    routes = [{"dst": "0.0.0.0/0", "gw": names.POD_GATEWAY}]
    if ip6:
        ips.append({"address": f"{ip6}/128", "gateway": names.POD_GATEWAY6, "interface": 1})
        routes.append({"dst": "::/0", "gw": names.POD_GATEWAY6})
    return {
        "cniVersion": req.config["cniVersion"],
        "interfaces": [
            {"name": host, "mac": host_mac},
            {"name": req.ifname, "mac": pod_mac, "sandbox": path},
        ],
        "ips": ips,
        "routes": routes,
        "dns": {},
    }


def _wire(
    req: Request, path: str, host: str, ip: str, mtu: int, ip6: str | None = None
) -> tuple[str, str]:
    with links.rtnl() as ipr:
        if links.ifindex(ipr, host) is not None:
            links.delete_link(ipr, host)  # a stale veth of an earlier sandbox of this pod
        fd = os.open(path, os.O_RDONLY)
        try:
            ipr.link(
                "add",
                ifname=host,
                kind="veth",
                mtu=mtu,
                peer={"ifname": req.ifname, "net_ns_fd": fd, "mtu": mtu},
            )
        finally:
            os.close(fd)
        idx = links.ifindex(ipr, host)
        assert idx is not None
        for knob, value in (("proxy_arp", "1"), ("rp_filter", "0"), ("forwarding", "1")):
            links.write_sysctl(f"net/ipv4/conf/{host}/{knob}", value)
        links.write_sysctl(f"net/ipv4/neigh/{host}/proxy_delay", "0")
        if ip6:
            links.write_sysctl(f"net/ipv6/conf/{host}/accept_dad", "0")
            links.write_sysctl(f"net/ipv6/conf/{host}/forwarding", "1")
            ipr.addr(
                "add",
                index=idx,
                address=names.POD_GATEWAY6,
                prefixlen=64,
                flags=links.IFA_F_NODAD,
            )
        ipr.link("set", index=idx, state="up")
        links.replace_route(ipr, dst=f"{ip}/32", oif=idx, scope=links.RT_SCOPE_LINK)
        if ip6:
            links.replace_route(ipr, dst=f"{ip6}/128", oif=idx, family=socket.AF_INET6)
        host_mac = str(links.link_attr(ipr, idx, "IFLA_ADDRESS"))
    with enter_netns(path), links.rtnl() as pod:
        lo = links.ifindex(pod, "lo")
        if lo is not None:
            pod.link("set", index=lo, state="up")
        pidx = links.ifindex(pod, req.ifname)
        assert pidx is not None
        pod.addr("add", index=pidx, address=ip, prefixlen=32)
        if ip6:
            links.write_sysctl(f"net/ipv6/conf/{req.ifname}/accept_dad", "0")
            pod.addr("add", index=pidx, address=ip6, prefixlen=128, flags=links.IFA_F_NODAD)
        pod.link("set", index=pidx, state="up")
        pod.route("add", dst=f"{names.POD_GATEWAY}/32", oif=pidx, scope=links.RT_SCOPE_LINK)
        pod.route("add", dst="0.0.0.0/0", gateway=names.POD_GATEWAY, oif=pidx)
        if ip6:
            pod.route(
                "add", dst="::/0", gateway=names.POD_GATEWAY6, oif=pidx, family=socket.AF_INET6
            )
        pod_mac = str(links.link_attr(pod, pidx, "IFLA_ADDRESS"))
    return host_mac, pod_mac


def _unwire(host: str) -> None:
    try:
        with links.rtnl() as ipr:
            links.delete_link(ipr, host)
    except NetlinkError:
        pass


def delete(req: Request) -> None:
    """Release the address and remove the veth; missing pieces are fine (DEL is idempotent)."""
    try:
        _ipam(req).release(req.handle)
    except (IPAMError, DatastoreError) as e:
        raise CNIError(E_TRY_AGAIN, f"IPAM release: {e}") from e
    _unwire(names.host_ifname(req.pod_namespace, req.pod_name))


def check(req: Request) -> None:
    """Error codes: 3 (unknown container) only when nothing is held for it, so the runtime may
    skip DEL; broken wiring while the address is still allocated is 5, which needs a DEL."""
    path = netns_path(req.netns)
    if not os.path.exists(path):
        raise CNIError(E_INVALID_ENV, f"CNI_NETNS {req.netns}: no such network namespace")
    try:
        ip = _ipam(req).lookup(req.handle)
    except DatastoreError as e:
        raise CNIError(E_TRY_AGAIN, f"IPAM lookup: {e}") from e
    if ip is None:
        raise CNIError(E_UNKNOWN_CONTAINER, f"no address is allocated to {req.handle}")
    host = names.host_ifname(req.pod_namespace, req.pod_name)
    with links.rtnl() as ipr:
        idx = links.ifindex(ipr, host)
        if idx is None:
            raise CNIError(E_IO, f"host interface {host} is missing")
        if not ipr.route("get", dst=ip) or ipr.route("get", dst=ip)[0].get("RTA_OIF") != idx:
            raise CNIError(E_IO, f"the node's route to {ip} does not point at {host}")
    with enter_netns(path), links.rtnl() as pod:
        pidx = links.ifindex(pod, req.ifname)
        if pidx is None:
            raise CNIError(E_IO, f"{req.ifname} is missing in {req.netns}")
        addrs = [a.get("IFA_ADDRESS") for a in pod.get_addr(index=pidx)]
        if ip not in addrs:
            raise CNIError(E_IO, f"{req.ifname} in {req.netns} lacks {ip}")

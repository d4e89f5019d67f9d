"""Builds the lab's namespaces and wires: fabric (two bridges + router), nodes, external client.

Only namespaces named ``<lab>-*`` are created or removed; the root namespace is never touched
(no address, route or link is added there; veth pairs are created inside the fabric namespace).
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess

from pyroute2 import IPRoute

from tabby.lab import topology
from tabby.lab.topology import LabPlan, NodePlan
from tabby.netlink import links
from tabby.netlink.netns import enter_netns, netns_exists


def add_netns(name: str) -> None:
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, text=True)
    with enter_netns(name), links.rtnl() as ipr:
        lo = links.ifindex(ipr, "lo")
        ipr.link("set", index=lo, state="up")
        # The lab's IPv6 addresses are planned (no duplicates on its bridges): no duplicate
        # address detection, so an address is usable (and BIRD can bind it) at once.
        for conf in ("all", "default"):
            links.write_sysctl(f"net/ipv6/conf/{conf}/accept_dad", "0")


def _add_addr6(ipr: IPRoute, idx: int | None, address: str, prefixlen: int) -> None:
    ipr.addr("add", index=idx, address=address, prefixlen=prefixlen, flags=links.IFA_F_NODAD)


def del_netns(name: str) -> None:
    if netns_exists(name):
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def lab_netns(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


def build_fabric(plan: LabPlan) -> None:
    add_netns(plan.fabric_netns)
    with enter_netns(plan.fabric_netns), links.rtnl() as ipr:
        for sub in plan.subnets:
            net = ipaddress.ip_network(sub.cidr)
            ipr.link("add", ifname=sub.bridge, kind="bridge")
            bridge = links.ifindex(ipr, sub.bridge)
            ipr.link("set", index=bridge, mtu=plan.fabric_mtu, state="up")
            # The router's leg is a veth plugged into the bridge, not the bridge device itself:
            # a bridge device has no hw_enc_features, so the router's output through it would
            # segment every encapsulated GSO packet (IP-in-IP, VXLAN) in software, a cost no
            # real router adds (measured: 5,700 aggregates in, 217,000 segments out).
            leg = router_leg(sub.bridge)
            ipr.link(
                "add",
                ifname=leg,
                kind="veth",
                mtu=plan.fabric_mtu,
                peer={"ifname": "p" + leg, "mtu": plan.fabric_mtu},
            )
            port = links.ifindex(ipr, "p" + leg)
            ipr.link("set", index=port, master=bridge, state="up")
            idx = links.ifindex(ipr, leg)
            ipr.addr(
                "add", index=idx, address=str(net.network_address + 1), prefixlen=net.prefixlen
            )
            if plan.ipv6:
                _add_addr6(ipr, idx, sub.gateway6, 64)
            ipr.link("set", index=idx, state="up")
        links.write_sysctl("net/ipv4/ip_forward", "1")
        if plan.ipv6:
            links.write_sysctl("net/ipv6/conf/all/forwarding", "1")
        # The bridges stand for switches, which run no IP hooks: br_netfilter (on by default
        # in a new netns) would take every bridged frame through the IP prerouting hooks.
        for table in ("iptables", "ip6tables", "arptables"):
            links.write_sysctl(f"net/bridge/bridge-nf-call-{table}", "0")
        # LoadBalancer ingress IPs and externalIPs are announced by every node, as a BGP-speaking
        # load balancer would: one ECMP route (hashed per source/destination address pair).
        hops = [{"gateway": node.ip} for node in plan.nodes]
        if len(hops) == 1:
            ipr.route("add", dst=topology.LOADBALANCER_CIDR, gateway=hops[0]["gateway"])
        else:
            ipr.route("add", dst=topology.LOADBALANCER_CIDR, multipath=hops)


def router_leg(bridge: str) -> str:
    """The router's interface on the subnet of ``bridge`` (``br-a`` -> ``rt-a``)."""
    return "rt-" + bridge.removeprefix("br-")


def set_router_rp_filter(plan: LabPlan, strict: bool) -> None:
    """The router's reverse-path check, standing in for a cloud network's source/destination
    check: strict, it drops a packet whose source it would not route back out of the interface
    the packet came in on (DSR replies carrying another subnet's node address). Off by default."""
    with enter_netns(plan.fabric_netns):
        links.write_sysctl("net/ipv4/conf/all/rp_filter", "1" if strict else "0")


def build_external(plan: LabPlan) -> None:
    """The "internet" client behind the router, 203.0.113.10."""
    add_netns(plan.external_netns)
    with enter_netns(plan.fabric_netns), links.rtnl() as ipr:
        ipr.link(
            "add",
            ifname="ext",
            kind="veth",
            peer={"ifname": "eth0", "net_ns_fd": f"/run/netns/{plan.external_netns}"},
        )
        idx = links.ifindex(ipr, "ext")
        ipr.addr("add", index=idx, address=topology.EXTERNAL_ROUTER_IP, prefixlen=24)
        ipr.link("set", index=idx, state="up")
    with enter_netns(plan.external_netns), links.rtnl() as ipr:
        idx = links.ifindex(ipr, "eth0")
        ipr.addr("add", index=idx, address=topology.EXTERNAL_CLIENT_IP, prefixlen=24)
        ipr.link("set", index=idx, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=topology.EXTERNAL_ROUTER_IP)


def build_node(plan: LabPlan, node: NodePlan) -> None:
    add_netns(node.netns)
    with enter_netns(plan.fabric_netns), links.rtnl() as ipr:
        ipr.link(
            "add",
            ifname=node.fabric_port,
            kind="veth",
            mtu=plan.fabric_mtu,
            peer={
                "ifname": "eth0",
                "net_ns_fd": f"/run/netns/{node.netns}",
                "mtu": plan.fabric_mtu,
            },
        )
        idx = links.ifindex(ipr, node.fabric_port)
        ipr.link("set", index=idx, master=links.ifindex(ipr, node.bridge), state="up")
    with enter_netns(node.netns), links.rtnl() as ipr:
        idx = links.ifindex(ipr, "eth0")
        ipr.addr("add", index=idx, address=node.ip, prefixlen=node.prefixlen)
        ipr.link("set", index=idx, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=node.gateway)
        links.write_sysctl("net/ipv4/ip_forward", "1")
        links.write_sysctl("net/ipv4/conf/all/rp_filter", "0")
        if node.ip6 and node.gateway6:
            _add_addr6(ipr, idx, node.ip6, 64)
            ipr.route("add", dst="::/0", gateway=node.gateway6, family=socket.AF_INET6)
            links.write_sysctl("net/ipv6/conf/all/forwarding", "1")

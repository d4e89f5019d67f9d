"""A kube-proxy node beside the lab's tabby nodes, for side-by-side comparisons (the seed demo).

One namespace, ``<lab>-kubeproxy``, plugged into the first subnet's bridge like a node, runs
kube-proxy's own iptables rules (``kubeproxy_rules.iptables_restore`` through the real
iptables-restore) for the Services it is given and no tabby program. External traffic to its
NodePorts is DNATed to an endpoint and masqueraded to this node's address, as kube-proxy does for
``externalTrafficPolicy: Cluster``: the backend sees the node, not the client. It sits in the
subnet of one tabby node (``via``) and reaches the endpoints (lab pods) by plain routes through
it: tabby nodes route pods, theirs and the others'. ``Lab.down`` removes the namespace with the
lab's others (same prefix).
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Sequence

from tabby.lab import fabric, kubeproxy_rules
from tabby.lab.kubeproxy_rules import KubeServicePort
from tabby.lab.topology import LabPlan, NodePlan
from tabby.netlink import links
from tabby.netlink.netns import enter_netns, netns_exists

NAME = "kubeproxy"
HOST_OFFSET = 9  # the subnet's address .9: below the tabby nodes (.11 ...), above the router


def plan_of(plan: LabPlan, via: NodePlan) -> NodePlan:
    """Where the kube-proxy node sits: address .9 of ``via``'s subnet."""
    net = ipaddress.ip_network(via.subnet)
    return NodePlan(
        name=NAME,
        netns=f"{plan.name}-{NAME}",
        subnet=via.subnet,
        bridge=via.bridge,
        ip=str(net.network_address + HOST_OFFSET),
        prefixlen=net.prefixlen,
        gateway=via.gateway,
        fabric_port=NAME,
    )


def up(
    plan: LabPlan, services: Sequence[KubeServicePort], via: NodePlan, cluster_cidr: str
) -> NodePlan:
    """Builds (or rebuilds) the node: its link, a route to each endpoint via ``via``, and
    kube-proxy's rules for ``services``."""
    node = plan_of(plan, via)
    if netns_exists(node.netns):
        down(plan)
    fabric.build_node(plan, node)
    with enter_netns(node.netns), links.rtnl() as ipr:
        for sp in services:
            for ip, _ in sp.endpoints:
                links.replace_route(ipr, dst=f"{ip}/32", gateway=via.ip)
    rules = kubeproxy_rules.iptables_restore(services, cluster_cidr=cluster_cidr)
    done = subprocess.run(
        ["nsenter", f"--net=/run/netns/{node.netns}", "iptables-restore", "--noflush"],
        input=rules,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"iptables-restore in {node.netns}: {done.stderr.strip()[:300]}")
    return node


def down(plan: LabPlan) -> None:
    """Removes the node's namespace and so its link (idempotent)."""
    netns = f"{plan.name}-{NAME}"
    if netns_exists(netns):
        fabric.del_netns(netns)

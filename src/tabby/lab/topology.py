"""The lab's address plan as data (DESIGN.md, kOps defaults). Pure: no I/O.

fabric netns: bridges br-a (172.20.32.0/19) and br-b (172.20.64.0/19) joined by routing in the
same namespace (the router), and a leg to the external client (203.0.113.0/24).
Nodes alternate between the two subnets, so node1 -> node2 crosses the router.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

SUBNETS = ("172.20.32.0/19", "172.20.64.0/19")
BRIDGES = ("br-a", "br-b")
POOL_CIDR = "100.96.0.0/11"
SERVICE_CIDR = "100.64.0.0/13"
EXTERNAL_CIDR = "203.0.113.0/24"
EXTERNAL_ROUTER_IP = "203.0.113.1"
EXTERNAL_CLIENT_IP = "203.0.113.10"
MAX_NODES = 8
NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")


class TopologyError(ValueError):
    pass


@dataclass(frozen=True)
class NodePlan:
    name: str
    netns: str
    subnet: str
    bridge: str
    ip: str
    prefixlen: int
    gateway: str
    fabric_port: str  # the veth end plugged into the bridge, in the fabric namespace


@dataclass(frozen=True)
class LabPlan:
    name: str
    nodes: tuple[NodePlan, ...]

    @property
    def fabric_netns(self) -> str:
        return f"{self.name}-fabric"

    @property
    def external_netns(self) -> str:
        return f"{self.name}-ext"

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.name == name:
                return n
        raise TopologyError(f"lab {self.name} has no node {name!r}")

    def pod_netns(self, namespace: str, pod: str) -> str:
        return f"{self.name}-pod-{namespace}-{pod}"

    def netns_prefix(self) -> str:
        return f"{self.name}-"


def plan(name: str, nodes: int = 3) -> LabPlan:
    if not NAME_RE.match(name):
        raise TopologyError(f"lab name {name!r}: use 1-12 lowercase letters/digits, letter first")
    if not 1 <= nodes <= MAX_NODES:
        raise TopologyError(f"--nodes {nodes}: this machine runs 1 to {MAX_NODES} lab nodes")
    out = []
    for i in range(1, nodes + 1):
        side = (i - 1) % 2
        net = ipaddress.ip_network(SUBNETS[side])
        out.append(
            NodePlan(
                name=f"node{i}",
                netns=f"{name}-node{i}",
                subnet=SUBNETS[side],
                bridge=BRIDGES[side],
                ip=str(net.network_address + 10 + i),
                prefixlen=net.prefixlen,
                gateway=str(net.network_address + 1),
                fabric_port=f"node{i}",
            )
        )
    return LabPlan(name, tuple(out))

"""The lab's address plan as data (DESIGN.md, kOps defaults). Pure: no I/O.

fabric netns: bridges br-a (172.20.32.0/19) and br-b (172.20.64.0/19) joined by routing in the
same namespace (the router, whose legs rt-a / rt-b are veths plugged into the bridges), and a
leg to the external client (203.0.113.0/24). The router
sends the LoadBalancer/externalIP range (198.51.100.0/24) to the nodes over one ECMP route.
Nodes alternate between the two subnets, so node1 -> node2 crosses the router.

An IPv6 lab (``ipv6=True``, a spec with an IPv6 pool) is dual-stack: each bridge also carries a
ULA /64 (``subnet6``: FABRIC6_PREFIX + the bridge's index, router ::1, nodeN ::N+10), pods get
an IPv4 and an IPv6 address, and IPv6 pools are routed without encapsulation over BGP.

A lab built from a kOps cluster spec (``from_spec``) takes the spec's subnets (one bridge each,
up to MAX_SUBNETS) where they fit the lab, and its nodes from the InstanceGroups (each group's
minSize, round-robin over the group's subnets, bounded by MAX_NODES); every departure from the
spec is a warning.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from tabby.model.kops import KopsCluster

SUBNETS = ("172.20.32.0/19", "172.20.64.0/19")
BRIDGES = ("br-a", "br-b")
POOL_CIDR = "100.96.0.0/11"
POOL6_CIDR = "fd7a:b1e:96::/48"  # an IPv6 spec's pod CIDR when it names none (ULA)
SERVICE6_CIDR = "fd7a:b1e:64::/108"
FABRIC6_PREFIX = "fd7a:b1e:20"  # bridge i carries FABRIC6_PREFIX:<i + 1>::/64
SERVICE_CIDR = "100.64.0.0/13"
EXTERNAL_CIDR = "203.0.113.0/24"
LOADBALANCER_CIDR = "198.51.100.0/24"  # LoadBalancer ingress IPs and externalIPs
EXTERNAL_ROUTER_IP = "203.0.113.1"
EXTERNAL_CLIENT_IP = "203.0.113.10"
MAX_NODES = 8
MAX_SUBNETS = 4
MAX_FABRIC_MTU = 65000
HOST_NET = "192.0.2.0/24"  # the machine's own network: a lab never uses it
# What a node subnet must not overlap: the host's net, the lab's external and LoadBalancer
# ranges, loopback/link-local/multicast/"this network", and the pod and service defaults.
RESERVED = (
    HOST_NET,
    EXTERNAL_CIDR,
    LOADBALANCER_CIDR,
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/3",
    POOL_CIDR,
    SERVICE_CIDR,
)
NODE_HOST_OFFSET = 10  # nodeN gets the subnet's address N + 10; .1 is the router
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
    ip6: str | None = None  # IPv6 labs: the node's ULA on its subnet's /64
    gateway6: str | None = None


@dataclass(frozen=True)
class SubnetPlan:
    name: str
    cidr: str
    bridge: str

    @property
    def gateway(self) -> str:
        return str(ipaddress.ip_network(self.cidr).network_address + 1)

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.cidr).prefixlen

    @property
    def cidr6(self) -> str:
        """The bridge's IPv6 /64 (used by IPv6 labs only): FABRIC6_PREFIX + the bridge index."""
        return f"{FABRIC6_PREFIX}:{ord(self.bridge[-1]) - ord('a') + 1}::/64"

    @property
    def gateway6(self) -> str:
        return str(ipaddress.ip_network(self.cidr6).network_address + 1)


def default_subnets() -> tuple[SubnetPlan, ...]:
    return tuple(SubnetPlan(b, c, b) for b, c in zip(BRIDGES, SUBNETS, strict=True))


@dataclass(frozen=True)
class LabPlan:
    name: str
    nodes: tuple[NodePlan, ...]
    subnets: tuple[SubnetPlan, ...] = field(default_factory=default_subnets)
    fabric_mtu: int = 1500  # MTU of every fabric link (nodes' eth0); 9001 as on AWS
    ipv6: bool = False  # dual-stack fabric (see the module)

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


def plan(
    name: str,
    nodes: int = 3,
    *,
    subnets: Sequence[str] | None = None,
    placement: Sequence[int] | None = None,
    fabric_mtu: int = 1500,
    ipv6: bool = False,
) -> LabPlan:
    """The plan of lab ``name``: ``nodes`` nodes over ``subnets`` (default: the two /19s),
    node i on ``subnets[placement[i]]`` (default: alternating); ``ipv6``: dual-stack."""
    if not NAME_RE.match(name):
        raise TopologyError(f"lab name {name!r}: use 1-12 lowercase letters/digits, letter first")
    if not 1 <= nodes <= MAX_NODES:
        raise TopologyError(f"--nodes {nodes}: this machine runs 1 to {MAX_NODES} lab nodes")
    if not 1280 <= fabric_mtu <= MAX_FABRIC_MTU:
        raise TopologyError(f"fabric MTU {fabric_mtu}: use 1280 to {MAX_FABRIC_MTU}")
    cidrs = list(subnets) if subnets else list(SUBNETS)
    if len(cidrs) > MAX_SUBNETS:
        raise TopologyError(f"{len(cidrs)} subnets: the lab's fabric has at most {MAX_SUBNETS}")
    for cidr in cidrs:
        problem = subnet_problem(cidr, [c for c in cidrs if c != cidr])
        if problem:
            raise TopologyError(f"subnet {cidr}: {problem}")
    nets = tuple(
        SubnetPlan(f"br-{chr(ord('a') + i)}", c, f"br-{chr(ord('a') + i)}")
        for i, c in enumerate(cidrs)
    )
    where = list(placement) if placement is not None else [i % len(nets) for i in range(nodes)]
    if len(where) != nodes or any(not 0 <= w < len(nets) for w in where):
        raise TopologyError(f"placement {where} does not fit {nodes} nodes on {len(nets)} subnets")
    out = []
    for i in range(1, nodes + 1):
        sub = nets[where[i - 1]]
        net = ipaddress.ip_network(sub.cidr)
        net6 = ipaddress.ip_network(sub.cidr6)
        out.append(
            NodePlan(
                name=f"node{i}",
                netns=f"{name}-node{i}",
                subnet=sub.cidr,
                bridge=sub.bridge,
                ip=str(net.network_address + NODE_HOST_OFFSET + i),
                prefixlen=net.prefixlen,
                gateway=sub.gateway,
                fabric_port=f"node{i}",
                ip6=str(net6.network_address + NODE_HOST_OFFSET + i) if ipv6 else None,
                gateway6=sub.gateway6 if ipv6 else None,
            )
        )
    return LabPlan(name, tuple(out), nets, fabric_mtu, ipv6)


def subnet_problem(cidr: str, others: Sequence[str] = ()) -> str | None:
    """Why ``cidr`` cannot be a lab node subnet, or None."""
    try:
        net = ipaddress.ip_network(cidr)
    except ValueError:
        return "not a valid IPv4 CIDR"
    if not isinstance(net, ipaddress.IPv4Network):
        return "not IPv4 (the lab's fabric is IPv4)"
    if net.num_addresses < NODE_HOST_OFFSET + MAX_NODES + 2:
        return f"too small: the lab needs at least a /{32 - 5} (router .1, nodes from .11)"
    for reserved in RESERVED:
        if net.overlaps(ipaddress.ip_network(reserved)):
            return f"overlaps {reserved}, which the lab reserves"
    for other in others:
        if net.overlaps(ipaddress.ip_network(other)):
            return f"overlaps {other}"
    return None


@dataclass(frozen=True)
class SpecPlan:
    plan: LabPlan
    warnings: tuple[str, ...]
    subnet_names: dict[str, str]  # lab subnet CIDR -> the spec subnet it stands for


def from_spec(name: str, cluster: KopsCluster, fabric_mtu: int = 1500) -> SpecPlan:
    """The lab plan a kOps cluster means, bounded to what this machine runs (see the module)."""
    warnings: list[str] = []
    if cluster.ipv6:
        warnings.append(
            "IPv6 spec: the lab is dual-stack (kOps' IPv6 clusters are IPv6-only): nodes and pods "
            f"also get IPv4, pods from {POOL_CIDR} routed over BGP without encapsulation"
        )
    members = [g for g in cluster.instance_groups if g.runs_agent]
    if not members:
        warnings.append("no InstanceGroup runs nodes: the lab uses 3 nodes")
    wanted: list[str] = []  # spec subnet names, one per node, in node order
    for group in members:
        names = list(group.subnets) or [s.name for s in cluster.subnets[:1]] or ["default"]
        wanted += [names[i % len(names)] for i in range(group.min_size)]
    if len(wanted) > MAX_NODES:
        warnings.append(
            f"the spec starts {len(wanted)} nodes: the lab runs the first {MAX_NODES} "
            f"(this machine's bound)"
        )
        wanted = wanted[:MAX_NODES]
    if not wanted:
        wanted = ["default"] * 3 if not members else []
    if not wanted:
        raise TopologyError("the spec's InstanceGroups start no node (every minSize is 0)")
    order = list(dict.fromkeys(wanted))  # spec subnets used, first use first
    if len(order) > MAX_SUBNETS:
        warnings.append(
            f"{len(order)} subnets: the lab's fabric has {MAX_SUBNETS}; nodes of "
            f"{', '.join(order[MAX_SUBNETS:])} go to the first ones"
        )
    cidrs: dict[str, str] = {}
    spare = list(SUBNETS)
    spec_ranges = [c for c in (cluster.pod_cidr, cluster.service_cidr) if c and ":" not in c]
    for sub_name in order[:MAX_SUBNETS]:
        sub = cluster.subnet(sub_name)
        cidr = sub.cidr if sub else None
        taken = list(cidrs.values()) + spec_ranges
        problem = "it has no CIDR" if cidr is None else subnet_problem(cidr, taken)
        if problem:
            fallback = next(
                (c for c in spare if subnet_problem(c, taken) is None), None
            ) or _free_subnet(taken)
            warnings.append(f"subnet {sub_name} ({cidr}): {problem}; the lab uses {fallback}")
            cidr = fallback
        cidrs[sub_name] = str(cidr)
    used = list(cidrs)
    placement = [used.index(n) if n in cidrs else i % len(used) for i, n in enumerate(wanted)]
    lab_cidrs = [cidrs[n] for n in used]
    net = plan(
        name,
        len(wanted),
        subnets=lab_cidrs,
        placement=placement,
        fabric_mtu=fabric_mtu,
        ipv6=cluster.ipv6,
    )
    return SpecPlan(net, tuple(warnings), {cidrs[n]: n for n in used})


def _free_subnet(taken: Sequence[str]) -> str:
    for third in range(32, 256, 32):
        cidr = f"172.20.{third}.0/19"
        if subnet_problem(cidr, taken) is None:
            return cidr
    raise TopologyError("no free /19 left for the lab's subnets")

"""Resources -> the desired state of THIS node.

``compute(resources, node)`` is pure and depends only on the current resources (never on history),
so the agent may recompute from scratch on every batch of events; the dataplane managers diff the
result against what is programmed. The routes it emits are the BPF route map's content and the
kernel routes the node needs for traffic its own stack originates or forwards.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from tabby.calc import maglev, names, policy
from tabby.calc.mtu import Encap
from tabby.calc.services import ServiceIndex, ServiceNAT

if TYPE_CHECKING:
    from tabby.calc.bird import BirdConfig

Obj = dict[str, Any]
Resources = Mapping[str, Mapping[tuple[str, str], Obj]]  # kind -> (namespace, name) -> object

# Route flags: mirror of bpf/include/tabby/types.h (checked by tests/layout).
RT_LOCAL_WL = 1
RT_REMOTE_WL = 2
RT_LOCAL_HOST = 4
RT_REMOTE_HOST = 8
RT_ENCAP_VXLAN = 16
RT_ENCAP_IPIP = 32
RT_TUNNEL_ADDR = 64
RT_NAT_OUT = 128
RT_NETNS = 256  # set by the dataplane (dataplane/routes.py): the pod's netns id is its to know

_ENCAP_FLAGS: dict[Encap, int] = {"vxlan": RT_ENCAP_VXLAN, "ipip": RT_ENCAP_IPIP, "none": 0}

DEFAULT_VNI = 4096
DEFAULT_VXLAN_PORT = 4789
NODE_ADDRESS_ANNOTATION = "projectcalico.org/IPv4Address"  # "ip/prefix": tells the node's subnet
NODE_ADDRESS6_ANNOTATION = "projectcalico.org/IPv6Address"


@dataclass(frozen=True)
class Route:
    """One BPF route-map entry; ``ifname`` names a local workload's host veth, else empty."""

    cidr: str
    flags: int
    next_hop: str = "0.0.0.0"
    ifname: str = ""


@dataclass(frozen=True)
class Endpoint:
    """A pod wired into this node."""

    namespace: str
    name: str
    ip: str
    ifname: str
    ip6: str | None = None  # a dual-stack pod's IPv6 address (anti-spoofing: tby_wl6)


@dataclass(frozen=True)
class KernelRoute:
    """A route in the node's kernel table: via the tunnel device (vxlan), or towards a peer node
    (none: plain; ipip: the data interface's egress program adds the outer header)."""

    cidr: str
    encap: Encap
    gateway: str  # the peer node's address (none, ipip)


@dataclass(frozen=True)
class HealthCheck:
    """A healthCheckNodePort this node serves (externalTrafficPolicy Local), as kube-proxy does."""

    service: str  # "namespace/name"
    local_endpoints: int


@dataclass
class NodeState:
    node: str
    node_ip: str | None
    bpf_enabled: bool = True
    node_ip6: str | None = None  # IPv6 NodePorts answer on it
    vni: int = DEFAULT_VNI
    vxlan_port: int = DEFAULT_VXLAN_PORT
    log_level: str = "Off"
    attach_type: Literal["TCX", "TC"] = "TCX"
    tunnel_ip: str | None = None  # this node's VXLAN device address, from IPAM
    needs_vxlan: bool = False
    routes: dict[str, Route] = field(default_factory=dict)
    endpoints: dict[str, Endpoint] = field(default_factory=dict)  # by host ifname
    kernel_routes: dict[str, KernelRoute] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    ctlb_mode: Literal["TCP", "Enabled", "Disabled"] = "TCP"  # bpfConnectTimeLoadBalancing
    ext_mode: Literal["Tunnel", "DSR"] = "Tunnel"  # bpfExternalServiceMode
    redirect: bool = True  # bpfRedirectToPeer: forwarded packets skip the node's stack
    maglev_max_services: int = maglev.DEFAULT_MAX_SERVICES  # bpfMaglevMaxServices
    # bpfMaglevMaxEndpointsPerService: sizes the tables (calc.maglev.table_size)
    maglev_max_endpoints: int = maglev.DEFAULT_MAX_ENDPOINTS
    # the bpfMapSize* fields set (Calico's name -> entries), applied at the next load
    map_sizes: tuple[tuple[str, int], ...] = ()
    health_checks: dict[int, HealthCheck] = field(default_factory=dict)  # by node port
    services: Mapping[str, ServiceNAT] = field(default_factory=dict)  # "ns/name" -> NAT
    # the services whose NAT may differ from the previous state's; None: any (compare them all).
    # A hint for the dataplane, not part of the state: left out of comparisons.
    services_changed: frozenset[str] | None = field(default=None, compare=False)
    kube_proxy_healthz_port: int = 10256  # bpfKubeProxyHealthzPort; 0 = off
    kube_proxy_cleanup: bool = True  # bpfKubeProxyIptablesCleanupEnabled (Calico's default)
    vxlan_mtu: int = 0  # FelixConfiguration vxlanMTU; 0: the data interface's minus 50
    ipip_mtu: int = 0  # FelixConfiguration ipipMTU; 0: the data interface's minus 20
    wireguard: bool = False  # wireguardEnabled: asked for; the dataplane says what it can do
    # The BIRD backend (calico_backend bird): this node's BIRD config (calc.bird.render); the
    # blocks of pools without encapsulation are then routed by BGP, not from the IPAM blocks.
    bird: BirdConfig | None = None
    policies: dict[str, policy.EndpointPolicy] = field(default_factory=dict)  # isolated, by IP


def node_internal_ip(node: Obj) -> str | None:
    """The node's IPv4 InternalIP (a dual-stack node lists one per family), else its
    Calico IPv4Address annotation."""
    for addr in node.get("status", {}).get("addresses", []) or []:
        if addr.get("type") == "InternalIP" and ":" not in str(addr.get("address")):
            return str(addr.get("address"))
    annotated = node.get("metadata", {}).get("annotations", {}).get(NODE_ADDRESS_ANNOTATION)
    return str(annotated).split("/")[0] if annotated else None


def node_internal_ip6(node: Obj) -> str | None:
    """The node's IPv6 InternalIP, else its Calico IPv6Address annotation; None: no IPv6."""
    for addr in node.get("status", {}).get("addresses", []) or []:
        if addr.get("type") == "InternalIP" and ":" in str(addr.get("address")):
            return str(addr.get("address"))
    annotated = node.get("metadata", {}).get("annotations", {}).get(NODE_ADDRESS6_ANNOTATION)
    return str(annotated).split("/")[0] if annotated else None


def node_subnet(node: Obj) -> ipaddress.IPv4Network | None:
    annotated = node.get("metadata", {}).get("annotations", {}).get(NODE_ADDRESS_ANNOTATION)
    if not annotated:
        return None
    return ipaddress.IPv4Network(annotated, strict=False)


def _dsr_warning(me: Obj | None, nodes: dict[str, Obj]) -> list[str]:
    """DSR replies leave this node with another node's address as their source: a hop that
    checks sources (a router's strict rp_filter, a cloud's source/destination check) drops those
    of nodes in other subnets, since it would route to them through another interface."""
    mine = node_subnet(me) if me else None
    others = sorted(
        {
            str(net)
            for obj in nodes.values()
            if obj is not me and (net := node_subnet(obj)) is not None and net != mine
        }
    )
    if mine is None or not others:
        return []
    return [
        "bpfExternalServiceMode DSR: replies leave this node with the addresses of nodes in "
        f"{', '.join(others)} as their source; a strict reverse-path or source/destination "
        "check between here and the clients drops them (on AWS: awsSrcDstCheck: Disable)"
    ]


def felix_config(resources: Resources) -> Obj:
    """The effective FelixConfiguration spec: 'default', overlaid by 'node.<name>' as in Calico."""
    configs = resources.get("FelixConfiguration", {})
    return dict(configs.get(("", "default"), {}).get("spec", {}) or {})


def _pool_for(block: ipaddress.IPv4Network, pools: list[Obj]) -> Obj | None:
    for pool in pools:
        net = ipaddress.ip_network(pool["spec"]["cidr"], strict=False)
        if isinstance(net, ipaddress.IPv4Network) and block.subnet_of(net):
            return pool
    return None


def _encap_between(pool: Obj | None, mine: Obj | None, peer: Obj) -> Encap:
    if pool is None:
        return "none"
    spec = pool["spec"]
    for key, encap in (("vxlanMode", "vxlan"), ("ipipMode", "ipip")):
        mode = spec.get(key, "Never")
        if mode == "Always":
            return encap  # type: ignore[return-value]
        if mode == "CrossSubnet":
            here = node_subnet(mine) if mine else None
            there = node_subnet(peer)
            peer_ip = node_internal_ip(peer)
            same = (
                here is not None and peer_ip is not None and ipaddress.ip_address(peer_ip) in here
            )
            if there is None or not same:
                return encap  # type: ignore[return-value]
    return "none"


def plain_pool(pool: Obj | None) -> bool:
    """A pool routed without encapsulation to every peer (both modes Never)."""
    if pool is None:
        return False
    spec = pool["spec"]
    return bool(spec.get("ipipMode", "Never") == "Never" == spec.get("vxlanMode", "Never"))


def compute(resources: Resources, node: str, bgp: bool = False) -> NodeState:
    """``bgp``: the BIRD backend runs (calc.bird): blocks of plain pools are left to BGP."""
    nodes = {name: obj for (_, name), obj in resources.get("Node", {}).items()}
    me = nodes.get(node)
    state = NodeState(node=node, node_ip=node_internal_ip(me) if me else None)
    state.node_ip6 = node_internal_ip6(me) if me else None
    cfg = felix_config(resources)
    state.bpf_enabled = bool(cfg.get("bpfEnabled", True))
    state.vni = int(cfg.get("vxlanVNI", DEFAULT_VNI))
    state.vxlan_port = int(cfg.get("vxlanPort", DEFAULT_VXLAN_PORT))
    state.log_level = str(cfg.get("bpfLogLevel", "Off"))
    state.attach_type = "TC" if cfg.get("bpfAttachType") == "TC" else "TCX"
    state.ctlb_mode = cfg.get("bpfConnectTimeLoadBalancing", "TCP")
    state.ext_mode = "DSR" if cfg.get("bpfExternalServiceMode") == "DSR" else "Tunnel"
    state.redirect = cfg.get("bpfRedirectToPeer", "Enabled") == "Enabled"
    state.maglev_max_services = int(cfg.get("bpfMaglevMaxServices", maglev.DEFAULT_MAX_SERVICES))
    state.maglev_max_endpoints = int(
        cfg.get("bpfMaglevMaxEndpointsPerService", maglev.DEFAULT_MAX_ENDPOINTS)
    )
    state.map_sizes = tuple(
        sorted((k, int(v)) for k, v in cfg.items() if k.startswith("bpfMapSize"))
    )
    state.kube_proxy_healthz_port = int(cfg.get("bpfKubeProxyHealthzPort", 10256))
    state.kube_proxy_cleanup = bool(cfg.get("bpfKubeProxyIptablesCleanupEnabled", True))
    state.vxlan_mtu = int(cfg.get("vxlanMTU", 0) or 0)
    state.ipip_mtu = int(cfg.get("ipipMTU", 0) or 0)
    state.wireguard = bool(cfg.get("wireguardEnabled", False))
    pools = [
        p
        for p in resources.get("IPPool", {}).values()
        if not p.get("spec", {}).get("disabled", False)
    ]
    state.needs_vxlan = any(p["spec"].get("vxlanMode", "Never") != "Never" for p in pools)

    for name, obj in nodes.items():
        ip = node_internal_ip(obj)
        if ip:
            flags = RT_LOCAL_HOST if name == node else RT_REMOTE_HOST
            state.routes[f"{ip}/32"] = Route(f"{ip}/32", flags)

    if state.ext_mode == "DSR":
        state.warnings.extend(_dsr_warning(me, nodes))

    for (ns, name), pod in resources.get("Pod", {}).items():
        spec, status = pod.get("spec", {}), pod.get("status", {})
        ip = status.get("podIP")
        if spec.get("nodeName") != node or not ip or spec.get("hostNetwork"):
            continue
        ifname = names.host_ifname(ns, name)
        ip6 = next((str(e["ip"]) for e in status.get("podIPs") or [] if ":" in str(e["ip"])), None)
        state.endpoints[ifname] = Endpoint(ns, name, ip, ifname, ip6)
        pool = _pool_for(ipaddress.IPv4Network(f"{ip}/32"), pools) if ":" not in ip else None
        masq = RT_NAT_OUT if pool and pool["spec"].get("natOutgoing") else 0
        state.routes[f"{ip}/32"] = Route(f"{ip}/32", RT_LOCAL_WL | masq, ifname=ifname)

    for block in resources.get("IPAMBlock", {}).values():
        spec = block.get("spec", {})
        cidr = ipaddress.ip_network(spec["cidr"], strict=False)
        if not isinstance(cidr, ipaddress.IPv4Network):
            continue
        owner = str(spec.get("affinity", "")).removeprefix("host:")
        pool = _pool_for(cidr, pools)
        if owner == node:
            tunnel = _tunnel_address(spec, node)
            if tunnel:
                state.tunnel_ip = tunnel
                state.routes[f"{tunnel}/32"] = Route(f"{tunnel}/32", RT_LOCAL_HOST | RT_TUNNEL_ADDR)
            continue
        if bgp and plain_pool(pool):
            continue  # learnt over BGP: BIRD programs the kernel, the dataplane the route map
        peer = nodes.get(owner)
        peer_ip = node_internal_ip(peer) if peer else None
        if peer is None or peer_ip is None:
            state.warnings.append(f"block {cidr} belongs to unknown node {owner!r}: not routed")
            continue
        encap = _encap_between(pool, me, peer)
        # IP-in-IP is added by the data interface's programs (no tunnel device): the kernel
        # route only has to reach the peer's L2 next hop (dataplane/routes.py resolves it).
        flags = RT_REMOTE_WL | _ENCAP_FLAGS[encap]
        state.routes[str(cidr)] = Route(str(cidr), flags, next_hop=peer_ip)
        state.kernel_routes[str(cidr)] = KernelRoute(str(cidr), encap, peer_ip)
    state.policies = policy.compute(resources, node)
    return state


def with_services(base: NodeState, index: ServiceIndex) -> NodeState:
    """A new state: ``base`` plus the index's NAT results and the health checks they imply.

    ``base`` is left as it is: while only Services and EndpointSlices change, the agent reuses
    it (and so the very same route, endpoint and policy dicts) and the dataplane skips every
    manager but NAT. The work here is O(changed services): the index keeps the health checks
    and warnings of the services that have some.
    """
    services = index.results()
    warnings = list(base.warnings)
    for name in sorted(index.warnings):
        warnings.extend(index.warnings[name])
    checks = {port: HealthCheck(name, local) for name, (port, local) in index.health_checks.items()}
    return dataclasses.replace(
        base,
        services=services,
        services_changed=index.changed,
        warnings=warnings,
        health_checks=checks,
    )


def _tunnel_address(block_spec: Obj, node: str) -> str | None:
    handle = names.tunnel_handle(node)
    for ip, owner in (block_spec.get("allocations") or {}).items():
        if owner == handle:
            return str(ip)
    return None

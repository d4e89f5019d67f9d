"""BGP as Calico's BIRD backend does it: the datastore -> this node's bird.conf (BIRD 2).

Pure: ``render(resources, node)`` reads Nodes, IPPools, IPAM blocks, BGPConfiguration "default"
and BGPPeers and returns the config text and the sessions it opens; the same resources give the
same bytes (peers sorted), so the dataplane reloads BIRD only when something changed.

What the config does, as Calico's bird.cfg.template:
- announces this node's IPAM blocks (static blackhole routes, protocol ``tabby_blocks``) and
  nothing else; imports only routes inside the IP pools (a peer cannot inject a default route);
- peers: the node-to-node mesh (``Mesh_<ip>``, unless ``nodeToNodeMeshEnabled: false``), and the
  BGPPeers that apply to this node: ``peerIP`` (``Global_<ip>`` / ``Node_<ip>``) or
  ``peerSelector`` (every selected node, ``Node_<ip>``). A node carrying a route-reflector
  cluster ID reflects to peers that are not in its cluster (``rr client``);
- iBGP multihop with recursive next hops, so a block learnt from a node across the fabric's
  router is routed via the router (which learns the blocks too);
- writes to the kernel only learnt routes of pools with no encapsulation (ipipMode and vxlanMode
  Never) and the blackholes of this node's blocks there (metric 32: a route tabby itself programs
  for an encapsulated pool, metric 0, always wins during a pool's live mode switch). Routes of
  encapsulated pools stay with tabby's route managers (from the IPAM blocks), as Felix does.
- IPv6 (a node with an IPv6 InternalIP and IPv6 pools), as Calico's bird6: the same peers over
  their IPv6 addresses (``Mesh_fd00__12``...), an ``ipv6`` channel with its own filters, kernel
  protocol (``tabby_kernel6``) and blocks (``tabby_blocks6``). IPv6 pools are never encapsulated,
  so every learnt IPv6 block goes to the kernel. The router id stays the node's IPv4 address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from tabby.calc.nodestate import Resources, node_internal_ip, node_internal_ip6
from tabby.model import calico_selectors
from tabby.model.calico import duration_s

Obj = dict[str, Any]
PeerType = Literal["node-to-node mesh", "global", "node specific"]

DEFAULT_AS = 64512
AS_ANNOTATION = "projectcalico.org/ASNumber"
CLUSTER_ID_ANNOTATION = "projectcalico.org/RouteReflectorClusterID"
KERNEL_METRIC = 32  # BIRD's default; tabby's own routes use 0
BLOCKS_PROTOCOL = "tabby_blocks"
BLOCKS6_PROTOCOL = "tabby_blocks6"
KERNEL6_PROTOCOL = "tabby_kernel6"
DEFAULT_RESTART_WAIT_S = 30


@dataclass(frozen=True)
class Peer:
    name: str  # the BIRD protocol name: Mesh_/Node_/Global_ + address with underscores
    address: str
    port: int
    as_number: int
    type: PeerType
    keepalive_s: int | None  # None: BIRD's default (hold 240 s)
    restart_s: int | None  # graceful restart time; None: BIRD's default (120 s)
    rr_client: bool = False


@dataclass
class BirdConfig:
    node: str
    router_id: str
    as_number: int
    peers: list[Peer] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)  # announced
    pools: list[str] = field(default_factory=list)  # routes accepted from peers
    plain_pools: list[str] = field(default_factory=list)  # written to the kernel by BIRD
    cluster_id: str | None = None
    listen_port: int = 179
    warnings: list[str] = field(default_factory=list)
    ip6: str | None = None  # this node's IPv6 address: IPv6 sessions and routes (see module)
    blocks6: list[str] = field(default_factory=list)
    pools6: list[str] = field(default_factory=list)  # every IPv6 pool is plain (not encapsulated)

    @property
    def restart_wait_s(self) -> int:
        return max([p.restart_s or 0 for p in self.peers] + [DEFAULT_RESTART_WAIT_S])

    @property
    def text(self) -> str:
        return _text(self)


def _name(prefix: str, address: str) -> str:
    return f"{prefix}_{address.replace('.', '_').replace(':', '_')}"


def _annotation(obj: Obj, key: str) -> str | None:
    value = (obj.get("metadata", {}).get("annotations") or {}).get(key)
    return str(value) if value not in (None, "") else None


def _node_as(obj: Obj, default: int, warnings: list[str]) -> int:
    text = _annotation(obj, AS_ANNOTATION)
    if text is None:
        return default
    if text.isdigit() and 1 <= int(text) <= 4294967295:
        return int(text)
    name = obj["metadata"]["name"]
    warnings.append(f"Node {name}: annotation {AS_ANNOTATION}={text!r} is not an AS number")
    return default


def _cluster_id(obj: Obj, warnings: list[str]) -> str | None:
    text = _annotation(obj, CLUSTER_ID_ANNOTATION)
    if text is None:
        return None
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        name = obj["metadata"]["name"]
        warnings.append(f"Node {name}: {CLUSTER_ID_ANNOTATION}={text!r} is not an IPv4 address")
        return None


def _seconds(text: Any) -> int | None:
    return None if not text else max(1, round(duration_s(str(text))))


def _labels(obj: Obj) -> Mapping[str, str]:
    return obj.get("metadata", {}).get("labels") or {}


def _peer_address(peer_ip: str) -> tuple[str, int]:
    if peer_ip.startswith("["):
        host, _, rest = peer_ip[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 179
    if peer_ip.count(":") == 1:
        host, _, port = peer_ip.partition(":")
        return host, int(port)
    return peer_ip, 179


def _applies_to(spec: Obj, node: str, labels: Mapping[str, str]) -> bool:
    if spec.get("node"):
        return bool(spec["node"] == node)
    if spec.get("nodeSelector"):
        return calico_selectors.matches(spec["nodeSelector"], labels)
    return True  # a global peer


def render(resources: Resources, node: str) -> BirdConfig | None:
    """This node's BIRD config; None while the node has no IPv4 address (nothing to peer)."""
    nodes = {name: obj for (_, name), obj in resources.get("Node", {}).items()}
    me = nodes.get(node)
    my_ip = node_internal_ip(me) if me else None
    if me is None or my_ip is None or ":" in my_ip:
        return None
    bgp = dict(resources.get("BGPConfiguration", {}).get(("", "default"), {}).get("spec") or {})
    default_as = int(bgp.get("asNumber", DEFAULT_AS))
    warnings: list[str] = []
    cfg = BirdConfig(node, my_ip, _node_as(me, default_as, warnings))
    cfg.listen_port = int(bgp.get("listenPort", 179))
    cfg.cluster_id = _cluster_id(me, warnings)

    enabled = [
        p["spec"] for p in resources.get("IPPool", {}).values() if not p["spec"].get("disabled")
    ]
    pools = [p for p in enabled if ":" not in p["cidr"]]
    cfg.ip6 = node_internal_ip6(me)
    if cfg.ip6:
        cfg.pools6 = sorted(
            str(ipaddress.IPv6Network(p["cidr"])) for p in enabled if ":" in p["cidr"]
        )
    cfg.pools = sorted(p["cidr"] for p in pools)
    cfg.plain_pools = sorted(
        p["cidr"]
        for p in pools
        if p.get("ipipMode", "Never") == "Never" and p.get("vxlanMode", "Never") == "Never"
    )
    pool_nets = [ipaddress.IPv4Network(c) for c in cfg.pools]
    for block in resources.get("IPAMBlock", {}).values():
        spec = block.get("spec", {})
        if str(spec.get("affinity", "")) != f"host:{node}" or ":" in spec["cidr"]:
            continue
        net = ipaddress.IPv4Network(spec["cidr"])
        if any(net.subnet_of(p) for p in pool_nets):
            cfg.blocks.append(str(net))
    cfg.blocks.sort()
    pool6_nets = [ipaddress.IPv6Network(c) for c in cfg.pools6]
    for block in resources.get("IPAMBlock", {}).values():
        spec = block.get("spec", {})
        if str(spec.get("affinity", "")) != f"host:{node}" or ":" not in spec["cidr"]:
            continue
        net6 = ipaddress.IPv6Network(spec["cidr"])
        if any(net6.subnet_of(p) for p in pool6_nets):
            cfg.blocks6.append(str(net6))
    cfg.blocks6.sort(key=lambda c: ipaddress.IPv6Network(c))

    peers: dict[str, Peer] = {}
    mesh_keepalive = _seconds(bgp.get("nodeMeshKeepaliveTime"))
    mesh_restart = _seconds(bgp.get("nodeMeshMaxRestartTime"))

    def node_peer(prefix: str, kind: PeerType, other: Obj, keepalive: Any, restart: Any) -> None:
        their_cid = _cluster_id(other, [])
        # one session per family both nodes have (IPv6: Calico's bird6 sessions)
        ip6 = node_internal_ip6(other) if cfg.ip6 else None
        for ip in (node_internal_ip(other), ip6):
            if ip is None or ip in (my_ip, cfg.ip6) or ip in peers:
                continue
            peers[ip] = Peer(
                _name(prefix, ip),
                ip,
                cfg.listen_port,
                _node_as(other, default_as, []),
                kind,
                keepalive,
                restart,
                rr_client=cfg.cluster_id is not None and their_cid != cfg.cluster_id,
            )

    explicit = sorted(
        resources.get("BGPPeer", {}).values(), key=lambda o: str(o["metadata"]["name"])
    )
    for obj in explicit:
        spec = obj.get("spec", {})
        if spec.get("peerSelector") and calico_selectors.matches(spec["peerSelector"], _labels(me)):
            # The other side of a selector peering (Calico's reverse peering): a node the
            # peerSelector picks (a route reflector) peers with every node the BGPPeer is for.
            for name in sorted(nodes):
                if name != node and _applies_to(spec, name, _labels(nodes[name])):
                    node_peer(
                        "Node",
                        "node specific",
                        nodes[name],
                        _seconds(spec.get("keepaliveTime")),
                        _seconds(spec.get("maxRestartTime")),
                    )
        if not _applies_to(spec, node, _labels(me)):
            continue
        keepalive, restart = (
            _seconds(spec.get("keepaliveTime")),
            _seconds(spec.get("maxRestartTime")),
        )
        kind: PeerType = (
            "global" if not (spec.get("node") or spec.get("nodeSelector")) else "node specific"
        )
        if spec.get("peerSelector"):
            for name in sorted(nodes):
                other = nodes[name]
                if name != node and calico_selectors.matches(spec["peerSelector"], _labels(other)):
                    node_peer("Node", "node specific", other, keepalive, restart)
            continue
        address, port = _peer_address(str(spec["peerIP"]))
        if (":" in address and not cfg.ip6) or address in (my_ip, cfg.ip6) or address in peers:
            continue  # an IPv6 peer of a node without IPv6: nothing to peer from
        peers[address] = Peer(
            _name("Global" if kind == "global" else "Node", address),
            address,
            port,
            int(spec["asNumber"]),
            kind,
            keepalive,
            restart,
        )
    if bgp.get("nodeToNodeMeshEnabled", True):
        for name in sorted(nodes):
            if name != node:
                node_peer("Mesh", "node-to-node mesh", nodes[name], mesh_keepalive, mesh_restart)
    cfg.peers = sorted(peers.values(), key=lambda p: _address_key(p.address))
    cfg.warnings = warnings
    return cfg


def _address_key(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip)


def _within(cidrs: list[str], also: str = "") -> str:
    """A filter statement accepting routes inside ``cidrs`` (and ``also``); none: a no-op."""
    if not cidrs:
        return "  # (no pool)"
    cond = "net ~ [ " + ", ".join(f"{c}+" for c in cidrs) + " ]"
    return f"  if {cond}{' && ' + also if also else ''} then accept;"


def _text(cfg: BirdConfig) -> str:
    """bird.conf; comments say why each part is there (the file is what an operator reads)."""
    ours = f'(proto = "{BLOCKS_PROTOCOL}" || source = RTS_BGP)'
    local = f"local {cfg.router_id}"
    if cfg.listen_port != 179:
        local += f" port {cfg.listen_port}"
    out = [
        f"# Written by the tabby agent of node {cfg.node} from the datastore; do not edit.",
        f"router id {cfg.router_id};",
        "log stderr { info, remote, warning, error, auth, fatal, bug };",
        "# after a restart (bird -R), wait at most this long for the peers' routes",
        f"graceful restart wait {cfg.restart_wait_s};",
        "",
        "protocol device { scan time 2; }",
        "# connected subnets: BGP next hops of same-subnet peers resolve on-link",
        "protocol direct {",
        "  ipv4;",
        *(["  ipv6;"] if cfg.ip6 else []),
        '  interface -"tby*", -"lo", "*";',
        "}",
        "",
        "filter tabby_import {",
        _within(cfg.pools),
        "  reject;",
        "}",
        "filter tabby_export_to_peers {",
        _within(cfg.pools, ours),
        "  reject;",
        "}",
        "filter tabby_kernel_programming {",
        _within(cfg.plain_pools, ours),
        "  reject;",
        "}",
        "# what the kernel has that is not ours (its default route): learnt, never re-exported",
        "filter tabby_kernel_learn {",
        _within(cfg.pools).replace("accept", "reject"),
        "  accept;",
        "}",
        "",
        "protocol kernel {",
        "  learn;  # the kernel's default route resolves next hops across the fabric's router",
        "  scan time 2;",
        f"  metric {KERNEL_METRIC};",
        "  graceful restart;",
        "  merge paths on;",
        "  ipv4 {",
        "    import filter tabby_kernel_learn;",
        "    export filter tabby_kernel_programming;",
        "  };",
        "}",
        "",
        f"protocol static {BLOCKS_PROTOCOL} {{",
        "  ipv4;",
        *[f"  route {b} blackhole;" for b in cfg.blocks],
        "}",
        "",
        *_template("tabby_peer", local, cfg.as_number, "ipv4", ""),
    ]
    if cfg.ip6:
        out += _text6(cfg)
    for peer in cfg.peers:
        body = [
            f'  description "{peer.type}";',
            f"  neighbor {peer.address} port {peer.port} as {peer.as_number};",
        ]
        if peer.keepalive_s:
            body += [
                f"  hold time {peer.keepalive_s * 3};",
                f"  keepalive time {peer.keepalive_s};",
            ]
        if peer.restart_s:
            body.append(f"  graceful restart time {peer.restart_s};")
        if peer.rr_client:
            body += ["  rr client;", f"  rr cluster id {cfg.cluster_id};"]
        template = "tabby_peer6" if ":" in peer.address else "tabby_peer"
        out += ["", f"protocol bgp {peer.name} from {template} {{", *body, "}"]
    return "\n".join(out) + "\n"


def _template(name: str, local: str, as_number: int, channel: str, suffix: str) -> list[str]:
    return [
        f"template bgp {name} {{",
        f"  {local} as {as_number};",
        "  multihop;",
        "  connect delay time 1;",
        "  connect retry time 2;",
        "  error wait time 1, 10;",
        "  graceful restart on;",
        f"  {channel} {{",
        "    gateway recursive;",
        f"    import filter tabby_import{suffix};",
        f"    export filter tabby_export_to_peers{suffix};",
        "  };",
        "}",
    ]


def _text6(cfg: BirdConfig) -> list[str]:
    """The IPv6 half (BIRD's filters and protocols carry one family each): every IPv6 pool is
    plain, so its learnt blocks and this node's blackholes all go to the kernel."""
    ours = f'(proto = "{BLOCKS6_PROTOCOL}" || source = RTS_BGP)'
    local = f"local {cfg.ip6}"
    if cfg.listen_port != 179:
        local += f" port {cfg.listen_port}"
    return [
        "",
        "# IPv6: pools are never encapsulated; sessions between the nodes' IPv6 addresses",
        "filter tabby_import6 {",
        _within(cfg.pools6),
        "  reject;",
        "}",
        "filter tabby_export_to_peers6 {",
        _within(cfg.pools6, ours),
        "  reject;",
        "}",
        "filter tabby_kernel_learn6 {",
        _within(cfg.pools6).replace("accept", "reject"),
        "  accept;",
        "}",
        f"protocol kernel {KERNEL6_PROTOCOL} {{",
        "  learn;",
        "  scan time 2;",
        f"  metric {KERNEL_METRIC};",
        "  graceful restart;",
        "  merge paths on;",
        "  ipv6 {",
        "    import filter tabby_kernel_learn6;",
        "    export filter tabby_export_to_peers6;",
        "  };",
        "}",
        f"protocol static {BLOCKS6_PROTOCOL} {{",
        "  ipv6;",
        *[f"  route {b} blackhole;" for b in cfg.blocks6],
        "}",
        *_template("tabby_peer6", local, cfg.as_number, "ipv6", "6"),
    ]

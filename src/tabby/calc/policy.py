"""NetworkPolicy: Pods, Namespaces, NetworkPolicies -> what each local pod may send and receive.

Pure and synchronous. ``compute(resources, node)`` depends only on the current resources: every
local pod that some policy isolates gets an ``EndpointPolicy`` per direction, its rules merged
into at most ``MAX_CLASSES`` *rule classes* (peer set x port set), and ``compile_direction`` turns
those into the prefix -> class-bitmap entries of the datapath's LPM tries
(docs/design/policy.md). The semantics are the API's (networking.k8s.io/v1), including
policyTypes defaults, named ports resolved on the destination pod, endPort and ipBlock except.
Both families: a selected pod is its /32 and (dual-stack) its /128, ipBlocks may be IPv6, and a
pod's policy is keyed by its IPv4 address (an IPv6-only pod: its IPv6 address) with ``ip6``
naming the IPv6 address that shares it.
"""

from __future__ import annotations

import functools
import ipaddress
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from tabby.model.selectors import match_labels

Obj = dict[str, Any]
Resources = Mapping[str, Mapping[tuple[str, str], Obj]]
Direction = Literal["ingress", "egress"]

MAX_CLASSES = 64  # bits of a class bitmap (u64 in the maps)
NS_NAME_LABEL = "kubernetes.io/metadata.name"  # set on every namespace by the API server
PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132}
ALL_PORTS = (0, 65535)
V6_ORDER = 1 << 128  # IPv6 prefixes sort after every IPv4 one


@dataclass(frozen=True, order=True)
class PortRange:
    """Ports lo..hi of one protocol (0..65535: every port of it)."""

    protocol: str
    lo: int
    hi: int

    def describe(self) -> str:
        if (self.lo, self.hi) == ALL_PORTS:
            return f"{self.protocol} any port"
        if self.lo == self.hi:
            return f"{self.protocol} {self.lo}"
        return f"{self.protocol} {self.lo}-{self.hi}"


@dataclass(frozen=True, order=True)
class Block:
    """An address set: ``cidr`` minus ``excepts`` (a selected pod is its /32, no excepts)."""

    cidr: str
    excepts: tuple[str, ...] = ()


EVERYWHERE = (Block("0.0.0.0/0"), Block("::/0"))  # no peers listed: every address, both families


@dataclass(frozen=True)
class RuleClass:
    """Peers x ports; ``ports`` None = every protocol and port. ``sources`` say where it came
    from ("ns/policy ingress[0]") and what it means in the YAML's words."""

    ports: tuple[PortRange, ...] | None
    peers: tuple[Block, ...]
    sources: tuple[str, ...]


@dataclass(frozen=True)
class DirectionPolicy:
    isolated: bool = False
    policies: tuple[str, ...] = ()  # "ns/name" of every policy isolating the pod this way
    classes: tuple[RuleClass, ...] = ()
    notes: tuple[str, ...] = ()  # e.g. SCTP rules that cannot match on this kernel


@dataclass(frozen=True)
class EndpointPolicy:
    namespace: str
    name: str
    ip: str
    ingress: DirectionPolicy = DirectionPolicy()
    egress: DirectionPolicy = DirectionPolicy()
    errors: tuple[str, ...] = ()  # not programmable (too many classes): the old state stays
    ip6: str = ""  # a dual-stack pod's IPv6 address: the same policy (tby_pol_ep6)

    def direction(self, d: Direction) -> DirectionPolicy:
        return self.ingress if d == "ingress" else self.egress


@dataclass(frozen=True)
class CompiledDirection:
    """Map content of one endpoint direction: (cidr, bits), (proto, port prefix, bits)."""

    peers: tuple[tuple[str, int], ...] = ()
    ports: tuple[tuple[int, int, int, int], ...] = ()  # (proto number, port, prefixlen, bits)
    any_proto: int = 0


@dataclass
class _Pod:
    namespace: str
    name: str
    ip: str
    labels: dict[str, str]
    node: str
    ports: dict[tuple[str, str], int] = field(default_factory=dict)  # (name, proto) -> number
    ip6: str = ""  # a dual-stack pod's IPv6 address ("" for IPv4-only and IPv6-only pods)

    def addrs(self) -> tuple[str, ...]:
        return (self.ip, self.ip6) if self.ip6 else (self.ip,)


def _family(addr: Any) -> int:
    """4, 6, or 0 for what is no address."""
    try:
        return ipaddress.ip_address(str(addr)).version
    except ValueError:
        return 0


def _host(ip: str) -> str:
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def _pod_addresses(status: Obj) -> tuple[str, str]:
    """(IPv4, IPv6) of a pod's status (podIPs, else podIP); "" where it has none."""
    found = {4: "", 6: ""}
    entries = [e.get("ip") for e in status.get("podIPs") or []] or [status.get("podIP")]
    for ip in entries:
        fam = _family(ip)
        if fam and not found[fam]:
            found[fam] = str(ipaddress.ip_address(str(ip)))
    return found[4], found[6]


def _pod_of(pod: Obj) -> _Pod | None:
    spec, status, meta = pod.get("spec", {}), pod.get("status", {}), pod.get("metadata", {})
    ip4, ip6 = _pod_addresses(status)
    ip, ip6 = (ip4, ip6) if ip4 else (ip6, "")
    if not ip or spec.get("hostNetwork"):
        return None
    if status.get("phase") in ("Succeeded", "Failed"):
        return None
    ports: dict[tuple[str, str], int] = {}
    for c in spec.get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name"):
                ports[(p["name"], p.get("protocol", "TCP"))] = int(p["containerPort"])
    return _Pod(
        meta.get("namespace", "") or "default",
        meta["name"],
        str(ip),
        dict(meta.get("labels") or {}),
        str(spec.get("nodeName", "")),
        ports,
        ip6,
    )


class _Index:
    """Pods by namespace, namespace labels, and memoised selector results (one compute)."""

    def __init__(self, resources: Resources) -> None:
        self.pods_by_ns: dict[str, list[_Pod]] = defaultdict(list)
        for obj in resources.get("Pod", {}).values():
            p = _pod_of(obj)
            if p is not None:
                self.pods_by_ns[p.namespace].append(p)
        for pods in self.pods_by_ns.values():
            pods.sort(key=lambda p: p.name)
        self.ns_labels: dict[str, dict[str, str]] = {}
        for (_, name), ns in resources.get("Namespace", {}).items():
            labels = dict(ns.get("metadata", {}).get("labels") or {})
            labels[NS_NAME_LABEL] = name
            self.ns_labels[name] = labels
        for name in self.pods_by_ns:  # pods of a namespace the store does not hold (yet)
            self.ns_labels.setdefault(name, {NS_NAME_LABEL: name})
        self._memo: dict[str, tuple[_Pod, ...]] = {}
        self.peers_memo: dict[str, tuple[Any, ...]] = {}

    def namespaces(self, selector: Obj | None) -> list[str]:
        return sorted(n for n, labels in self.ns_labels.items() if match_labels(selector, labels))

    def select(self, namespaces: Iterable[str], selector: Obj | None) -> tuple[_Pod, ...]:
        names = tuple(namespaces)
        key = json.dumps([names, selector], sort_keys=True)
        hit = self._memo.get(key)
        if hit is None:
            hit = tuple(
                p
                for n in names
                for p in self.pods_by_ns.get(n, ())
                if match_labels(selector, p.labels)
            )
            self._memo[key] = hit
        return hit

    def all_pods(self) -> Iterable[_Pod]:
        for n in sorted(self.pods_by_ns):
            yield from self.pods_by_ns[n]


def _peer_pods(index: _Index, policy_ns: str, peer: Obj) -> tuple[_Pod, ...]:
    if "namespaceSelector" in peer:
        namespaces = index.namespaces(peer["namespaceSelector"])
    else:
        namespaces = [policy_ns]
    return index.select(namespaces, peer.get("podSelector", {}))


def _block_of(ip_block: Obj) -> Block | None:
    net = ipaddress.ip_network(ip_block["cidr"], strict=False)
    excepts = sorted(
        {
            str(e)
            for e in (ipaddress.ip_network(x, strict=False) for x in ip_block.get("except") or [])
            if e.version == net.version  # another family's except takes nothing out
        },
        key=_cidr_order,
    )
    return Block(str(net), tuple(excepts))


@functools.lru_cache(maxsize=1 << 16)
def _cidr_order(cidr: str) -> tuple[int, int]:
    """Sort key of an address or CIDR (cached: calc sorts the same pod addresses many times):
    (value, prefix length), IPv6 values offset by V6_ORDER."""
    addr, _, plen = cidr.partition("/")
    if ":" in addr:
        return V6_ORDER + int(ipaddress.IPv6Address(addr)), int(plen or 128)
    a, b, c, d = (int(x) for x in addr.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d, int(plen or 32)


def _in_block(ip: str, block: Block) -> bool:
    addr = ipaddress.ip_address(ip)
    net = ipaddress.ip_network(block.cidr)
    if addr.version != net.version or addr not in net:
        return False
    return not any(addr in ipaddress.ip_network(e) for e in block.excepts)


@dataclass
class _Rule:
    """One ingress/egress rule, its peers resolved: pods, blocks, or None (every address)."""

    source: str
    pods: tuple[_Pod, ...]
    blocks: tuple[Block, ...]
    everyone: bool
    ports: list[Obj]
    peer_blocks: tuple[Block, ...]  # pods as /32 blocks, then the ipBlocks (or 0.0.0.0/0)


def _peers_of(index: _Index, policy_ns: str, peers: list[Obj] | None) -> tuple[Any, ...]:
    """(pods, blocks, everyone) of a rule's from/to, memoised per compute."""
    key = json.dumps([policy_ns, peers], sort_keys=True)
    hit = index.peers_memo.get(key)
    if hit is None:
        pods, blocks, everyone = _resolve_peers(index, policy_ns, peers)
        as_blocks = (
            EVERYWHERE
            if everyone
            else tuple(Block(_host(a)) for p in pods for a in p.addrs()) + blocks
        )
        hit = index.peers_memo[key] = (pods, blocks, everyone, as_blocks)
    return hit


def _resolve_peers(index: _Index, policy_ns: str, peers: list[Obj] | None) -> tuple[Any, ...]:
    if not peers:
        return (), (), True
    pods: dict[str, _Pod] = {}
    blocks: list[Block] = []
    for peer in peers:
        if "ipBlock" in peer:
            b = _block_of(peer["ipBlock"])
            if b is not None:
                blocks.append(b)
            continue
        for p in _peer_pods(index, policy_ns, peer):
            pods[p.ip] = p
    return tuple(pods[ip] for ip in sorted(pods, key=_cidr_order)), tuple(blocks), False


def _describe_peers(peers: list[Obj] | None) -> str:
    if not peers:
        return "from/to anywhere"
    words = []
    for peer in peers:
        if "ipBlock" in peer:
            b = peer["ipBlock"]
            exc = f" except {', '.join(b['except'])}" if b.get("except") else ""
            words.append(f"ipBlock {b['cidr']}{exc}")
            continue
        parts = []
        if "namespaceSelector" in peer:
            parts.append(f"namespaces {_describe_selector(peer['namespaceSelector'])}")
        if "podSelector" in peer:
            parts.append(f"pods {_describe_selector(peer['podSelector'])}")
        words.append(
            " and ".join(parts) if "namespaceSelector" in peer else parts[0] + " (same ns)"
        )
    return "; ".join(words)


def _describe_selector(sel: Obj) -> str:
    terms = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
    for r in sel.get("matchExpressions") or []:
        vals = ",".join(r.get("values") or [])
        terms.append(f"{r['key']} {r['operator']}" + (f" ({vals})" if vals else ""))
    return "{" + ", ".join(terms) + "}" if terms else "{} (all)"


def _describe_ports(ports: list[Obj] | None) -> str:
    if not ports:
        return "any protocol, any port"
    words = []
    for p in ports:
        proto = p.get("protocol", "TCP")
        if "port" not in p:
            words.append(f"{proto} any port")
        elif "endPort" in p:
            words.append(f"{proto} {p['port']}-{p['endPort']}")
        else:
            words.append(f"{proto} {p['port']}")
    return ", ".join(words)


def _rule_classes(
    rule: _Rule, direction: Direction, me: _Pod, index: _Index, notes: list[str]
) -> list[RuleClass]:
    """A rule as classes: numeric ports and the peer set, plus (egress) one class per number a
    named port resolves to on the peer pods."""
    peers = rule.peer_blocks
    if not rule.ports:
        return [RuleClass(None, peers, (rule.source,))]
    numeric: list[PortRange] = []
    named: list[tuple[str, str]] = []
    for p in rule.ports:
        proto = p.get("protocol", "TCP")
        if proto == "SCTP":
            notes.append(f"{rule.source}: SCTP cannot match on this kernel (no SCTP)")
        if "port" not in p:
            numeric.append(PortRange(proto, *ALL_PORTS))
        elif isinstance(p["port"], int):
            numeric.append(PortRange(proto, p["port"], p.get("endPort", p["port"])))
        elif direction == "ingress":
            number = me.ports.get((p["port"], proto))
            if number is not None:
                numeric.append(PortRange(proto, number, number))
        else:
            named.append((p["port"], proto))
    out = []
    if numeric:
        out.append(RuleClass(tuple(sorted(set(numeric))), peers, (rule.source,)))
    for name, proto in named:
        # the destination pods carrying the name, grouped by the number it means on each
        candidates = rule.pods
        if rule.everyone or rule.blocks:
            candidates = tuple(
                q
                for q in index.all_pods()
                if rule.everyone
                or q in rule.pods
                or any(_in_block(a, b) for a in q.addrs() for b in rule.blocks)
            )
        by_number: dict[int, list[str]] = defaultdict(list)
        for dst in candidates:
            number = dst.ports.get((name, proto))
            if number is not None:
                by_number[number] += dst.addrs()
        for number, ips in sorted(by_number.items()):
            blocks = tuple(Block(_host(ip)) for ip in sorted(set(ips), key=_cidr_order))
            out.append(RuleClass((PortRange(proto, number, number),), blocks, (rule.source,)))
    return out


def _merge(classes: list[RuleClass]) -> list[RuleClass]:
    """Classes with the same port set become one (peers united: exact), in a stable order."""
    by_ports: dict[tuple[PortRange, ...] | None, tuple[set[Block], set[str]]] = {}
    for c in classes:
        peers, sources = by_ports.setdefault(c.ports, (set(), set()))
        peers.update(c.peers)
        sources.update(c.sources)
    out = [
        RuleClass(
            ports,
            tuple(sorted(peers, key=lambda b: (_cidr_order(b.cidr), b.excepts))),
            tuple(sorted(sources)),
        )
        for ports, (peers, sources) in by_ports.items()
    ]
    return sorted(out, key=lambda c: (c.ports is not None, c.ports or (), c.peers))


def policy_types(spec: Obj) -> list[str]:
    """policyTypes as the API server defaults them: an absent or empty list means Ingress, plus
    Egress when the policy has at least one egress rule."""
    types = spec.get("policyTypes") or []
    if types:
        return list(types)
    return ["Ingress", "Egress"] if spec.get("egress") else ["Ingress"]


def _policies_by_ns(resources: Resources) -> dict[str, list[tuple[str, Obj]]]:
    out: dict[str, list[tuple[str, Obj]]] = defaultdict(list)
    for (ns, name), pol in sorted(resources.get("NetworkPolicy", {}).items()):
        out[ns or "default"].append((name, pol))
    return out


def endpoint_policy(
    index: _Index, policies: list[tuple[str, Obj]], me: _Pod
) -> EndpointPolicy | None:
    """The policy of one pod, None if no policy selects it (isolated in no direction)."""
    result: dict[Direction, DirectionPolicy] = {}
    for direction, key, peers_key in (("ingress", "Ingress", "from"), ("egress", "Egress", "to")):
        selecting: list[str] = []
        classes: list[RuleClass] = []
        notes: list[str] = []
        for name, pol in policies:
            spec = pol.get("spec", {})
            if key not in policy_types(spec):
                continue
            if not match_labels(spec.get("podSelector", {}), me.labels):
                continue
            selecting.append(f"{me.namespace}/{name}")
            for i, rule in enumerate(spec.get(direction) or []):
                pods, blocks, everyone, as_blocks = _peers_of(
                    index, me.namespace, rule.get(peers_key)
                )
                peers_words = _describe_peers(rule.get(peers_key))
                source = (
                    f"{me.namespace}/{name} {direction}[{i}]: {peers_words}"
                    f"; {_describe_ports(rule.get('ports'))}"
                )
                ports = list(rule.get("ports") or [])
                r = _Rule(source, pods, blocks, everyone, ports, as_blocks)
                classes += _rule_classes(r, direction, me, index, notes)  # type: ignore[arg-type]
        result[direction] = DirectionPolicy(  # type: ignore[index]
            bool(selecting), tuple(selecting), tuple(_merge(classes)), tuple(sorted(set(notes)))
        )
    if not result["ingress"].isolated and not result["egress"].isolated:
        return None
    errors = tuple(
        f"{d}: {len(result[d].classes)} rule classes, more than the {MAX_CLASSES} supported: "
        "not programmed"
        for d in ("ingress", "egress")
        if len(result[d].classes) > MAX_CLASSES
    )
    return EndpointPolicy(
        me.namespace, me.name, me.ip, result["ingress"], result["egress"], errors, me.ip6
    )


def compute(resources: Resources, node: str | None) -> dict[str, EndpointPolicy]:
    """Every isolated pod of ``node`` (every node: None), by pod address."""
    index = _Index(resources)
    policies = _policies_by_ns(resources)
    out: dict[str, EndpointPolicy] = {}
    for pod in index.all_pods():
        if node is not None and pod.node != node:
            continue
        ep = endpoint_policy(index, policies.get(pod.namespace, []), pod)
        if ep is not None:
            out[pod.ip] = ep
    return out


# --- compiling classes into LPM entries ----------------------------------------------------


@functools.lru_cache(maxsize=1 << 16)
def _supernets(cidr: str) -> tuple[str, ...]:
    """The CIDR and every shorter prefix containing it, longest first."""
    value, plen = _cidr_order(cidr)
    if value >= V6_ORDER:
        net = ipaddress.IPv6Network(cidr)
        return tuple(str(net.supernet(new_prefix=p)) for p in range(plen, -1, -1))
    out = []
    for p in range(plen, -1, -1):
        v = value & ((0xFFFFFFFF << (32 - p)) & 0xFFFFFFFF)
        out.append(f"{v >> 24}.{(v >> 16) & 255}.{(v >> 8) & 255}.{v & 255}/{p}")
    return tuple(out)


def compile_peers(classes: tuple[RuleClass, ...]) -> tuple[tuple[str, int], ...]:
    """Prefix -> bitmap of the classes holding every address whose longest match it is."""
    holders: dict[str, list[tuple[int, tuple[str, ...]]]] = defaultdict(list)
    prefixes: set[str] = set()
    for i, c in enumerate(classes):
        for b in c.peers:
            holders[b.cidr].append((i, b.excepts))
            prefixes.add(b.cidr)
            prefixes.update(b.excepts)
    # only the prefix lengths some holder has can hold an address: a few lookups per prefix
    lengths = sorted({_cidr_order(c)[1] for c in holders}, reverse=True)
    out = []
    for p in sorted(prefixes, key=_cidr_order):
        ancestors = _supernets(p)  # index k: the /(plen - k) containing p
        plen = len(ancestors) - 1
        bits = 0
        for length in lengths:
            if length > plen:
                continue
            for i, excepts in holders.get(ancestors[plen - length], ()):
                if not excepts or not any(e in ancestors for e in excepts):
                    bits |= 1 << i
        out.append((p, bits))
    return tuple(out)


def port_prefixes(lo: int, hi: int) -> list[tuple[int, int]]:
    """lo..hi as aligned (value, prefixlen) blocks of the 16-bit port space."""
    out = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << 16
        while size > hi - lo + 1:
            size >>= 1
        out.append((lo, 16 - size.bit_length() + 1))
        lo += size
    return out


def compile_ports(
    classes: tuple[RuleClass, ...],
) -> tuple[tuple[tuple[int, int, int, int], ...], int]:
    """(proto, port, prefixlen, bits) entries and the any-protocol bitmap."""
    own: dict[tuple[int, int, int], int] = defaultdict(int)
    any_proto = 0
    for i, c in enumerate(classes):
        if c.ports is None:
            any_proto |= 1 << i
            continue
        for r in c.ports:
            for value, plen in port_prefixes(r.lo, r.hi):
                own[(PROTOCOLS[r.protocol], value, plen)] |= 1 << i
    out = []
    for proto, value, plen in sorted(own):
        bits = 0
        for q in range(plen, -1, -1):
            mask = (0xFFFF << (16 - q)) & 0xFFFF
            bits |= own.get((proto, value & mask, q), 0)
        out.append((proto, value, plen, bits))
    return tuple(out), any_proto


def compile_direction(d: DirectionPolicy) -> CompiledDirection:
    if not d.isolated:
        return CompiledDirection()
    ports, any_proto = compile_ports(d.classes)
    return CompiledDirection(compile_peers(d.classes), ports, any_proto)


def allows(d: DirectionPolicy, peer: str, protocol: str, port: int) -> bool:
    """What the datapath decides, computed from the compiled entries (tests, dump): the peer's
    longest prefix and the port's longest prefix share a class."""
    if not d.isolated:
        return True
    c = compile_direction(d)
    addr = ipaddress.ip_address(peer)
    best: tuple[int, int] | None = None
    for cidr, bits in c.peers:
        net = ipaddress.ip_network(cidr)
        if (
            net.version == addr.version
            and addr in net
            and (best is None or net.prefixlen > best[0])
        ):
            best = (net.prefixlen, bits)
    peer_bits = best[1] if best else 0
    proto = PROTOCOLS.get(protocol, -1)
    pbest: tuple[int, int] | None = None
    for pr, value, plen, bits in c.ports:
        mask = (0xFFFF << (16 - plen)) & 0xFFFF
        if pr == proto and port & mask == value and (pbest is None or plen > pbest[0]):
            pbest = (plen, bits)
    port_bits = (pbest[1] if pbest else 0) | c.any_proto
    return bool(peer_bits & port_bits)


# --- words a user can check against their YAML -----------------------------------------------


def describe(ep: EndpointPolicy, pod_names: Mapping[str, str]) -> dict[str, Any]:
    """What the datapath allows for one pod: per direction the isolating policies, each allowed
    (peers, ports) with the rules it came from, and notes. ``pod_names`` maps pod IPs to
    "ns/name" so selected pods are shown by name."""

    def peer_words(b: Block) -> str:
        ip, _, plen = b.cidr.partition("/")
        if plen == ("128" if ":" in ip else "32") and not b.excepts:
            return f"pod {pod_names[ip]} ({ip})" if ip in pod_names else ip
        if b.cidr in ("0.0.0.0/0", "::/0") and not b.excepts:
            return "anywhere"
        return b.cidr + (f" except {', '.join(b.excepts)}" if b.excepts else "")

    out: dict[str, Any] = {"pod": f"{ep.namespace}/{ep.name}", "ip": ep.ip}
    if ep.ip6:
        out["ip6"] = ep.ip6
    for d in ("ingress", "egress"):
        dp = ep.direction(d)
        rules = []
        for c in dp.classes:
            ports = (
                ["any protocol, any port"] if c.ports is None else [p.describe() for p in c.ports]
            )
            rules.append(
                {
                    "peers": list(dict.fromkeys(peer_words(b) for b in c.peers)) or ["nobody"],
                    "ports": ports,
                    "from_rules": list(c.sources),
                }
            )
        out[d] = {
            "isolated": dp.isolated,
            "policies": list(dp.policies),
            "allow": rules,
            "otherwise": (
                f"denied (default deny: isolated by {', '.join(dp.policies)})"
                if dp.isolated
                else "allowed (no policy selects the pod for this direction)"
            ),
            "notes": list(dp.notes),
        }
    out["errors"] = list(ep.errors)
    return out


def describe_unselected(namespace: str, name: str, ip: str) -> dict[str, Any]:
    words = "allowed (no policy selects the pod for this direction)"
    none = {"isolated": False, "policies": [], "allow": [], "otherwise": words, "notes": []}
    return {
        "pod": f"{namespace}/{name}",
        "ip": ip,
        "ingress": none,
        "egress": dict(none),
        "errors": [],
    }


def pod_names(resources: Resources) -> dict[str, str]:
    index = _Index(resources)
    return {a: f"{p.namespace}/{p.name}" for p in index.all_pods() for a in p.addrs()}

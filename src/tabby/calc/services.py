"""Services + EndpointSlices -> this node's NAT frontends and backend sets, as kube-proxy sees them.

``ServiceIndex`` is pure and in memory: it is told about every Service and EndpointSlice and
recomputes only the services whose objects changed (one endpoint change costs one service, not a
full resync). ``results()`` maps "namespace/name" to a frozen ``ServiceNAT``; a service that did
not change keeps the very same object, so the NAT manager finds the changes by identity.

kube-proxy's rules, followed here:
- left alone: ExternalName, headless (clusterIP None), unallocated clusterIP, and services
  labelled ``service.kubernetes.io/service-proxy-name`` or ``service.kubernetes.io/headless``;
- endpoints: a slice port matches a service port by name and protocol; addresses are deduplicated;
  the usable set is the ready endpoints, else the serving+terminating ones (for the cluster-wide
  and for the node-local set separately);
- internalTrafficPolicy Local: ClusterIP frontends use the node-local set; externalTrafficPolicy
  Local: NodePort/LoadBalancer/externalIP frontends use it; an empty local set drops (kube-proxy's
  "has no local endpoints") where an empty cluster set rejects ("has no endpoints");
- NodePorts answer on this node's address; loadBalancerSourceRanges apply to LoadBalancer IPs;
- healthCheckNodePort reports the node-local ready endpoints.

Calico's annotation ``lb.projectcalico.org/external-traffic-strategy: maglev`` marks the external
frontends (NodePort, LoadBalancer, externalIP) ``NAT_MAGLEV``: their new flows take the backend
from the set's Maglev table (calc.maglev, written by dataplane/nat.py) by the flow's hash.

IPv6: a Service's IPv6 clusterIP(s) get ClusterIP frontends over the IPv6 EndpointSlices, and
its NodePorts a frontend on the node's IPv6 address, in ``ServiceNAT.ipv6`` (the IPv6 NAT
manager: ClusterIPs at connect(), NodePorts per packet, bpf/include/tabby/nat6.h); IPv6
externalIPs and LoadBalancer IPs are not handled yet (a warning says so).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import immutables

from tabby.calc.packed import pack, unpack

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, name)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SKIP_LABELS = ("service.kubernetes.io/service-proxy-name", "service.kubernetes.io/headless")
DEFAULT_AFFINITY_S = 10800

# tby_nat_fe_val.flags: mirror of TBY_NAT_* in bpf/include/tabby/types.h (checked by a test)
NAT_AFFINITY = 1
NAT_DROP_EMPTY = 2
NAT_SRC_RANGES = 4
NAT_EXTERNAL = 8
NAT_MAGLEV = 16
MAGLEV_ANNOTATION = "lb.projectcalico.org/external-traffic-strategy"

Backend = tuple[str, int]  # (address, port)


@dataclass(frozen=True, slots=True)  # 20,000 of each live in the agent
class Frontend:
    addr: str
    port: int
    protocol: str  # TCP | UDP
    backend_set: str  # a key of ServiceNAT.backend_sets
    flags: int = 0
    affinity_s: int = 0
    source_ranges: tuple[str, ...] = ()
    kind: str = "ClusterIP"  # ClusterIP | NodePort | LoadBalancer | ExternalIP (for dumps)


@dataclass(frozen=True, slots=True)
class ServiceNAT:
    key: str  # "namespace/name"
    frontends: tuple[Frontend, ...]
    backend_sets: Mapping[str, tuple[Backend, ...]]
    health_check_port: int = 0
    local_endpoints: int = 0
    warnings: tuple[str, ...] = ()
    ipv6: ServiceNAT | None = None  # the IPv6 ClusterIP frontends and their backend sets


# One endpoint of one service port: (address, port, ready, serving+terminating, on this node).
# A plain tuple: calc builds 60,000 of them for 20,000 services, and a class costs 3x as much.
_Endpoint = tuple[str, int, bool, bool, bool]


def proxied(service: Obj) -> bool:
    """Does kube-proxy (and so tabby) handle this Service at all?"""
    labels = service.get("metadata", {}).get("labels") or {}
    if any(label in labels for label in SKIP_LABELS):
        return False
    spec = service.get("spec", {})
    if spec.get("type") == "ExternalName":
        return False
    return spec.get("clusterIP") not in (None, "", "None")


def usable(endpoints: list[_Endpoint]) -> tuple[Backend, ...]:
    """Ready endpoints, else serving+terminating ones (kube-proxy's fallback); sorted, unique."""
    chosen = {(e[0], e[1]) for e in endpoints if e[2]}
    if not chosen:
        chosen = {(e[0], e[1]) for e in endpoints if e[3]}
    return tuple(sorted(chosen))


_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"  # no leading zeros, ASCII digits
_DOTTED_QUAD = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}")


def _ipv4(addr: Any) -> bool:
    # Called for every endpoint of every service (80,000 times at 20k services x 3): the
    # common dotted quad skips ipaddress, which took a quarter of a 20k-service cold start.
    text = str(addr)
    if _DOTTED_QUAD.fullmatch(text):
        return True
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv4Address)
    except ValueError:
        return False


def _ipv6(addr: Any) -> bool:
    # Asked of every clusterIP (20,000 at 20k services): one without a colon is no IPv6
    # address, and skipping ipaddress there took a quarter off a 20k-service calc.
    if ":" not in str(addr):
        return False
    try:
        return isinstance(ipaddress.ip_address(str(addr)), ipaddress.IPv6Address)
    except ValueError:
        return False


def _endpoints_for(port: Obj, slices: list[Obj], node: str, family: int = 4) -> list[_Endpoint]:
    name, protocol = port.get("name", ""), port.get("protocol", "TCP")
    address_type, valid = ("IPv4", _ipv4) if family == 4 else ("IPv6", _ipv6)
    out: list[_Endpoint] = []
    for sl in slices:
        if sl.get("addressType") != address_type:
            continue
        number = 0
        for p in sl.get("ports") or ():
            if (p.get("name") or "") == name and p.get("protocol", "TCP") == protocol:
                number = int(p.get("port") or 0)
                break
        if not number:
            continue
        for ep in sl.get("endpoints") or ():
            addrs = ep.get("addresses")
            if not addrs or not valid(addrs[0]):  # one address per endpoint is used
                continue
            cond = ep.get("conditions")
            if cond:
                ready = cond.get("ready") is not False  # unset means ready (the API's rule)
                serving = cond.get("serving", ready) is not False
                fallback = serving and bool(cond.get("terminating", False))
            else:
                ready, fallback = True, False
            out.append((addrs[0], number, ready, fallback, ep.get("nodeName") == node))
    return out


def service_nat(
    service: Obj, slices: list[Obj], node: str, node_ip: str | None, node_ip6: str | None = None
) -> ServiceNAT:
    """One Service's frontends and backend sets as seen from ``node``."""
    meta, spec = service["metadata"], service.get("spec", {})
    key = f"{meta.get('namespace', 'default')}/{meta['name']}"
    stype = spec.get("type", "ClusterIP")
    external_local = spec.get("externalTrafficPolicy") == "Local"
    internal_local = spec.get("internalTrafficPolicy") == "Local"
    affinity = spec.get("sessionAffinity") == "ClientIP"
    affinity_s = (
        int(
            ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}).get(
                "timeoutSeconds", DEFAULT_AFFINITY_S
            )
        )
        if affinity
        else 0
    )
    base_flags = NAT_AFFINITY if affinity else 0
    strategy = (meta.get("annotations") or {}).get(MAGLEV_ANNOTATION)
    maglev = strategy == "maglev"
    cluster_ips = [ip for ip in (spec.get("clusterIPs") or [spec.get("clusterIP")]) if _ipv4(ip)]
    lb_ips = [
        ing["ip"]
        for ing in ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        if _ipv4(ing.get("ip")) and ing.get("ipMode", "VIP") == "VIP"
    ]
    ranges = tuple(spec.get("loadBalancerSourceRanges") or ())
    frontends: list[Frontend] = []
    sets: dict[str, tuple[Backend, ...]] = {}
    local_ready: set[str] = set()
    warnings: list[str] = []
    if strategy is not None and not maglev:
        warnings.append(f"{key}: {MAGLEV_ANNOTATION} {strategy!r} unknown (maglev): ignored")

    for port in spec.get("ports") or []:
        proto = port.get("protocol", "TCP")
        if proto not in ("TCP", "UDP"):
            warnings.append(f"{key} port {port.get('port')}/{proto}: not supported (TCP/UDP only)")
            continue
        endpoints = _endpoints_for(port, slices, node)
        label = f"{key}:{port.get('name') or port['port']}/{proto}"
        sets[f"{label}:cluster"] = usable(endpoints)
        if internal_local or external_local:
            local = [e for e in endpoints if e[4]]
            sets[f"{label}:local"] = usable(local)
            local_ready |= {e[0] for e in local if e[2]}
        internal = f"{label}:{'local' if internal_local else 'cluster'}"
        external = f"{label}:{'local' if external_local else 'cluster'}"
        internal_flags = base_flags | (NAT_DROP_EMPTY if internal_local else 0)
        external_flags = base_flags | NAT_EXTERNAL | (NAT_DROP_EMPTY if external_local else 0)
        external_flags |= NAT_MAGLEV if maglev else 0

        wanted: list[tuple[str, int, str, int, str, tuple[str, ...]]] = [
            (ip, port["port"], internal, internal_flags, "ClusterIP", ()) for ip in cluster_ips
        ]
        if stype in ("NodePort", "LoadBalancer") and port.get("nodePort") and node_ip:
            wanted.append((node_ip, port["nodePort"], external, external_flags, "NodePort", ()))
        for ip in spec.get("externalIPs") or []:
            if _ipv4(ip):
                wanted.append((ip, port["port"], external, external_flags, "ExternalIP", ()))
        if stype == "LoadBalancer":
            for ip in lb_ips:
                wanted.append((ip, port["port"], external, external_flags, "LoadBalancer", ranges))
        for addr, number, bset, flags, kind, src in wanted:
            flags |= NAT_SRC_RANGES if src else 0
            frontends.append(Frontend(addr, number, proto, bset, flags, affinity_s, src, kind))
    used = {f.backend_set for f in frontends}
    v6_ips = [ip for ip in (spec.get("clusterIPs") or [spec.get("clusterIP")]) if _ipv6(ip)]
    ipv6 = (
        _ipv6_nat(key, spec, slices, node, v6_ips, base_flags, affinity_s, node_ip6)
        if v6_ips
        else None
    )
    if ipv6 is not None and (
        stype == "LoadBalancer" or any(_ipv6(ip) for ip in spec.get("externalIPs") or [])
    ):
        warnings.append(
            f"{key}: IPv6 is served on its ClusterIP and NodePorts only (not LoadBalancer "
            "or externalIPs)"
        )
    health = 0
    if stype in ("NodePort", "LoadBalancer") and external_local:
        health = int(spec.get("healthCheckNodePort") or 0)
    return ServiceNAT(
        key=key,
        frontends=tuple(frontends),
        backend_sets={name: bs for name, bs in sets.items() if name in used},
        health_check_port=health,
        local_endpoints=len(local_ready),
        warnings=tuple(warnings),
        ipv6=ipv6,
    )


def _ipv6_nat(
    key: str,
    spec: Obj,
    slices: list[Obj],
    node: str,
    cluster_ips: list[str],
    flags: int,
    affinity_s: int,
    node_ip6: str | None,
) -> ServiceNAT:
    """The IPv6 ClusterIP (and NodePort, on ``node_ip6``) frontends of one Service, over its
    IPv6 EndpointSlices; the traffic policies as for IPv4 (Local: the node's endpoints, none
    drops)."""
    internal_local = spec.get("internalTrafficPolicy") == "Local"
    external_local = spec.get("externalTrafficPolicy") == "Local"
    node_ports = spec.get("type") in ("NodePort", "LoadBalancer") and node_ip6
    frontends: list[Frontend] = []
    sets: dict[str, tuple[Backend, ...]] = {}
    for port in spec.get("ports") or []:
        proto = port.get("protocol", "TCP")
        if proto not in ("TCP", "UDP"):
            continue
        endpoints = _endpoints_for(port, slices, node, family=6)
        label = f"{key}:{port.get('name') or port['port']}/{proto}:ipv6"
        sets[label] = usable(endpoints)
        sets[f"{label}:local"] = usable([e for e in endpoints if e[4]])
        internal = f"{label}:local" if internal_local else label
        bflags = flags | (NAT_DROP_EMPTY if internal_local else 0)
        for ip in cluster_ips:
            frontends.append(Frontend(ip, port["port"], proto, internal, bflags, affinity_s))
        if node_ports and port.get("nodePort"):
            external = f"{label}:local" if external_local else label
            eflags = flags | NAT_EXTERNAL | (NAT_DROP_EMPTY if external_local else 0)
            frontends.append(
                Frontend(
                    str(node_ip6),
                    port["nodePort"],
                    proto,
                    external,
                    eflags,
                    affinity_s,
                    kind="NodePort",
                )
            )
    used = {f.backend_set for f in frontends}
    return ServiceNAT(
        key=key,
        frontends=tuple(frontends),
        backend_sets={name: bs for name, bs in sets.items() if name in used},
    )


class ServiceIndex:
    """Services and slices of the whole cluster -> ServiceNAT of each proxied service.

    Every ``on_*`` call only records the object and marks its service dirty; ``results()``
    recomputes the dirty ones. Changing the node's address marks everything dirty (NodePorts).
    Objects are kept packed (calc.packed: a tenth of the memory of decoded ones) and unpacked
    only when their service is recomputed, so a streamed list never holds them all decoded.
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self.node_ip: str | None = None
        self.node_ip6: str | None = None
        self._services: dict[Key, bytes] = {}  # packed
        self._slices: dict[Key, dict[str, bytes]] = {}  # service key -> slice name -> packed
        self._slice_owner: dict[Key, Key] = {}  # slice key -> service key
        # persistent (a HAMT): results() hands it to the dataplane thread as it is, and a
        # change costs O(log n) instead of a copy of every service's entry
        self._results: immutables.Map[str, ServiceNAT] = immutables.Map()
        self._dirty: set[Key] = set()
        self._listed: list[str] = []  # names computed by compute_listed since results()
        # what with_services needs of every result, kept here so a change does not walk them all
        self.health_checks: dict[str, tuple[int, int]] = {}  # name -> (node port, local eps)
        self.warnings: dict[str, tuple[str, ...]] = {}  # name -> warnings, services with some
        # names the last results() recomputed or removed; None from a new index's first call: it
        # cannot name what an earlier index had and it lacks (deleted while relisting)
        self.changed: frozenset[str] | None = None
        self._fresh = True

    def set_node_ip(self, node_ip: str | None, node_ip6: str | None = None) -> None:
        if (node_ip, node_ip6) != (self.node_ip, self.node_ip6):
            self.node_ip, self.node_ip6 = node_ip, node_ip6
            self._dirty |= set(self._services)

    def on_service(self, key: Key, obj: Obj | None) -> None:
        if obj is None:
            self._services.pop(key, None)
        else:
            self._services[key] = pack(obj)
        self._dirty.add(key)

    def on_slice(self, key: Key, obj: Obj | None) -> None:
        old_owner = self._slice_owner.pop(key, None)
        if old_owner is not None:
            self._slices.get(old_owner, {}).pop(key[1], None)
            self._dirty.add(old_owner)
        if obj is None:
            return
        svc = (obj.get("metadata", {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
        if not svc:
            return
        owner = (key[0], svc)
        self._slice_owner[key] = owner
        self._slices.setdefault(owner, {})[key[1]] = pack(obj)
        self._dirty.add(owner)

    def compute_listed(self, key: Key, obj: Obj) -> None:
        """``key``'s Service, just recorded with ``on_service(key, obj)``, computed at once from
        ``obj`` (no unpacking) over the slices recorded so far. For a relist that streams the
        EndpointSlices before the Services: each service is then computed once, while the list
        is read, and the first ``results()`` has nothing left to do. A slice recorded later
        marks the service dirty again, as usual."""
        if key in self._dirty:
            self._dirty.discard(key)
            self._listed.append(self._compute(key, obj))

    def _compute(self, key: Key, svc: Obj | None) -> str:
        """Recompute one service (``svc``: its Service decoded, None if gone); its name."""
        name = f"{key[0]}/{key[1]}"
        self.health_checks.pop(name, None)
        self.warnings.pop(name, None)
        if svc is None or not proxied(svc):
            if name in self._results:  # Map.delete raises on a missing key
                self._results = self._results.delete(name)
            return name
        slices = [unpack(sl) for sl in self._slices.get(key, {}).values()]
        nat = service_nat(svc, slices, self.node, self.node_ip, self.node_ip6)
        self._results = self._results.set(name, nat)
        if nat.health_check_port:
            self.health_checks[name] = (nat.health_check_port, nat.local_endpoints)
        if nat.warnings:
            self.warnings[name] = nat.warnings
        return name

    def results(self) -> Mapping[str, ServiceNAT]:
        """An immutable snapshot (safe to hand to another thread, O(1) to take) sharing
        unchanged ServiceNAT objects.

        ``changed`` then names the services recomputed or removed since the previous call
        (a superset of those whose ServiceNAT differs from the previous call's), or is None on
        a new index's first call (compare everything: services deleted during a relist are in
        no index)."""
        changed = self._listed
        for key in self._dirty:
            packed = self._services.get(key)
            changed.append(self._compute(key, unpack(packed) if packed is not None else None))
        self._dirty.clear()
        self._listed = []
        self.changed = None if self._fresh else frozenset(changed)
        self._fresh = False
        return self._results

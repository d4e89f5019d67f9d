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
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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


def _endpoints_for(port: Obj, slices: list[Obj], node: str) -> list[_Endpoint]:
    name, protocol = port.get("name", ""), port.get("protocol", "TCP")
    out: list[_Endpoint] = []
    for sl in slices:
        if sl.get("addressType") != "IPv4":
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
            if not addrs or not _ipv4(addrs[0]):  # one address per endpoint is used
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


def service_nat(service: Obj, slices: list[Obj], node: str, node_ip: str | None) -> ServiceNAT:
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
        self._services: dict[Key, bytes] = {}  # packed
        self._slices: dict[Key, dict[str, bytes]] = {}  # service key -> slice name -> packed
        self._slice_owner: dict[Key, Key] = {}  # slice key -> service key
        self._results: dict[str, ServiceNAT] = {}
        self._dirty: set[Key] = set()
        # what with_services needs of every result, kept here so a change does not walk them all
        self.health_checks: dict[str, tuple[int, int]] = {}  # name -> (node port, local eps)
        self.warnings: dict[str, tuple[str, ...]] = {}  # name -> warnings, services with some
        self.changed: frozenset[str] = frozenset()  # names the last results() recomputed

    def set_node_ip(self, node_ip: str | None) -> None:
        if node_ip != self.node_ip:
            self.node_ip = node_ip
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

    def results(self) -> dict[str, ServiceNAT]:
        """A fresh dict (safe to hand to another thread) sharing unchanged ServiceNAT objects.

        ``changed`` then names the services recomputed or removed by this call (a superset of
        those whose ServiceNAT differs from the previous call's)."""
        changed = []
        for key in self._dirty:
            name = f"{key[0]}/{key[1]}"
            changed.append(name)
            packed = self._services.get(key)
            svc = unpack(packed) if packed is not None else None
            self.health_checks.pop(name, None)
            self.warnings.pop(name, None)
            if svc is None or not proxied(svc):
                self._results.pop(name, None)
                continue
            slices = [unpack(sl) for sl in self._slices.get(key, {}).values()]
            nat = service_nat(svc, slices, self.node, self.node_ip)
            self._results[name] = nat
            if nat.health_check_port:
                self.health_checks[name] = (nat.health_check_port, nat.local_endpoints)
            if nat.warnings:
                self.warnings[name] = nat.warnings
        self._dirty.clear()
        self.changed = frozenset(changed)
        return dict(self._results)

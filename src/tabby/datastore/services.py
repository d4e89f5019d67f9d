"""Service admission: what kube-apiserver does to a Service before storing it.

A datastore builds one ``ServiceAllocator`` from every stored Service *inside* its write
transaction and passes each Service it writes through ``admit``; the transaction serialises
writers, so two writers never hand out the same address or port. Pure: no I/O, so an etcd or
Kubernetes datastore can reuse it.

Rules (kube-apiserver's, see docs/design/datastore.md):
- The service CIDR may be dual-stack, ``"<IPv4 CIDR>,<IPv6 CIDR>"`` (kube-apiserver's form; the
  first is the primary family). A Service holds one cluster IP per family it asks for:
  ``ipFamilies`` (default: the primary), ``ipFamilyPolicy`` SingleStack (default: the first of
  ``ipFamilies``), PreferDualStack (every configured family, ``ipFamilies`` first) or
  RequireDualStack (both, else an error); ``clusterIPs`` lists them in that order.
- Every type but ExternalName holds a cluster IP from the service CIDR; ``""`` or absent means
  "allocate one", ``None`` is headless (no address held). ``clusterIPs`` follows ``clusterIP``.
  An explicit address must lie in the CIDR, be free, and not be the first host address (kept
  for ``default/kubernetes``). Once set it is immutable; an update that leaves it out keeps it.
- NodePort and LoadBalancer ports hold node ports from 30000-32767; LoadBalancer with
  ``allocateLoadBalancerNodePorts: false`` gets none allocated (explicit ones are still held).
  The node-port space is one pool across protocols, as kube-apiserver's: a port held by one
  Service cannot be used by another, whatever the protocol. Within one Service, ports with the
  same port number and different protocols (DNS's 53/TCP + 53/UDP) share one node port.
- LoadBalancer + ``externalTrafficPolicy: Local`` holds a ``healthCheckNodePort`` from the same
  pool. An update keeps node ports (matched by port name, then by port number and protocol) and
  the health-check port unless it gives new ones.
- Allocation is deterministic (kube-apiserver picks at random): the lowest free value of the
  upper band first, then of the lower band. The lower band (KEP-3070/KEP-3668: the first
  min(max(16, size/16), 256) addresses, min(max(16, size/32), 128) node ports) is thereby left
  to explicit choices such as kube-dns's ``.10``, as kube-apiserver does.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from tabby.model import ValidationError
from tabby.model.validate import ref

Obj = dict[str, Any]

DEFAULT_SERVICE_CIDR = "100.64.0.0/13"  # kOps' serviceClusterIPRange default
NODE_PORTS = range(30000, 32768)  # kube-apiserver's --service-node-port-range default
KUBERNETES = "default/kubernetes"  # the one Service that may hold the first host address


def parse_service_cidrs(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """``"cidr"`` or ``"cidr4,cidr6"`` (either order, one per family); ValueError says why."""
    nets = [ipaddress.ip_network(part.strip()) for part in text.split(",")]
    if len(nets) > 2 or len({n.version for n in nets}) != len(nets):
        raise ValueError(f"{text!r}: one CIDR, or one IPv4 and one IPv6 CIDR")
    for net in nets:
        if net.num_addresses < 4:
            raise ValueError(f"service CIDR {net} is too small")
    return nets


def needs_cluster_ip(spec: Obj) -> bool:
    return bool(spec.get("type", "ClusterIP") != "ExternalName")


def has_node_ports(spec: Obj) -> bool:
    return spec.get("type") in ("NodePort", "LoadBalancer")


def allocates_node_ports(spec: Obj) -> bool:
    if spec.get("type") == "LoadBalancer":
        return spec.get("allocateLoadBalancerNodePorts") is not False  # absent: true
    return spec.get("type") == "NodePort"


def needs_health_check(spec: Obj) -> bool:
    """kube-apiserver's rule: only LoadBalancer with externalTrafficPolicy Local."""
    return spec.get("type") == "LoadBalancer" and spec.get("externalTrafficPolicy") == "Local"


def _owner(svc: Obj) -> str:
    meta = svc["metadata"]
    return f"{meta.get('namespace') or 'default'}/{meta['name']}"


def _node_ports(spec: Obj) -> Iterator[int]:
    for p in spec.get("ports", []):
        if p.get("nodePort"):
            yield int(p["nodePort"])
    if spec.get("healthCheckNodePort"):
        yield int(spec["healthCheckNodePort"])


def _static_band(size: int, step: int, most: int) -> int:
    """How many values at the bottom of a range dynamic allocation leaves for last."""
    if size <= 16:
        return 0
    return min(max(16, size // step), most)


def drop_type_dependent(new: Obj, old: Obj) -> Obj:
    """kube-apiserver's dropTypeDependentFields, for a patch that changes a Service's type.

    ``new`` is unvalidated (an old object with a merge patch applied). Fields the new type does
    not take are dropped when they still hold the old (possibly allocated) values, so
    ``{"spec": {"type": "ClusterIP"}}`` turns a NodePort Service into a ClusterIP one.
    """
    spec = new.get("spec")
    if new.get("kind") != "Service" or old.get("kind") != "Service" or not isinstance(spec, dict):
        return new
    before = old.get("spec", {})
    after = {**spec, "type": spec.get("type") or "ClusterIP"}
    if not has_node_ports(after) and spec.get("externalTrafficPolicy") == before.get(
        "externalTrafficPolicy"
    ):
        spec.pop("externalTrafficPolicy", None)
        after.pop("externalTrafficPolicy", None)
    if needs_cluster_ip(before) and not needs_cluster_ip(after):
        if (spec.get("clusterIP"), spec.get("clusterIPs")) == (
            before.get("clusterIP"),
            before.get("clusterIPs"),
        ):
            spec.pop("clusterIP", None)
            spec.pop("clusterIPs", None)
    ports = spec.get("ports")
    if has_node_ports(before) and not has_node_ports(after) and isinstance(ports, list):
        old_ports = [p.get("nodePort") for p in before.get("ports", [])]
        if [p.get("nodePort") if isinstance(p, dict) else None for p in ports] == old_ports:
            for p in ports:
                p.pop("nodePort", None)
    if needs_health_check(before) and not needs_health_check(after):
        if spec.get("healthCheckNodePort") == before.get("healthCheckNodePort"):
            spec.pop("healthCheckNodePort", None)
    if after["type"] != "LoadBalancer":
        spec.pop("allocateLoadBalancerNodePorts", None)
    return new


class ServiceAllocator:
    """The cluster IPs and node ports held by stored Services; hands out and checks more."""

    def __init__(self, service_cidr: str, services: Iterable[Obj]) -> None:
        nets = parse_service_cidrs(service_cidr)
        self.cidr = nets[0]  # the primary family's
        self.cidrs = {f"IPv{n.version}": n for n in nets}
        self.ips: dict[str, str] = {}  # cluster IP -> owner ("namespace/name")
        self.ports: dict[int, str] = {}  # node port (health-check ports too) -> owner
        for svc in services:
            self._hold(svc)

    def admit(self, new: Obj, old: Obj | None) -> Obj:
        """Fill in and check ``new``'s allocations (``old``: the stored version, if any).

        ``new`` is validated (model.validate) and is changed in place; raises ValidationError
        naming the field. On success ``new``'s allocations are held and ``old``'s released.
        """
        if old is not None:
            self._release(old)
        try:
            spec = new["spec"]
            before = old["spec"] if old is not None else None
            owner = _owner(new)
            if before is not None:
                _keep_node_ports(spec, before)
            self._cluster_ip(new, spec, before, owner)
            self._node_ports(new, spec)
            self._health_check_node_port(new, spec, before)
        except BaseException:
            if old is not None:
                self._hold(old)
            raise
        self._hold(new)
        return new

    # --- bookkeeping ---------------------------------------------------------------------------

    def _hold(self, svc: Obj) -> None:
        spec, owner = svc.get("spec", {}), _owner(svc)
        for addr in spec.get("clusterIPs") or [spec.get("clusterIP")]:
            if addr and addr != "None":
                self.ips[str(addr)] = owner
        for port in _node_ports(spec):
            self.ports[port] = owner

    def _release(self, svc: Obj) -> None:
        spec, owner = svc.get("spec", {}), _owner(svc)
        for addr in spec.get("clusterIPs") or [spec.get("clusterIP")]:
            if self.ips.get(str(addr)) == owner:
                del self.ips[str(addr)]
        for port in _node_ports(spec):
            if self.ports.get(port) == owner:
                del self.ports[port]

    # --- cluster IP ----------------------------------------------------------------------------

    def _cluster_ip(self, svc: Obj, spec: Obj, before: Obj | None, owner: str) -> None:
        if not needs_cluster_ip(spec):
            return
        want = spec.get("clusterIP") or ""
        had = before.get("clusterIP") if before is not None and needs_cluster_ip(before) else None
        if had:
            if not want:  # an update that leaves it out keeps it (as kubectl apply expects)
                spec["clusterIP"] = had
                spec["clusterIPs"] = list(before.get("clusterIPs") or [had]) if before else [had]
            elif want != had:
                raise _error(svc, "spec.clusterIP", f"field is immutable (it is {had})")
            return
        if want == "None":
            return
        families = self._families(svc, spec)
        given = [a for a in spec.get("clusterIPs") or ([want] if want else []) if a]
        if len(given) > len(families):
            why = (
                f"this datastore's service CIDR ({self.cidr}) is single-stack"
                if len(self.cidrs) == 1
                else f"more addresses than families ({', '.join(families)})"
            )
            raise _error(svc, f"spec.clusterIPs[{len(families)}]", why)
        addrs: list[str] = []
        for i, family in enumerate(families):
            net = self.cidrs[family]
            field = "spec.clusterIP" if i == 0 else f"spec.clusterIPs[{i}]"
            if i < len(given):
                addrs.append(self._check_ip(svc, given[i], owner, net, field))
            else:
                addrs.append(self._free_ip(svc, owner, net))
        spec["clusterIP"] = addrs[0]
        spec["clusterIPs"] = addrs

    def _families(self, svc: Obj, spec: Obj) -> list[str]:
        """The families a Service holds addresses of, in order (see the module)."""
        asked = list(spec.get("ipFamilies") or [])
        given = [a for a in spec.get("clusterIPs") or [spec.get("clusterIP")] if a]
        if not asked:  # the given addresses' families; one not configured: "not in the CIDR"
            asked = [f"IPv{ipaddress.ip_address(a).version}" for a in given]
            if not asked or any(f not in self.cidrs for f in asked):
                asked = [f"IPv{self.cidr.version}"]
        for i, family in enumerate(asked):
            if family not in self.cidrs:
                raise _error(
                    svc,
                    f"spec.ipFamilies[{i}]",
                    f"{family} is not configured (service CIDR "
                    f"{', '.join(str(n) for n in self.cidrs.values())})",
                )
        policy = spec.get("ipFamilyPolicy") or ("SingleStack" if len(asked) < 2 else "")
        if policy == "SingleStack":
            return asked[:1]
        others = [f for f in self.cidrs if f not in asked]
        families = list(dict.fromkeys(asked + others))
        if policy == "RequireDualStack" and len(families) < 2:
            raise _error(
                svc, "spec.ipFamilyPolicy", "RequireDualStack: the service CIDR is single-stack"
            )
        return families

    @staticmethod
    def _usable(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, int]:
        """The first usable address (as an int) and how many there are (no network/broadcast)."""
        first = int(net.network_address) + 1
        count = net.num_addresses - (2 if net.version == 4 else 1)
        return first, max(count, 0)

    def _check_ip(
        self,
        svc: Obj,
        want: str,
        owner: str,
        net: ipaddress.IPv4Network | ipaddress.IPv6Network,
        field: str = "spec.clusterIP",
    ) -> str:
        addr = ipaddress.ip_address(want)
        first, count = self._usable(net)
        if addr.version != net.version or not first <= int(addr) < first + count:
            raise _error(svc, field, f"{addr} is not in the service CIDR {net}")
        if int(addr) == first and owner != KUBERNETES:
            raise _error(svc, field, f"{addr} is reserved for {KUBERNETES}")
        holder = self.ips.get(str(addr))
        if holder is not None:
            raise _error(svc, field, f"{addr} is already allocated to {holder}")
        return str(addr)

    def _free_ip(
        self,
        svc: Obj,
        owner: str,
        net: ipaddress.IPv4Network | ipaddress.IPv6Network,
    ) -> str:
        first, count = self._usable(net)
        if owner == KUBERNETES and str(ipaddress.ip_address(first)) not in self.ips:
            return str(ipaddress.ip_address(first))
        band = _static_band(net.num_addresses, 16, 256)
        # Index 0 (the first host address) is kept for default/kubernetes.
        for index in itertools.chain(range(max(band, 1), count), range(1, min(band, count))):
            addr = str(ipaddress.ip_address(first + index))
            if addr not in self.ips:
                return addr
        raise _error(svc, "spec.clusterIP", f"no free address left in {net}")

    # --- node ports ----------------------------------------------------------------------------

    def _node_ports(self, svc: Obj, spec: Obj) -> None:
        if not has_node_ports(spec):
            return  # validation rejects nodePort on the other types
        ports: list[Obj] = spec.get("ports", [])
        mine: dict[int, int] = {}  # node port -> index of the first port of this Service using it
        for i, p in enumerate(ports):
            if "nodePort" in p:
                self._check_node_port(svc, ports, i, mine)
        if not allocates_node_ports(spec):
            return
        health_check = spec.get("healthCheckNodePort") if needs_health_check(spec) else None
        for i, p in enumerate(ports):
            if "nodePort" in p:
                continue
            shared = [
                q["nodePort"]
                for q in ports
                if q["port"] == p["port"] and q["protocol"] != p["protocol"] and "nodePort" in q
            ]
            if shared:
                p["nodePort"] = shared[0]
            else:
                taken = {*mine, health_check} if health_check else set(mine)
                p["nodePort"] = self._free_port(svc, f"{_port(i)}.nodePort", taken)
                mine[p["nodePort"]] = i

    def _check_node_port(self, svc: Obj, ports: list[Obj], i: int, mine: dict[int, int]) -> None:
        p, field = ports[i], f"{_port(i)}.nodePort"
        port = p["nodePort"]
        holder = self.ports.get(port)
        if holder is not None:
            raise _error(svc, field, f"{port} is already allocated to {holder}")
        j = mine.setdefault(port, i)
        if j != i:
            # One node port serves one port number of a Service, once per protocol.
            q = ports[j]
            if q["port"] != p["port"] or q["protocol"] == p["protocol"]:
                raise _error(svc, field, f"{port} is already used by {_port(j)}")

    def _free_port(self, svc: Obj, field: str, also_taken: Iterable[int] = ()) -> int:
        taken = set(also_taken)
        band = _static_band(len(NODE_PORTS), 32, 128)
        for port in itertools.chain(NODE_PORTS[band:], NODE_PORTS[:band]):
            if port not in self.ports and port not in taken:
                return port
        raise _error(svc, field, f"no free node port left in {NODE_PORTS[0]}-{NODE_PORTS[-1]}")

    def _health_check_node_port(self, svc: Obj, spec: Obj, before: Obj | None) -> None:
        if not needs_health_check(spec):
            return  # validation rejects healthCheckNodePort elsewhere
        port = spec.get("healthCheckNodePort")
        if port is None and before is not None and needs_health_check(before):
            port = before.get("healthCheckNodePort")  # an update keeps it
        own = {p["nodePort"]: i for i, p in enumerate(spec.get("ports", [])) if "nodePort" in p}
        field = "spec.healthCheckNodePort"
        if port is None:
            port = self._free_port(svc, field, also_taken=own)
        elif port not in NODE_PORTS:
            raise _error(
                svc, field, f"{port} is not in the node port range "
                f"{NODE_PORTS[0]}-{NODE_PORTS[-1]}",
            )  # fmt: skip
        elif port in own:
            raise _error(svc, field, f"{port} is already used by {_port(own[port])}")
        elif port in self.ports:
            raise _error(svc, field, f"{port} is already allocated to {self.ports[port]}")
        spec["healthCheckNodePort"] = port


def _keep_node_ports(spec: Obj, before: Obj) -> None:
    """Give ports an update left without a nodePort the one they had (kube-apiserver's
    patchAllocatedValues): matched by name, else by port number and protocol."""
    if not (has_node_ports(spec) and has_node_ports(before)):
        return
    old_ports = [p for p in before.get("ports", []) if p.get("nodePort")]
    used = {p["nodePort"] for p in spec.get("ports", []) if "nodePort" in p}
    for p in spec.get("ports", []):
        if "nodePort" in p:
            continue
        by_name = [q for q in old_ports if q.get("name", "") == p.get("name", "")]
        by_port = [q for q in old_ports if (q["port"], q["protocol"]) == (p["port"], p["protocol"])]
        for q in (*by_name, *by_port):
            if q["nodePort"] not in used:
                p["nodePort"] = q["nodePort"]
                used.add(q["nodePort"])
                break


def _port(i: int) -> str:
    return f"spec.ports[{i}]"


def _error(svc: Obj, field: str, message: str) -> ValidationError:
    return ValidationError(f"{ref(svc)}: {field}: {message}", field)

"""kOps cluster specs (``kops.k8s.io/v1alpha2``): parse, validate, render into Calico resources.

Pure (no I/O): the CLI reads the file, this module judges the documents. ``parse(docs)`` takes
the manifest's documents (one Cluster, any InstanceGroups) and returns a ``Validation``: the
normalised cluster (None when there are errors), the errors and the warnings, each naming the
object and the field path (``spec.networking.calico.encapsulationMode``). Warnings never fail.

What is checked, and how strictly (docs/design/kops.md):
- ``spec.networking.calico`` is checked field by field against the fields kOps knows; a field kOps
  does not know is an error naming it. kOps fields tabby does not act on (image registry,
  iptables settings, resource requests...) are accepted with a warning saying they have no effect.
- The rest of a kOps manifest (etcd, IAM, API load balancer...) is accepted as-is: only the fields
  the network needs (cloudProvider, networkCIDR, nonMasqueradeCIDR, podCIDR,
  serviceClusterIPRange, subnets, kubeProxy, the InstanceGroups' role/size/subnets) are checked.
- Rules from kOps' Calico reference: encapsulationMode ipip|vxlan (ipip by default); IP-in-IP
  needs the BGP (BIRD) backend, which only encapsulationMode ipip selects; ipipMode/vxlanMode
  Never|Always|CrossSubnet with CrossSubnet the default (kOps 1.22+); IPv6 clusters use no
  encapsulation; bpfEnabled needs kubeProxy.enabled false; mtu positive or empty (auto);
  typhaReplicas recommended above 50 nodes, strongly above 100; wireguardEnabled IPv4 only.

``render(cluster)`` gives the FelixConfiguration and IPPool the spec means (projectcalico.org/v3,
ready for ``tabbyctl apply``); ``agent_settings(cluster)`` the rest (backend, CIDRs, sizes).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

API_VERSION = "kops.k8s.io/v1alpha2"
CALICO_PATH = "spec.networking.calico"
ENCAP_MODES = ("Never", "Always", "CrossSubnet")
DEFAULT_NON_MASQUERADE_CIDR = "100.64.0.0/10"  # kOps' default
K8S_ROLES = ("Master", "ControlPlane", "APIServer", "Node")  # run the agent (calico-node)
ROLES = (*K8S_ROLES, "Bastion")
TYPHA_RECOMMENDED_NODES = 50
TYPHA_STRONGLY_RECOMMENDED_NODES = 100
MIN_MTU = 576  # IPv4's minimum datagram every host must accept; the CNI refuses less
MAX_MTU = 65535
POOL_NAME = {4: "default-ipv4-ippool", 6: "default-ipv6-ippool"}

# kOps' CalicoNetworkingSpec: the fields tabby acts on ...
CALICO_FIELDS = (
    "encapsulationMode",
    "ipipMode",
    "vxlanMode",
    "mtu",
    "typhaReplicas",
    "wireguardEnabled",
    "bpfEnabled",
    "bpfExternalServiceMode",
    "bpfLogLevel",
    "bpfKubeProxyIptablesCleanupEnabled",
    "awsSrcDstCheck",
    "logSeverityScreen",
    "prometheusMetricsEnabled",
    "prometheusMetricsPort",
    "crossSubnet",  # deprecated (kOps < 1.22): CrossSubnet for the active encapsulation
)
# ... and the ones it accepts without acting on them (images, iptables, resources, autodetection).
CALICO_NO_EFFECT = (
    "registry",
    "version",
    "majorVersion",
    "allowIPForwarding",
    "chainInsertMode",
    "cpuRequest",
    "iptablesBackend",
    "ipv4AutoDetectionMethod",
    "ipv6AutoDetectionMethod",
    "prometheusGoMetricsEnabled",
    "prometheusProcessMetricsEnabled",
    "typhaPrometheusMetricsEnabled",
    "typhaPrometheusMetricsPort",
)
_ENUMS: dict[str, tuple[str, ...]] = {
    "encapsulationMode": ("ipip", "vxlan"),
    "ipipMode": ENCAP_MODES,
    "vxlanMode": ENCAP_MODES,
    "bpfExternalServiceMode": ("Tunnel", "DSR"),
    "bpfLogLevel": ("Off", "Info", "Debug"),
    "awsSrcDstCheck": ("Enable", "Disable", "DoNothing"),
    "logSeverityScreen": ("Debug", "Info", "Warning", "Error", "Fatal"),
}
_BOOLS = (
    "wireguardEnabled",
    "bpfEnabled",
    "bpfKubeProxyIptablesCleanupEnabled",
    "prometheusMetricsEnabled",
    "crossSubnet",
)


@dataclass(frozen=True)
class Problem:
    """One error or warning: which object, which field, what."""

    obj: str  # "Cluster demo.k8s.local", "InstanceGroup nodes-us-east-1a", "document 3"
    path: str
    message: str

    def __str__(self) -> str:
        return (
            f"{self.obj}: {self.path}: {self.message}"
            if self.path
            else f"{self.obj}: {self.message}"
        )


@dataclass(frozen=True)
class Subnet:
    name: str
    cidr: str | None  # None: a subnet without a CIDR (kOps can allocate one in the cloud)
    zone: str
    type: str


@dataclass(frozen=True)
class InstanceGroup:
    name: str
    role: str
    min_size: int
    max_size: int
    subnets: tuple[str, ...]  # names of the Cluster's subnets

    @property
    def runs_agent(self) -> bool:
        return self.role in K8S_ROLES


@dataclass(frozen=True)
class CalicoSpec:
    """``spec.networking.calico`` with kOps' defaults applied."""

    encapsulation: str  # ipip | vxlan | none (IPv6)
    ipip_mode: str
    vxlan_mode: str
    mtu: int | None  # None: detect from the data interface
    typha_replicas: int
    wireguard: bool
    bpf_enabled: bool
    bpf_external_service_mode: str
    bpf_log_level: str | None
    aws_src_dst_check: str | None
    extra_felix: dict[str, Any] = field(default_factory=dict)  # fields passed through as is

    @property
    def backend(self) -> str:
        """Calico's networking backend (``calico_backend``): BIRD (BGP) for IP-in-IP and for
        unencapsulated IPv6, VXLAN (no BGP) for VXLAN — as kOps' manifest template picks it."""
        return "vxlan" if self.encapsulation == "vxlan" else "bird"


@dataclass(frozen=True)
class KopsCluster:
    name: str
    cloud_provider: str
    network_cidr: str | None
    non_masquerade_cidr: str
    pod_cidr: str | None
    service_cidr: str | None
    ipv6: bool
    subnets: tuple[Subnet, ...]
    instance_groups: tuple[InstanceGroup, ...]
    kube_proxy_enabled: bool
    calico: CalicoSpec

    @property
    def nodes(self) -> int:
        """Nodes running the agent as kOps starts the cluster (each group at its minSize)."""
        return sum(g.min_size for g in self.instance_groups if g.runs_agent)

    @property
    def max_nodes(self) -> int:
        return sum(g.max_size for g in self.instance_groups if g.runs_agent)

    def subnet(self, name: str) -> Subnet | None:
        for s in self.subnets:
            if s.name == name:
                return s
        return None


@dataclass
class Validation:
    cluster: KopsCluster | None
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


class _Report:
    def __init__(self) -> None:
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []
        self.obj = ""

    def error(self, path: str, message: str) -> None:
        self.errors.append(Problem(self.obj, path, message))

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(Problem(self.obj, path, message))


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, Mapping) else None


def _cidr(
    rep: _Report, value: Any, path: str
) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    if value is None:
        return None
    try:
        return ipaddress.ip_network(str(value), strict=False) if isinstance(value, str) else None
    except ValueError:
        pass
    rep.error(path, f"{value!r} is not a valid CIDR")
    return None


def _int(rep: _Report, value: Any, path: str, lo: int, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        rep.error(path, f"must be {what}, got {value!r}")
        return None
    return value


# --------------------------------------------------------------------------- documents


def parse(docs: Sequence[Any]) -> Validation:
    """Validate a manifest's documents: exactly one Cluster, any number of InstanceGroups."""
    rep = _Report()
    clusters: list[Mapping[str, Any]] = []
    groups: list[Mapping[str, Any]] = []
    for i, doc in enumerate(docs, 1):
        rep.obj = f"document {i}"
        if not isinstance(doc, Mapping):
            rep.error("", f"expected a mapping, got {type(doc).__name__}")
            continue
        if doc.get("apiVersion") != API_VERSION:
            rep.error("apiVersion", f"must be {API_VERSION}, got {doc.get('apiVersion')!r}")
            continue
        kind = doc.get("kind")
        if kind == "Cluster":
            clusters.append(doc)
        elif kind == "InstanceGroup":
            groups.append(doc)
        else:
            rep.error("kind", f"must be Cluster or InstanceGroup, got {kind!r}")
    if len(clusters) != 1:
        rep.obj = "manifest"
        rep.error("", f"needs exactly one kind: Cluster document, found {len(clusters)}")
        return Validation(None, rep.errors, rep.warnings)
    cluster = _cluster(rep, clusters[0], groups)
    return Validation(cluster if not rep.errors else None, rep.errors, rep.warnings)


def _name(doc: Mapping[str, Any]) -> str:
    name = _get(doc.get("metadata"), "name")
    return name if isinstance(name, str) and name else ""


def _cluster(
    rep: _Report, doc: Mapping[str, Any], group_docs: list[Mapping[str, Any]]
) -> KopsCluster:
    name = _name(doc)
    rep.obj = f"Cluster {name or '<no name>'}"
    if not name:
        rep.error("metadata.name", "required")
    spec = doc.get("spec")
    if not isinstance(spec, Mapping):
        rep.error("spec", "required (a mapping)")
        spec = {}
    cloud = spec.get("cloudProvider")
    if cloud is not None and not isinstance(cloud, str):
        rep.error("spec.cloudProvider", "must be a string")
    cloud = cloud if isinstance(cloud, str) else ""

    network = _cidr(rep, spec.get("networkCIDR"), "spec.networkCIDR")
    nonmasq = _cidr(
        rep, spec.get("nonMasqueradeCIDR", DEFAULT_NON_MASQUERADE_CIDR), "spec.nonMasqueradeCIDR"
    )
    ipv6 = nonmasq is not None and nonmasq.version == 6
    pod = _cidr(rep, spec.get("podCIDR"), "spec.podCIDR")
    svc = _cidr(rep, spec.get("serviceClusterIPRange"), "spec.serviceClusterIPRange")
    if ipv6:
        for path, net in (("spec.podCIDR", pod), ("spec.serviceClusterIPRange", svc)):
            if net is not None and net.version != 6:
                rep.error(path, f"{net}: an IPv6 cluster (nonMasqueradeCIDR ::/0) needs IPv6")
    if nonmasq is not None and nonmasq.version == 4:
        pod = pod or _kops_pod_cidr(nonmasq)
        svc = svc or _kops_service_cidr(nonmasq)
        for path, net in (("spec.podCIDR", pod), ("spec.serviceClusterIPRange", svc)):
            if net.version != 4 or not net.subnet_of(nonmasq):
                rep.error(path, f"{net} must be inside nonMasqueradeCIDR {nonmasq}")
        if network is not None and network.overlaps(nonmasq):
            rep.error("spec.nonMasqueradeCIDR", f"{nonmasq} overlaps networkCIDR {network}")

    subnets = _subnets(rep, spec.get("subnets"), network)
    kube_proxy = spec.get("kubeProxy")
    if kube_proxy is not None and not isinstance(kube_proxy, Mapping):
        rep.error("spec.kubeProxy", "must be a mapping")
        kube_proxy = None
    kp_enabled = _get(kube_proxy, "enabled")
    if kp_enabled is not None and not isinstance(kp_enabled, bool):
        rep.error("spec.kubeProxy.enabled", "must be a boolean (true or false)")
        kp_enabled = None
    kube_proxy_enabled = kp_enabled is not False

    calico = _networking(rep, spec.get("networking"), ipv6=ipv6, cloud=cloud)
    kp_checked = _get(kube_proxy, "enabled") is None or isinstance(kp_enabled, bool)
    if calico.bpf_enabled and kube_proxy_enabled and kp_checked:
        rep.error(
            "spec.kubeProxy.enabled",
            "must be false when networking.calico.bpfEnabled is true: the eBPF dataplane "
            "replaces kube-proxy (set kubeProxy: {enabled: false})",
        )
    if not calico.bpf_enabled and not kube_proxy_enabled:
        rep.warn(
            "spec.kubeProxy.enabled",
            "false while bpfEnabled is false: nothing implements Services on the nodes",
        )

    cluster_obj = rep.obj
    groups = tuple(_instance_group(rep, g, subnets) for g in group_docs)
    rep.obj = cluster_obj
    if not group_docs:
        rep.warn("", "no InstanceGroup documents: the node count is unknown (lab default: 3)")
    nodes = sum(g.max_size for g in groups if g.runs_agent)
    if calico.typha_replicas == 0 and nodes > TYPHA_STRONGLY_RECOMMENDED_NODES:
        rep.warn(
            f"{CALICO_PATH}.typhaReplicas",
            f"up to {nodes} nodes: Typha is strongly recommended above "
            f"{TYPHA_STRONGLY_RECOMMENDED_NODES} nodes (set typhaReplicas, e.g. 3)",
        )
    elif calico.typha_replicas == 0 and nodes > TYPHA_RECOMMENDED_NODES:
        rep.warn(
            f"{CALICO_PATH}.typhaReplicas",
            f"up to {nodes} nodes: Typha is recommended above {TYPHA_RECOMMENDED_NODES} nodes",
        )
    return KopsCluster(
        name=name,
        cloud_provider=cloud,
        network_cidr=str(network) if network else None,
        non_masquerade_cidr=str(nonmasq) if nonmasq else DEFAULT_NON_MASQUERADE_CIDR,
        pod_cidr=str(pod) if pod else None,
        service_cidr=str(svc) if svc else None,
        ipv6=ipv6,
        subnets=subnets,
        instance_groups=groups,
        kube_proxy_enabled=kube_proxy_enabled,
        calico=calico,
    )


def _kops_pod_cidr(nonmasq: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    """kOps' default pod range: one bit longer than nonMasqueradeCIDR, with that bit set
    (100.64.0.0/10 -> 100.96.0.0/11)."""
    upper = list(nonmasq.subnets(prefixlen_diff=1))
    return upper[1]


def _kops_service_cidr(nonmasq: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    """kOps' default serviceClusterIPRange: the first /(n+3) of nonMasqueradeCIDR
    (100.64.0.0/13)."""
    return next(nonmasq.subnets(prefixlen_diff=min(3, 32 - nonmasq.prefixlen)))


def _subnets(
    rep: _Report, value: Any, network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
) -> tuple[Subnet, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        rep.error("spec.subnets", "must be a list")
        return ()
    out: list[Subnet] = []
    for i, item in enumerate(value):
        path = f"spec.subnets[{i}]"
        if not isinstance(item, Mapping):
            rep.error(path, "must be a mapping")
            continue
        name = item.get("name")
        if not isinstance(name, str) or not name:
            rep.error(f"{path}.name", "required")
            continue
        if any(s.name == name for s in out):
            rep.error(f"{path}.name", f"duplicate subnet name {name!r}")
        net = _cidr(rep, item.get("cidr"), f"{path}.cidr")
        if net is not None and network is not None and not net.subnet_of(network):  # type: ignore[arg-type]
            rep.error(f"{path}.cidr", f"{net} is outside networkCIDR {network}")
        for other in out:
            if net is not None and other.cidr and net.overlaps(ipaddress.ip_network(other.cidr)):
                rep.error(f"{path}.cidr", f"{net} overlaps subnet {other.name} ({other.cidr})")
        out.append(
            Subnet(
                name,
                str(net) if net else None,
                str(item.get("zone") or ""),
                str(item.get("type") or ""),
            )
        )
    return tuple(out)


def _instance_group(
    rep: _Report, doc: Mapping[str, Any], subnets: tuple[Subnet, ...]
) -> InstanceGroup:
    name = _name(doc)
    rep.obj = f"InstanceGroup {name or '<no name>'}"
    if not name:
        rep.error("metadata.name", "required")
    spec = doc.get("spec")
    if not isinstance(spec, Mapping):
        rep.error("spec", "required (a mapping)")
        spec = {}
    role = spec.get("role", "Node")
    if role not in ROLES:
        rep.error("spec.role", f"must be one of {'|'.join(ROLES)}, got {role!r}")
    lo = _int(rep, spec.get("minSize"), "spec.minSize", 0, "an integer >= 0")
    hi = _int(rep, spec.get("maxSize"), "spec.maxSize", 0, "an integer >= 0")
    lo = 1 if lo is None else lo  # kOps' defaults: minSize 1 (2 for nodes created by the CLI)
    hi = lo if hi is None else hi
    if hi < lo:
        rep.error("spec.maxSize", f"{hi} is below minSize {lo}")
    names = spec.get("subnets") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        rep.error("spec.subnets", "must be a list of subnet names")
        names = []
    for i, sub in enumerate(names):
        if subnets and not any(s.name == sub for s in subnets):
            known = ", ".join(s.name for s in subnets)
            rep.error(f"spec.subnets[{i}]", f"no subnet {sub!r} in the Cluster (has: {known})")
    return InstanceGroup(name, str(role), lo, hi, tuple(names))


# --------------------------------------------------------------------------- networking.calico


def _networking(rep: _Report, value: Any, *, ipv6: bool, cloud: str) -> CalicoSpec:
    if not isinstance(value, Mapping) or "calico" not in value:
        others = ", ".join(str(k) for k in value) if isinstance(value, Mapping) else ""
        rep.error(
            "spec.networking.calico",
            "required: tabby implements Calico networking"
            + (f" (found: {others})" if others else ""),
        )
        return _calico(rep, {}, ipv6=ipv6, cloud=cloud)
    for key in value:
        if key != "calico":
            rep.error(
                f"spec.networking.{key}", "another networking provider: only calico is allowed"
            )
    raw = value["calico"]
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        rep.error(CALICO_PATH, "must be a mapping")
        raw = {}
    return _calico(rep, raw, ipv6=ipv6, cloud=cloud)


def _canonical(rep: _Report, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Field names as kOps reads them: Go's JSON decoding matches names case-insensitively, so
    ``IPIPMode`` (as kOps' own docs write it) is ``ipipMode``; anything else is an error."""
    known = {k.lower(): k for k in (*CALICO_FIELDS, *CALICO_NO_EFFECT)}
    out: dict[str, Any] = {}
    for key, v in raw.items():
        path = f"{CALICO_PATH}.{key}"
        canon = known.get(str(key).lower())
        if canon is None:
            rep.error(path, "unknown field (not a kOps Calico setting)")
            continue
        if canon != key:
            rep.warn(path, f"read as {canon} (kOps matches field names case-insensitively)")
        if canon in out:
            rep.error(path, f"{canon} is given twice")
        if v is not None:
            out[canon] = v
    return out


def _calico(rep: _Report, raw: Mapping[str, Any], *, ipv6: bool, cloud: str) -> CalicoSpec:
    c = _canonical(rep, raw)
    for key, allowed in _ENUMS.items():
        if key in c and c[key] not in allowed:
            rep.error(f"{CALICO_PATH}.{key}", f"must be one of {'|'.join(allowed)}, got {c[key]!r}")
            del c[key]
    for key in _BOOLS:
        if key in c and not isinstance(c[key], bool):
            rep.error(f"{CALICO_PATH}.{key}", "must be a boolean (true or false)")
            del c[key]
    for key in CALICO_NO_EFFECT:
        if key in c:
            rep.warn(f"{CALICO_PATH}.{key}", "accepted; it has no effect in tabby")

    if ipv6:
        encap = "none"
        for key in ("encapsulationMode", "ipipMode", "vxlanMode"):
            if key in c and c[key] not in ("Never",):
                rep.error(
                    f"{CALICO_PATH}.{key}",
                    "IPv6 clusters use no encapsulation (kOps requires it): remove it",
                )
        ipip_mode = vxlan_mode = "Never"
    else:
        encap = c.get("encapsulationMode", "ipip")
        default_mode = "CrossSubnet"  # kOps 1.22+, for both encapsulations
        if "crossSubnet" in c:
            rep.warn(
                f"{CALICO_PATH}.crossSubnet",
                "deprecated: CrossSubnet is the default since kOps 1.22 (use ipipMode/vxlanMode)",
            )
            default_mode = "CrossSubnet" if c["crossSubnet"] else "Always"
        if encap == "ipip":
            ipip_mode = c.get("ipipMode", default_mode)
            vxlan_mode = c.get("vxlanMode", "Never")
            if vxlan_mode != "Never":
                rep.error(
                    f"{CALICO_PATH}.vxlanMode",
                    f"{vxlan_mode} with encapsulationMode ipip: set encapsulationMode: vxlan "
                    "to encapsulate with VXLAN (a pool uses one encapsulation)",
                )
        else:  # vxlan: Calico's VXLAN backend, no BIRD, so no IP-in-IP
            vxlan_mode = c.get("vxlanMode", default_mode)
            ipip_mode = c.get("ipipMode", "Never")
            if ipip_mode != "Never":
                rep.error(
                    f"{CALICO_PATH}.ipipMode",
                    f"{ipip_mode}: IP-in-IP needs Calico's BGP (BIRD) backend, and "
                    "encapsulationMode vxlan selects the VXLAN backend, which runs no BGP",
                )

    active = vxlan_mode if encap == "vxlan" else ipip_mode
    if not ipv6 and active == "Never" and encap == "vxlan":
        rep.warn(
            f"{CALICO_PATH}.vxlanMode",
            "Never: pod routes are plain routes via the peer node, and the VXLAN backend runs "
            "no BGP: across a router the network must learn the pod blocks some other way "
            "(encapsulationMode ipip with ipipMode Never routes them over BGP)",
        )

    mtu: int | None = None
    if "mtu" in c:
        v = c["mtu"]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            rep.error(
                f"{CALICO_PATH}.mtu", f"must be a positive integer, or empty (auto), got {v!r}"
            )
        elif not MIN_MTU <= v <= MAX_MTU:
            rep.error(f"{CALICO_PATH}.mtu", f"{v}: must be between {MIN_MTU} and {MAX_MTU}")
        else:
            mtu = v
    typha = _int(rep, c.get("typhaReplicas"), f"{CALICO_PATH}.typhaReplicas", 0, "an integer >= 0")
    if typha:
        rep.warn(
            f"{CALICO_PATH}.typhaReplicas",
            f"{typha}: accepted; run `tabby typha` and start agents with --typha HOST:PORT "
            "(the lab does not start it from the spec yet)",
        )

    wireguard = bool(c.get("wireguardEnabled", False))
    if wireguard and ipv6:
        rep.error(f"{CALICO_PATH}.wireguardEnabled", "WireGuard is IPv4 only in kOps' Calico")
    elif wireguard:
        rep.warn(
            f"{CALICO_PATH}.wireguardEnabled",
            "tabby does not encrypt yet: agents report WireGuard as unavailable on /readyz "
            "and forward pod traffic unencrypted (as Calico does on nodes without WireGuard)",
        )

    bpf = bool(c.get("bpfEnabled", False))
    if "bpfEnabled" in c:
        rep.warn(
            f"{CALICO_PATH}.bpfEnabled",
            "switching an existing cluster to or from the eBPF dataplane is disruptive "
            "(kOps cannot reconcile it automatically)",
        )
    mode = c.get("bpfExternalServiceMode", "Tunnel")
    if mode == "DSR" and c.get("awsSrcDstCheck") != "Disable":
        rep.warn(
            f"{CALICO_PATH}.bpfExternalServiceMode",
            "DSR: replies leave the backend's node with the frontend's address as their "
            "source; a network that checks sources (AWS's source/destination check, a router's "
            "strict rp_filter) drops them: set awsSrcDstCheck: Disable",
        )
    if not bpf:
        for key in ("bpfExternalServiceMode", "bpfLogLevel", "bpfKubeProxyIptablesCleanupEnabled"):
            if key in c:
                rep.warn(f"{CALICO_PATH}.{key}", "has no effect while bpfEnabled is false")
    src_dst = c.get("awsSrcDstCheck")
    if src_dst is not None:
        where = f"cloudProvider is {cloud!r}" if cloud != "aws" else "tabby never calls EC2"
        rep.warn(
            f"{CALICO_PATH}.awsSrcDstCheck",
            f"{src_dst}: a cloud setting, accepted; it has no effect off AWS ({where}; "
            "kOps' own controller applies it on AWS)",
        )
    extra: dict[str, Any] = {
        k: c[k]
        for k in (
            "logSeverityScreen",
            "prometheusMetricsEnabled",
            "prometheusMetricsPort",
            "bpfKubeProxyIptablesCleanupEnabled",
        )
        if k in c
    }
    if "prometheusMetricsPort" in extra:
        port = _int(
            rep, extra["prometheusMetricsPort"], f"{CALICO_PATH}.prometheusMetricsPort", 1, "a port"
        )
        if port is None or port > 65535:
            extra.pop("prometheusMetricsPort")
            if port is not None:
                rep.error(f"{CALICO_PATH}.prometheusMetricsPort", "must be a port 1-65535")
    return CalicoSpec(
        encapsulation=encap,
        ipip_mode=ipip_mode,
        vxlan_mode=vxlan_mode,
        mtu=mtu,
        typha_replicas=typha or 0,
        wireguard=wireguard,
        bpf_enabled=bpf,
        bpf_external_service_mode=mode,
        bpf_log_level=c.get("bpfLogLevel"),
        aws_src_dst_check=src_dst,
        extra_felix=extra,
    )


# --------------------------------------------------------------------------- render


def render(cluster: KopsCluster, default_pod_cidr: str | None = None) -> list[dict[str, Any]]:
    """The FelixConfiguration and IPPool(s) the spec means (projectcalico.org/v3), as kOps'
    Calico manifest would configure them (FELIX_* settings, CALICO_IPV4POOL_*).
    ``default_pod_cidr``: an IPv6 spec's pool when it names no podCIDR (kOps then takes the
    pods' addresses from the cloud's per-subnet IPv6 prefixes, which a lab has not)."""
    c = cluster.calico
    felix: dict[str, Any] = {
        "bpfEnabled": c.bpf_enabled,
        "bpfExternalServiceMode": c.bpf_external_service_mode,
        "wireguardEnabled": c.wireguard,
        "ipv6Support": cluster.ipv6,
    }
    if c.bpf_log_level:
        felix["bpfLogLevel"] = c.bpf_log_level
    if c.aws_src_dst_check:
        felix["awsSrcDstCheck"] = c.aws_src_dst_check
    if c.mtu:  # kOps' mtu is Calico's veth_mtu: FELIX_IPINIPMTU, FELIX_VXLANMTU, ...WIREGUARDMTU
        felix.update({"vxlanMTU": c.mtu, "ipipMTU": c.mtu, "wireguardMTU": c.mtu})
    felix.update(c.extra_felix)
    out: list[dict[str, Any]] = [
        {
            "apiVersion": "projectcalico.org/v3",
            "kind": "FelixConfiguration",
            "metadata": {"name": "default"},
            "spec": felix,
        }
    ]
    pod_cidr = cluster.pod_cidr or (default_pod_cidr if cluster.ipv6 else None)
    if pod_cidr:
        version = ipaddress.ip_network(pod_cidr).version
        out.append(
            {
                "apiVersion": "projectcalico.org/v3",
                "kind": "IPPool",
                "metadata": {"name": POOL_NAME[version]},
                "spec": {
                    "cidr": pod_cidr,
                    "blockSize": 26 if version == 4 else 122,
                    "ipipMode": c.ipip_mode,
                    "vxlanMode": c.vxlan_mode,
                    # CALICO_IPV4POOL_NAT_OUTGOING's default; CALICO_IPV6POOL_NAT_OUTGOING's is off
                    "natOutgoing": version == 4,
                    "nodeSelector": "all()",
                },
            }
        )
    return out


def agent_settings(cluster: KopsCluster) -> dict[str, Any]:
    """What the spec means beyond Calico's resources: the agents' and the lab's settings."""
    c = cluster.calico
    active = c.vxlan_mode if c.encapsulation == "vxlan" else c.ipip_mode
    return {
        "cluster": cluster.name,
        "backend": c.backend,
        "encapsulation": c.encapsulation,
        "mode": active if c.encapsulation != "none" else "Never",
        "mtu": c.mtu if c.mtu else "auto (data interface MTU minus the encapsulation overhead)",
        "kubeProxy": "enabled" if cluster.kube_proxy_enabled else "disabled (tabby replaces it)",
        "typhaReplicas": c.typha_replicas,
        "networkCIDR": cluster.network_cidr,
        "nonMasqueradeCIDR": cluster.non_masquerade_cidr,
        "podCIDR": cluster.pod_cidr,
        "serviceClusterIPRange": cluster.service_cidr,
        "nodes": cluster.nodes,
        "maxNodes": cluster.max_nodes,
        "subnets": {s.name: s.cidr for s in cluster.subnets},
    }

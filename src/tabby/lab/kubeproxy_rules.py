"""kube-proxy's own rule layouts, generated for a lab node or a bench baseline.

kube-proxy cannot run here (no API server, no kubelet), so the lab writes what it would write,
from kube-proxy's source (pkg/proxy/iptables/proxier.go and pkg/proxy/nftables/proxier.go, v1.31):

- ``iptables_restore``: what kube-proxy's iptables mode feeds to ``iptables-restore --noflush``:
  the nat table (KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-* with ``statistic --mode random``
  probabilities 1/n, 1/(n-1) ... and the last endpoint unconditional, KUBE-MARK-MASQ,
  KUBE-POSTROUTING, KUBE-NODEPORTS -> KUBE-EXT-*), the filter table (KUBE-FORWARD, the REJECT of
  services without endpoints, the firewall chains), the KUBE-PROXY-CANARY chains, and the jumps
  from the built-in chains, each with kube-proxy's comments. Chain names are kube-proxy's:
  ``KUBE-SVC-`` + base32(sha256("ns/name:port" + proto))[:16], ``KUBE-SEP-`` the same over
  "ns/name:port" + proto + "ip:port".
- ``nftables``: the transaction kube-proxy's nftables mode (through knftables) feeds to ``nft -f``:
  ``table ip kube-proxy`` (or ip6) with its base chains, the ``service-ips`` /
  ``service-nodeports`` verdict maps, one ``service-<hash>-ns/name/proto/port`` chain per service
  port choosing an endpoint with ``numgen random mod n vmap``, and one
  ``endpoint-<hash>-ns/name/proto/port__ip/port`` DNAT chain per endpoint.

Only the layout matters to its users (the hand-over cleanup test, the kube-proxy baselines in
bench/); the generator never touches a namespace itself.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

MASQ_MARK = "0x4000"
CHAIN_NAME_MAX = 256  # nftables' NFT_CHAIN_MAXNAMELEN; knftables truncates to it


@dataclass(frozen=True)
class KubeServicePort:
    """One port of one Service with its ready endpoints, as kube-proxy sees it."""

    namespace: str
    name: str
    cluster_ip: str
    port: int
    protocol: str = "TCP"
    port_name: str = ""
    endpoints: Sequence[tuple[str, int]] = field(default_factory=tuple)
    node_port: int | None = None

    def __post_init__(self) -> None:
        if self.protocol.upper() not in ("TCP", "UDP", "SCTP"):
            raise ValueError(f"protocol: {self.protocol!r} is not TCP, UDP or SCTP")
        ipaddress.ip_address(self.cluster_ip)  # raises ValueError naming the address
        for what, value in (("port", self.port), ("node_port", self.node_port)):
            if value is not None and not 0 < value < 65536:
                raise ValueError(f"{what}: {value} is not a port")
        for ip, port in self.endpoints:
            ipaddress.ip_address(ip)
            if not 0 < port < 65536:
                raise ValueError(f"endpoints: {ip}:{port} has no valid port")

    @property
    def proto(self) -> str:
        return self.protocol.lower()

    @property
    def port_key(self) -> str:
        """kube-proxy's ServicePortName.String(): "ns/name:portname" (":" kept when unnamed)."""
        return f"{self.namespace}/{self.name}:{self.port_name}"

    @property
    def ipv6(self) -> bool:
        return ipaddress.ip_address(self.cluster_ip).version == 6


def _hash16(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def svc_chain(sp: KubeServicePort) -> str:
    return "KUBE-SVC-" + _hash16(sp.port_key + sp.proto)


def ext_chain(sp: KubeServicePort) -> str:
    return "KUBE-EXT-" + _hash16(sp.port_key + sp.proto)


def sep_chain(sp: KubeServicePort, ip: str, port: int) -> str:
    return "KUBE-SEP-" + _hash16(sp.port_key + sp.proto + _hostport(ip, port))


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _host_cidr(ip: str) -> str:
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def synthetic_services(
    n_services: int,
    n_endpoints: int,
    *,
    vip_base: str = "10.96.0.0",
    pod_base: str = "10.244.0.0",
    port: int = 80,
    target_port: int = 8080,
    protocol: str = "TCP",
    namespace: str = "default",
    node_port_base: int | None = None,
) -> list[KubeServicePort]:
    """N services x M endpoints: service i has VIP vip_base+1+i, endpoints drawn from pod_base."""
    vip0 = ipaddress.ip_address(vip_base)
    pod0 = ipaddress.ip_address(pod_base)
    out = []
    for i in range(n_services):
        eps = tuple(
            (str(pod0 + 1 + (i * n_endpoints + j) % 60000), target_port) for j in range(n_endpoints)
        )
        out.append(
            KubeServicePort(
                namespace=namespace,
                name=f"svc-{i}",
                cluster_ip=str(vip0 + 1 + i),
                port=port,
                protocol=protocol,
                port_name="http",
                endpoints=eps,
                node_port=None if node_port_base is None else node_port_base + i,
            )
        )
    return out


def _c(comment: str) -> str:
    return f'-m comment --comment "{comment}"'


def iptables_restore(
    services: Iterable[KubeServicePort],
    *,
    cluster_cidr: str | None = "10.244.0.0/16",
    jumps: bool = True,
) -> str:
    """kube-proxy's iptables-mode rules, for `iptables-restore --noflush` (or ip6tables-restore:
    give it only IPv6 services). Declaring a chain flushes it, so a reload replaces every KUBE-*
    chain. jumps adds the rules in the built-in chains that lead to them, which kube-proxy's
    ensureRule appends once at start (a later sync passes jumps=False, or they double).
    cluster_cidr None is kube-proxy's masqueradeAll."""
    svcs = list(services)
    nat_chains = ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"]
    nat_rules: list[str] = []
    filter_rules: list[str] = []
    for sp in svcs:
        svc = svc_chain(sp)
        match = f"-m {sp.proto} -p {sp.proto} -d {_host_cidr(sp.cluster_ip)} --dport {sp.port}"
        if not sp.endpoints:
            filter_rules.append(
                f"-A KUBE-SERVICES {_c(sp.port_key + ' has no endpoints')} {match} "
                f"-j REJECT --reject-with "
                + ("icmp6-port-unreachable" if sp.ipv6 else "icmp-port-unreachable")
            )
            if sp.node_port is not None:
                filter_rules.append(
                    f"-A KUBE-EXTERNAL-SERVICES {_c(sp.port_key + ' has no endpoints')} "
                    f"-m addrtype --dst-type LOCAL -m {sp.proto} -p {sp.proto} "
                    f"--dport {sp.node_port} -j REJECT --reject-with "
                    + ("icmp6-port-unreachable" if sp.ipv6 else "icmp-port-unreachable")
                )
            continue
        nat_chains.append(svc)
        nat_rules.append(f"-A KUBE-SERVICES {_c(sp.port_key + ' cluster IP')} {match} -j {svc}")
        masq_src = f"! -s {cluster_cidr} " if cluster_cidr else ""
        nat_rules.append(
            f"-A {svc} {_c(sp.port_key + ' cluster IP')} {match} {masq_src}-j KUBE-MARK-MASQ"
        )
        if sp.node_port is not None:
            ext = ext_chain(sp)
            nat_chains.append(ext)
            nat_rules.append(
                f"-A KUBE-NODEPORTS {_c(sp.port_key)} -m {sp.proto} -p {sp.proto} "
                f"--dport {sp.node_port} -j {ext}"
            )
            nat_rules.append(
                f"-A {ext} "
                f"{_c('masquerade traffic for ' + sp.port_key + ' external destinations')} "
                "-j KUBE-MARK-MASQ"
            )
            nat_rules.append(f"-A {ext} -j {svc}")
        n = len(sp.endpoints)
        for i, (ip, port) in enumerate(sp.endpoints):
            sep = sep_chain(sp, ip, port)
            nat_chains.append(sep)
            comment = _c(f"{sp.port_key} -> {_hostport(ip, port)}")
            if i < n - 1:
                prob = f"-m statistic --mode random --probability {1.0 / (n - i):0.10f} "
            else:
                prob = ""
            nat_rules.append(f"-A {svc} {comment} {prob}-j {sep}")
            nat_rules.append(f"-A {sep} {_c(sp.port_key)} -s {_host_cidr(ip)} -j KUBE-MARK-MASQ")
            nat_rules.append(
                f"-A {sep} {_c(sp.port_key)} -m {sp.proto} -p {sp.proto} "
                f"-j DNAT --to-destination {_hostport(ip, port)}"
            )
    v6 = bool(svcs) and svcs[0].ipv6
    local = "" if v6 else " -m addrtype --dst-type LOCAL"
    nodeports_last = (
        f"-A KUBE-SERVICES "
        f"{_c('kubernetes service nodeports; NOTE: this must be the last rule in this chain')}"
        f"{local} -j KUBE-NODEPORTS"
    )
    lines = ["*mangle", ":KUBE-PROXY-CANARY - [0:0]", "COMMIT"]
    lines += ["*filter"]
    filter_chains = [
        "KUBE-PROXY-CANARY",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-SERVICES",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
    ]
    lines += [f":{c} - [0:0]" for c in filter_chains]
    lines += filter_rules
    lines += [
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        f"-A KUBE-FORWARD {_c('kubernetes forwarding rules')} "
        f"-m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT",
        f"-A KUBE-FORWARD {_c('kubernetes forwarding conntrack rule')} "
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]
    new = "-m conntrack --ctstate NEW"
    filter_jumps = [
        f"-A INPUT {new} {_c('kubernetes load balancer firewall')} -j KUBE-PROXY-FIREWALL",
        f"-A INPUT {_c('kubernetes health check service ports')} -j KUBE-NODEPORTS",
        f"-A INPUT {new} {_c('kubernetes externally-visible service portals')} "
        "-j KUBE-EXTERNAL-SERVICES",
        f"-A FORWARD {new} {_c('kubernetes load balancer firewall')} -j KUBE-PROXY-FIREWALL",
        f"-A FORWARD {_c('kubernetes forwarding rules')} -j KUBE-FORWARD",
        f"-A FORWARD {new} {_c('kubernetes service portals')} -j KUBE-SERVICES",
        f"-A FORWARD {new} {_c('kubernetes externally-visible service portals')} "
        "-j KUBE-EXTERNAL-SERVICES",
        f"-A OUTPUT {new} {_c('kubernetes load balancer firewall')} -j KUBE-PROXY-FIREWALL",
        f"-A OUTPUT {new} {_c('kubernetes service portals')} -j KUBE-SERVICES",
    ]
    lines += filter_jumps if jumps else []
    lines += ["COMMIT", "*nat", ":KUBE-PROXY-CANARY - [0:0]"]
    lines += [f":{c} - [0:0]" for c in nat_chains]
    lines += [
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}",
        f"-A KUBE-POSTROUTING {_c('kubernetes service traffic requiring SNAT')} "
        "-j MASQUERADE --random-fully",
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}",
    ]
    lines += nat_rules
    lines.append(nodeports_last)
    if jumps:
        lines += [
            f"-A PREROUTING {_c('kubernetes service portals')} -j KUBE-SERVICES",
            f"-A OUTPUT {_c('kubernetes service portals')} -j KUBE-SERVICES",
            f"-A POSTROUTING {_c('kubernetes postrouting rules')} -j KUBE-POSTROUTING",
        ]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _nft_name(prefix: str, base: str) -> str:
    """knftables' hashAndTruncate: base32(sha256(base))[:8] + "-" + base, capped in length."""
    name = f"{prefix}-" + base64.b32encode(hashlib.sha256(base.encode()).digest()).decode()[:8]
    name += "-" + base
    return name if len(name) <= CHAIN_NAME_MAX else name[: CHAIN_NAME_MAX - 3] + "..."


def nft_service_chain(sp: KubeServicePort) -> str:
    return _nft_name("service", f"{sp.namespace}/{sp.name}/{sp.proto}/{sp.port_name}")


def nft_external_chain(sp: KubeServicePort) -> str:
    return _nft_name("external", f"{sp.namespace}/{sp.name}/{sp.proto}/{sp.port_name}")


def nft_endpoint_chain(sp: KubeServicePort, ip: str, port: int) -> str:
    # kube-proxy writes an IPv6 endpoint's colons as dots: ":" is not allowed in a chain name
    host = ip.replace(":", ".")
    base = f"{sp.namespace}/{sp.name}/{sp.proto}/{sp.port_name}__{host}/{port}"
    return _nft_name("endpoint", base)


def nftables(
    services: Iterable[KubeServicePort],
    *,
    family: str = "ip",
    cluster_cidr: str | None = "10.244.0.0/16",
    service_cidr: str = "10.96.0.0/16",
) -> str:
    """kube-proxy's nftables-mode transaction for `nft -f`: table `<family> kube-proxy` (family
    "ip" or "ip6"; give only services of that family). Idempotent like kube-proxy's first sync:
    the table is added, flushed and refilled."""
    if family not in ("ip", "ip6"):
        raise ValueError(f"family: {family!r} is not ip or ip6")
    svcs = list(services)
    addr = "ipv4_addr" if family == "ip" else "ipv6_addr"
    t = f"{family} kube-proxy"
    out = [
        f'add table {t} {{ comment "rules for kube-proxy" ; }}',
        f"flush table {t}",
    ]

    def chain(name: str, hook: str | None = None) -> None:
        out.append(f"add chain {t} {name}" + (f" {{ {hook} ; }}" if hook else ""))

    def rule(name: str, text: str) -> None:
        out.append(f"add rule {t} {name} {text}")

    base_chains = {
        "filter-prerouting": "type filter hook prerouting priority -110",
        "filter-input": "type filter hook input priority -110",
        "filter-forward": "type filter hook forward priority -110",
        "filter-output": "type filter hook output priority -110",
        "filter-output-post-dnat": "type filter hook output priority -90",
        "nat-prerouting": "type nat hook prerouting priority -100",
        "nat-output": "type nat hook output priority -100",
        "nat-postrouting": "type nat hook postrouting priority 100",
    }
    plain_chains = [
        "mark-for-masquerade",
        "masquerading",
        "services",
        "service-endpoints-check",
        "nodeport-endpoints-check",
        "firewall-check",
        "cluster-ips-check",
        "reject-chain",
    ]
    for name in plain_chains:
        chain(name)
    for name, hook in base_chains.items():
        chain(name, hook)
    kp = f"{addr} . inet_proto . inet_service : verdict"
    out += [
        f'add set {t} cluster-ips {{ type {addr} ; comment "Active ClusterIPs" ; }}',
        f"add set {t} nodeport-ips {{ type {addr} ; "
        'comment "IPs that accept NodePort traffic" ; }',
        f"add map {t} no-endpoint-services {{ type {kp} ; "
        'comment "vmap to drop or reject packets to services with no endpoints" ; }',
        "add map " + t + " no-endpoint-nodeports { type inet_proto . inet_service : verdict ; "
        'comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }',
        f"add map {t} firewall-ips {{ type {kp} ; "
        'comment "destinations that are subject to LoadBalancerSourceRanges" ; }',
        f"add map {t} service-ips {{ type {kp} ; "
        'comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }',
        f"add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; "
        'comment "NodePort traffic" ; }',
    ]
    ipx = family  # "ip daddr" / "ip6 daddr"
    rule("mark-for-masquerade", f"mark set mark or {MASQ_MARK}")
    rule("masquerading", f"mark and {MASQ_MARK} == 0 return")
    rule("masquerading", f"mark set mark xor {MASQ_MARK}")
    rule("masquerading", "masquerade fully-random")
    rule("services", f"{ipx} daddr . meta l4proto . th dport vmap @service-ips")
    rule(
        "services",
        f"fib daddr type local {ipx} daddr != {'127.0.0.0/8' if family == 'ip' else '::1'} "
        "meta l4proto . th dport vmap @service-nodeports",
    )
    rule(
        "service-endpoints-check",
        f"{ipx} daddr . meta l4proto . th dport vmap @no-endpoint-services",
    )
    rule(
        "nodeport-endpoints-check",
        f"fib daddr type local {ipx} daddr != {'127.0.0.0/8' if family == 'ip' else '::1'} "
        "meta l4proto . th dport vmap @no-endpoint-nodeports",
    )
    rule("firewall-check", f"{ipx} daddr . meta l4proto . th dport vmap @firewall-ips")
    rule(
        "cluster-ips-check",
        f'{ipx} daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"',
    )
    rule(
        "cluster-ips-check",
        f'{ipx} daddr {{ {service_cidr} }} drop comment "Drop traffic to unallocated ClusterIPs"',
    )
    rule("reject-chain", 'reject comment "helper for @no-endpoint-services / nodeports"')
    rule("filter-prerouting", "ct state new jump firewall-check")
    rule("filter-input", "ct state new jump nodeport-endpoints-check")
    rule("filter-input", "ct state new jump service-endpoints-check")
    rule("filter-forward", "ct state new jump service-endpoints-check")
    rule("filter-forward", "ct state new jump cluster-ips-check")
    rule("filter-output", "ct state new jump service-endpoints-check")
    rule("filter-output", "ct state new jump firewall-check")
    rule("filter-output-post-dnat", "ct state new jump cluster-ips-check")
    rule("nat-prerouting", "jump services")
    rule("nat-output", "jump services")
    rule("nat-postrouting", "jump masquerading")

    elements: list[str] = []
    for sp in svcs:
        elements.append(f"add element {t} cluster-ips {{ {sp.cluster_ip} }}")
        key = f"{sp.cluster_ip} . {sp.proto} . {sp.port}"
        if not sp.endpoints:
            elements.append(f"add element {t} no-endpoint-services {{ {key} : goto reject-chain }}")
            if sp.node_port is not None:
                elements.append(
                    f"add element {t} no-endpoint-nodeports "
                    f"{{ {sp.proto} . {sp.node_port} : goto reject-chain }}"
                )
            continue
        svc = nft_service_chain(sp)
        chain(svc)
        if cluster_cidr:
            rule(
                svc,
                f"{ipx} daddr {sp.cluster_ip} {sp.proto} dport {sp.port} "
                f"{ipx} saddr != {cluster_cidr} jump mark-for-masquerade",
            )
        eps = []
        for ip, port in sp.endpoints:
            ep = nft_endpoint_chain(sp, ip, port)
            eps.append(ep)
            chain(ep)
            rule(ep, f"{ipx} saddr {ip} jump mark-for-masquerade")
            rule(ep, f"meta l4proto {sp.proto} dnat to {_hostport(ip, port)}")
        vmap = ", ".join(f"{i} : goto {ep}" for i, ep in enumerate(eps))
        rule(svc, f"numgen random mod {len(eps)} vmap {{ {vmap} }}")
        elements.append(f"add element {t} service-ips {{ {key} : goto {svc} }}")
        if sp.node_port is not None:
            ext = nft_external_chain(sp)
            chain(ext)
            rule(ext, "jump mark-for-masquerade")
            rule(ext, f"goto {svc}")
            elements.append(
                f"add element {t} service-nodeports {{ {sp.proto} . {sp.node_port} : goto {ext} }}"
            )
    return "\n".join(out + elements) + "\n"

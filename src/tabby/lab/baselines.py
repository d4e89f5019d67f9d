"""Node-like namespaces for the benchmark baselines: the kernel's own routing and kube-proxy's
iptables (legacy and nft backends) and nftables layouts, each in a node namespace of its own.

Shape (every namespace is ``<prefix>-*``; nothing is added to the root namespace)::

    <prefix>-c<i>  client   eth0 100.100.<i>.2/24, default via .1      (fresh before every run)
    <prefix>-n<i>  node     c0 100.100.<i>.1/24, b0 10.203.<i>.1/30,   (the rules live here)
                            100.120.0.0/16 via 10.203.<i>.2, ip_forward
    <prefix>-be    backend  n<i> 10.203.<i>.2/30, 100.100.<i>.0/24 via 10.203.<i>.1,
                            ``local 100.120.0.0/16 dev lo`` (every endpoint address is this
                            namespace's: one AnyIP route), one nginx on :8080 pinned to CPU 1

A path is one node namespace: ``plain`` (no rule, no conntrack: the denominator of the kube-proxy
rows), ``iptables-legacy``, ``iptables-nft`` (kube-proxy's iptables layout loaded with one
iptables-restore through either backend) and ``nftables`` (one ``nft -f``). Client addresses are
inside the cluster CIDR given to the rules (100.96.0.0/11), so pod -> ClusterIP is not
masqueraded, as in a cluster. Invariant: ``down(prefix)`` removes every namespace of the prefix,
the nginx this module started (by pid + start time) and the work directory, whatever state a run
was interrupted in.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tabby.lab import fabric, kubeproxy_rules, processes
from tabby.lab.kubeproxy_rules import KubeServicePort
from tabby.netlink import links
from tabby.netlink.netns import enter_netns, netns_exists

PATHS = ("plain", "iptables-legacy", "iptables-nft", "nftables")
CLUSTER_CIDR = "100.96.0.0/11"
SERVICE_CIDR = "100.64.0.0/13"
VIP_BASE = "100.66.0.0"  # service i: 100.66.0.1 + i
ENDPOINT_BASE = "100.120.0.0"  # endpoints 100.120.0.1 ...: all inside ENDPOINT_CIDR
ENDPOINT_CIDR = "100.120.0.0/16"
SERVICE_PORT = 80
SERVER_PORT = 8080
# iptables-nft-restore --noflush is quadratic in the table (benchmarking.md, pitfall 3): above
# this many services the same rules are loaded without --noflush and the time is not reported.
IPT_NFT_NOFLUSH_MAX = 5000
# kube-proxy's nftables first sync is one transaction, superlinear in the kernel's handling of
# goto verdict maps (pitfall 4: 32 s at 10,000, 251 s at 20,000): above this many services the
# same rules are loaded in transactions of NFT_CHUNK services and the time is not reported.
NFT_ONE_TRANSACTION_MAX = 10000
NFT_CHUNK = 1000
WORK_BASE = "/run/tabby/bench"
# kube-proxy sets these per-netns conntrack knobs at start (its --conntrack-* defaults)
KUBE_PROXY_CT_SYSCTLS = {
    "net/netfilter/nf_conntrack_tcp_timeout_established": "86400",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait": "3600",
    "net/netfilter/nf_conntrack_tcp_be_liberal": "0",
}
CLIENT_SYSCTLS = {
    "net/ipv4/ip_local_port_range": "1024 65535",
    "net/ipv4/tcp_tw_reuse": "1",
}
LOAD_TIMEOUT_S = 480.0

NGINX_CONF = """worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx.error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {work}; proxy_temp_path {work}; fastcgi_temp_path {work};
  uwsgi_temp_path {work}; scgi_temp_path {work};
  server {{ listen {port} reuseport backlog=4096;
           location / {{ return 200 "backend $server_addr client $remote_addr\\n"; }} }}
}}
"""


class BaselineError(Exception):
    pass


def kube_services(n: int, endpoints: int = 3) -> list[KubeServicePort]:
    """N ClusterIP services x ``endpoints``, every endpoint an address of the backend."""
    if not 0 < n * endpoints < 65000:
        raise BaselineError(f"services: {n} x {endpoints} endpoints do not fit {ENDPOINT_CIDR}")
    return kubeproxy_rules.synthetic_services(
        n,
        endpoints,
        vip_base=VIP_BASE,
        pod_base=ENDPOINT_BASE,
        port=SERVICE_PORT,
        target_port=SERVER_PORT,
        namespace="bench",
    )


@dataclass(frozen=True)
class Programmed:
    """What loading N services into one path took; ``seconds`` None: not measured (why in
    ``note``)."""

    path: str
    services: int
    seconds: float | None
    note: str = ""


@dataclass(frozen=True)
class PathPlan:
    path: str
    index: int
    client_netns: str
    node_netns: str

    @property
    def client_ip(self) -> str:
        return f"100.100.{self.index}.2"

    @property
    def node_client_ip(self) -> str:
        return f"100.100.{self.index}.1"

    @property
    def node_backend_ip(self) -> str:
        return f"10.203.{self.index}.1"

    @property
    def backend_ip(self) -> str:
        return f"10.203.{self.index}.2"


def iptables_backend(path: str) -> str:
    return "legacy" if path == "iptables-legacy" else "nft"


class Baselines:
    """The namespaces of the baseline paths under one prefix (see the module docstring)."""

    def __init__(self, prefix: str, paths: Sequence[str] = PATHS) -> None:
        unknown = [p for p in paths if p not in PATHS]
        if unknown:
            raise BaselineError(f"unknown baseline path(s) {unknown}: use {', '.join(PATHS)}")
        self.prefix = prefix
        self.backend_netns = f"{prefix}-be"
        self.work = os.path.join(WORK_BASE, prefix)
        self.plans = {
            p: PathPlan(p, i + 1, f"{prefix}-c{i + 1}", f"{prefix}-n{i + 1}")
            for i, p in enumerate(paths)
        }
        self.server: dict[str, object] | None = None

    # ------------------------------------------------------------------ up / down
    @classmethod
    def up(cls, prefix: str, paths: Sequence[str] = PATHS, server_cpu: int = 1) -> Baselines:
        """Build the backend and one node (+ client) per path; refuses a prefix in use."""
        if fabric.lab_netns(f"{prefix}-"):
            raise BaselineError(f"namespaces {prefix}-* exist: run down({prefix!r}) first")
        self = cls(prefix, paths)
        try:
            os.makedirs(self.work, exist_ok=True)
            fabric.add_netns(self.backend_netns)
            # every endpoint address is the backend's own (AnyIP): one route, any N
            run_in(self.backend_netns, ["ip", "route", "add", "local", ENDPOINT_CIDR, "dev", "lo"])
            for plan in self.plans.values():
                self._build_node(plan)
                self.fresh_client(plan.path)
            self._start_server(server_cpu)
        except BaseException:
            down(prefix)
            raise
        return self

    def _build_node(self, plan: PathPlan) -> None:
        fabric.add_netns(plan.node_netns)
        with enter_netns(plan.node_netns), links.rtnl() as ipr:
            ipr.link(
                "add",
                ifname="b0",
                kind="veth",
                peer={"ifname": f"n{plan.index}", "net_ns_fd": f"/run/netns/{self.backend_netns}"},
            )
            idx = links.ifindex(ipr, "b0")
            ipr.addr("add", index=idx, address=plan.node_backend_ip, prefixlen=30)
            ipr.link("set", index=idx, state="up")
            ipr.route("add", dst=ENDPOINT_CIDR, gateway=plan.backend_ip)
            links.write_sysctl("net/ipv4/ip_forward", "1")
            links.write_sysctl("net/ipv4/conf/all/rp_filter", "0")
        with enter_netns(self.backend_netns), links.rtnl() as ipr:
            idx = links.ifindex(ipr, f"n{plan.index}")
            ipr.addr("add", index=idx, address=plan.backend_ip, prefixlen=30)
            ipr.link("set", index=idx, state="up")
            ipr.route("add", dst=f"100.100.{plan.index}.0/24", gateway=plan.node_backend_ip)

    def fresh_client(self, path: str) -> str:
        """A new client namespace for ``path`` (no TIME_WAIT inherited from an earlier run)."""
        plan = self.plans[path]
        fabric.del_netns(plan.client_netns)
        fabric.add_netns(plan.client_netns)
        with enter_netns(plan.node_netns), links.rtnl() as ipr:
            links.delete_link(ipr, "c0")
            ipr.link(
                "add",
                ifname="c0",
                kind="veth",
                peer={"ifname": "eth0", "net_ns_fd": f"/run/netns/{plan.client_netns}"},
            )
            idx = links.ifindex(ipr, "c0")
            ipr.addr("add", index=idx, address=plan.node_client_ip, prefixlen=24)
            ipr.link("set", index=idx, state="up")
        with enter_netns(plan.client_netns), links.rtnl() as ipr:
            idx = links.ifindex(ipr, "eth0")
            ipr.addr("add", index=idx, address=plan.client_ip, prefixlen=24)
            ipr.link("set", index=idx, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=plan.node_client_ip)
            for knob, value in CLIENT_SYSCTLS.items():
                links.write_sysctl(knob, value)
        return plan.client_netns

    def _start_server(self, cpu: int) -> None:
        conf = os.path.join(self.work, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(work=self.work, port=SERVER_PORT))
        argv = ["taskset", "-c", str(cpu), "nginx", "-c", conf, "-g", "daemon off;"]
        rec = processes.spawn(
            argv, "bench-backend", os.path.join(self.work, "nginx.log"), netns=self.backend_netns
        )
        self.server = rec
        with open(os.path.join(self.work, "procs.json"), "w") as f:
            json.dump([rec], f)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if listening(self.backend_netns, SERVER_PORT):
                return
            if not processes.alive(rec):
                break
            time.sleep(0.05)
        raise BaselineError(f"nginx did not listen on :{SERVER_PORT} (log in {self.work})")

    def server_pids(self) -> list[int]:
        """nginx's master and worker pids (for CPU accounting)."""
        if self.server is None:
            return []
        master = int(str(self.server["pid"]))
        return [master, *children(master)]

    def down(self) -> None:
        down(self.prefix)

    # ------------------------------------------------------------------ rules
    def flush(self, path: str) -> None:
        """Remove kube-proxy's rules from a path's node (its conntrack table too)."""
        plan = self.plans[path]
        if path.startswith("iptables"):
            run_in(plan.node_netns, [f"iptables-{iptables_backend(path)}", "-t", "nat", "-F"])
            run_in(plan.node_netns, [f"iptables-{iptables_backend(path)}", "-t", "nat", "-X"])
            run_in(plan.node_netns, [f"iptables-{iptables_backend(path)}", "-t", "filter", "-F"])
            run_in(plan.node_netns, [f"iptables-{iptables_backend(path)}", "-t", "filter", "-X"])
        elif path == "nftables":
            run_in(plan.node_netns, ["nft", "flush", "ruleset"])
        flush_conntrack(plan.node_netns)

    def load_iptables(self, path: str, rules: str, noflush: bool = True) -> float:
        """kube-proxy's sync: one ``iptables-restore --noflush --counters`` (seconds taken).
        Without ``noflush`` every chain of the tables named in ``rules`` is flushed first,
        built-in ones included: ``rules`` must then carry the jumps (``jumps=True``)."""
        plan = self.plans[path]
        binary = f"iptables-{iptables_backend(path)}-restore"
        argv = [binary, "--counters", *(["--noflush"] if noflush else [])]
        started = time.monotonic()
        run_in(plan.node_netns, argv, stdin=rules, timeout_s=LOAD_TIMEOUT_S)
        return time.monotonic() - started

    def load_nftables(self, path: str, rules: str) -> float:
        """kube-proxy's nftables sync: one ``nft -f`` transaction (seconds taken)."""
        plan = self.plans[path]
        started = time.monotonic()
        run_in(plan.node_netns, ["nft", "-f", "-"], stdin=rules, timeout_s=LOAD_TIMEOUT_S)
        return time.monotonic() - started

    def program(self, path: str, services: Sequence[KubeServicePort]) -> Programmed:
        """Empty the path's node, then load ``services`` as kube-proxy's first sync does."""
        self.flush(path)
        n = service_count(services)
        if path == "plain":
            return Programmed(path, n, None, "no rules: plain routing")
        self.set_conntrack_knobs(path)
        if path == "nftables" and n > NFT_ONE_TRANSACTION_MAX:
            for part in nft_chunks(services, NFT_CHUNK):
                self.load_nftables(path, part)
            return Programmed(
                path,
                n,
                None,
                f"not measured above {NFT_ONE_TRANSACTION_MAX:,} services: one transaction is "
                f"superlinear in the kernel (251 s at 20,000 in benchmarking.md); loaded in "
                f"transactions of {NFT_CHUNK:,} services",
            )
        if path == "nftables":
            rules = kubeproxy_rules.nftables(
                services, cluster_cidr=CLUSTER_CIDR, service_cidr=SERVICE_CIDR
            )
            return Programmed(path, n, self.load_nftables(path, rules))
        rules = kubeproxy_rules.iptables_restore(services, cluster_cidr=CLUSTER_CIDR)
        if path == "iptables-nft" and n > IPT_NFT_NOFLUSH_MAX:
            self.load_iptables(path, rules, noflush=False)
            return Programmed(
                path,
                n,
                None,
                f"not measured above {IPT_NFT_NOFLUSH_MAX:,} services: "
                "iptables-nft-restore --noflush is quadratic (loaded without --noflush)",
            )
        return Programmed(path, n, self.load_iptables(path, rules))

    def change_one(
        self,
        path: str,
        services: Sequence[KubeServicePort],
        old: KubeServicePort,
        new: KubeServicePort,
    ) -> float | None:
        """kube-proxy's partial sync after ``old`` became ``new`` (``services``: the state after
        the change); seconds the transaction took. None: not applied, not measured (plain has
        no rules; iptables-nft above IPT_NFT_NOFLUSH_MAX: its --noflush restore is quadratic)."""
        big = service_count(services) > IPT_NFT_NOFLUSH_MAX
        if path == "plain" or (path == "iptables-nft" and big):
            return None
        if path == "nftables":
            return self.load_nftables(path, nft_partial_sync(old, new))
        return self.load_iptables(path, iptables_partial_sync(services, old, new))

    def target(self, path: str, services: Sequence[KubeServicePort]) -> tuple[str, int]:
        """Where a client of ``path`` connects: the last service's VIP (the worst case of
        kube-proxy's linear KUBE-SERVICES), or for ``plain`` its first endpoint."""
        last = services[-1]
        if path == "plain":
            ip, port = last.endpoints[0]
            return ip, port
        return last.cluster_ip, last.port

    def prepare_run(self, path: str) -> str:
        """Before a measured run: empty conntrack on the node, a fresh client; its netns."""
        flush_conntrack(self.plans[path].node_netns)
        return self.fresh_client(path)

    def set_conntrack_knobs(self, path: str) -> None:
        """kube-proxy's per-netns conntrack settings (a NAT path's node has conntrack)."""
        with enter_netns(self.plans[path].node_netns):
            for knob, value in KUBE_PROXY_CT_SYSCTLS.items():
                if os.path.exists("/proc/sys/" + knob):
                    links.write_sysctl(knob, value)


def service_count(services: Sequence[KubeServicePort]) -> int:
    """Services, not service ports (a multi-port service counts once)."""
    return len({(s.namespace, s.name) for s in services})


def nft_chunks(services: Sequence[KubeServicePort], size: int) -> list[str]:
    """kube-proxy's nftables rules as several transactions: the first creates the table with
    ``size`` services, each next one adds ``size`` more (the table-level lines left out)."""
    base = set(
        kubeproxy_rules.nftables(
            [], cluster_cidr=CLUSTER_CIDR, service_cidr=SERVICE_CIDR
        ).splitlines()
    )
    out = []
    for start in range(0, len(services), size):
        text = kubeproxy_rules.nftables(
            services[start : start + size], cluster_cidr=CLUSTER_CIDR, service_cidr=SERVICE_CIDR
        )
        if start:
            text = "\n".join(ln for ln in text.splitlines() if ln not in base) + "\n"
        out.append(text)
    return out


# ---------------------------------------------------------------------- partial syncs


def iptables_partial_sync(
    services: Sequence[KubeServicePort], old: KubeServicePort, new: KubeServicePort
) -> str:
    """What kube-proxy's iptables mode restores after one endpoint change (partial sync, 1.28+):
    KUBE-SERVICES rewritten whole (one rule per service), the changed service's KUBE-SVC chain
    and its KUBE-SEP chains rewritten, the departed endpoint's KUBE-SEP chain deleted. The
    filter table is left out (kube-proxy rewrites it too; it holds no per-service rule here)."""
    full = kubeproxy_rules.iptables_restore(services, cluster_cidr=CLUSTER_CIDR, jumps=False)
    nat = full[full.index("*nat") :]
    svc = kubeproxy_rules.svc_chain(new)
    seps = {kubeproxy_rules.sep_chain(new, ip, port) for ip, port in new.endpoints}
    gone = {kubeproxy_rules.sep_chain(old, ip, port) for ip, port in old.endpoints} - seps
    keep = {"KUBE-SERVICES", svc, *seps}
    lines = ["*nat"]
    # a stale chain is declared (which flushes it: -X wants it empty), then deleted
    lines += [f":{c} - [0:0]" for c in ("KUBE-SERVICES", svc, *sorted(seps), *sorted(gone))]
    for line in nat.splitlines():
        if line.startswith("-A ") and line.split()[1] in keep:
            lines.append(line)
    lines += [f"-X {c}" for c in sorted(gone)]
    return "\n".join([*lines, "COMMIT"]) + "\n"


def nft_partial_sync(old: KubeServicePort, new: KubeServicePort) -> str:
    """What kube-proxy's nftables mode sends after one endpoint change: the new endpoint chain,
    the service chain flushed and refilled (its numgen vmap), the departed endpoint's chain
    deleted; the service-ips map is untouched."""
    table = "ip kube-proxy"
    svc = kubeproxy_rules.nft_service_chain(new)
    eps = {kubeproxy_rules.nft_endpoint_chain(new, ip, port) for ip, port in new.endpoints}
    gone = {kubeproxy_rules.nft_endpoint_chain(old, ip, port) for ip, port in old.endpoints} - eps
    one = kubeproxy_rules.nftables([new], cluster_cidr=CLUSTER_CIDR, service_cidr=SERVICE_CIDR)
    adds, svc_rules = [], []
    for line in one.splitlines():
        words = line.split()
        if len(words) > 4 and words[0] == "add" and words[1] in ("chain", "rule"):
            if words[4] in eps:
                adds.append(line)
            elif words[4] == svc and words[1] == "rule":
                svc_rules.append(line)
    out = [*adds, f"flush chain {table} {svc}", *svc_rules]
    out += [f"delete chain {table} {c}" for c in sorted(gone)]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------- helpers


def run_in(
    netns: str,
    argv: Sequence[str],
    check: bool = True,
    stdin: str | None = None,
    timeout_s: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """A command in ``netns`` (nsenter: only the network namespace, /sys stays ours)."""
    full = ["nsenter", f"--net=/run/netns/{netns}", *argv]
    done = subprocess.run(
        full, input=stdin, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if check and done.returncode != 0:
        what = " ".join(argv[:3])
        raise BaselineError(f"{what} in {netns} failed ({done.returncode}): {done.stderr[:500]}")
    return done


def flush_conntrack(netns: str) -> None:
    if shutil.which("conntrack") is None:
        raise BaselineError("the conntrack tool is missing (apt-get install conntrack)")
    run_in(netns, ["conntrack", "-F"], check=False)  # exits 1 when the table is empty


def conntrack_count(netns: str) -> int:
    with enter_netns(netns):
        try:
            with open("/proc/sys/net/netfilter/nf_conntrack_count") as f:
                return int(f.read())
        except FileNotFoundError:
            return 0


def listening(netns: str, port: int) -> bool:
    out = run_in(netns, ["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
    return bool(out.strip())


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []


def down(prefix: str) -> None:
    """Remove everything ``Baselines.up(prefix)`` made, also after a crash."""
    work = os.path.join(WORK_BASE, prefix)
    try:
        with open(os.path.join(work, "procs.json")) as f:
            for rec in json.load(f):
                processes.stop(rec)
    except (FileNotFoundError, ValueError):
        pass
    for ns in fabric.lab_netns(f"{prefix}-"):
        fabric.del_netns(ns)
    shutil.rmtree(work, ignore_errors=True)
    try:
        os.rmdir(WORK_BASE)
    except OSError:
        pass


def exists(prefix: str) -> bool:
    return netns_exists(f"{prefix}-be")

"""`tabbyctl bench`: tabby side by side with kube-proxy's layouts on one machine, N services.

Two families of paths, each measured against its own plain-routing denominator:

- kernel (``lab/baselines.py``: client -> node -> backend, one node namespace per path):
  ``plain`` (the kernel's routing, no rule, no conntrack), ``iptables-legacy``, ``iptables-nft``,
  ``nftables`` (kube-proxy's layouts, loaded as kube-proxy does). Ratios are to ``plain``.
- tabby (a two-node lab of its own: client pods on node1, nginx on node2, VXLAN between):
  ``tabby-direct`` (pod -> pod IP), ``tabby-nat`` (pod netns -> ClusterIP from outside the pod's
  cgroup: per-packet NAT in tc), ``tabby-ctlb`` (inside the cgroup: connect-time LB). Ratios are
  to ``tabby-direct``; ``tabby-direct / plain`` is reported too, but the shapes differ (VXLAN and
  a fabric hop), so it is the cost of the lab's path, not of the NAT.
- local (the same lab, the kernel paths' shape: a client pod and nginx both on node2, two veth
  hops through the node): ``tabby-local`` (pod IP), ``tabby-local-nat`` (ClusterIP, per-packet
  NAT), ``tabby-local-ctlb`` (connect-time LB), ``tabby-local-stack`` (pod IP with
  ``bpfRedirectToPeer`` Disabled, switched live before its cells: through the node's stack).
  Ratios are to ``plain``: like for like, what tabby's datapath costs or saves over the kernel's
  routing. ``BenchConfig.redirect`` sets bpfRedirectToPeer for every other tabby path.

Per N (services x 3 endpoints): programming from scratch, then ``reps`` repetitions in which the
paths run interleaved (the order rotates), each path a rate cell (connload, ``inflight``
connections, client on CPU0, server on CPU1) and an unloaded latency cell (one connection at a
time: connect + first response byte, p01/p50/p90/p99); then one-change latency, agent RSS and, at
the first and last N, iperf3. CPU per connection is whole-machine busy time from /proc/stat over
the cell, minus the load generator's and the server's own process time. In each
repetition, each tabby path also runs a profile cell of its own (``profile_seconds``) with the
kernel's BPF run-time stats on (``bpf/progstats.py``): tabby's programs' time per connection
(median over the repetitions), the datapath's own cost against N. The stats cost two clock
reads per program run, so no compared cell runs with them.

- external (the same lab, from its external client 203.0.113.x behind the fabric's router):
  ``nodeport-plain`` (the client reaches the nginx pod's own address, routed by the fabric
  router to node2: no NAT, the denominator), ``nodeport-tunnel`` and ``nodeport-dsr`` (node1's
  address and Service ``web``'s NodePort, ``bpfExternalServiceMode`` Tunnel / DSR, switched
  live before the path's cells). Each path has its own client source address, so no flow of
  one path ever reuses the tuple of another's closed flow (the backend's node keeps ext-tunnel
  conntrack entries keyed by the client's tuple). Ratios are to ``nodeport-plain``.

Invariant: everything the run creates (the lab, the baseline namespaces, iperf3 servers) is
removed in ``run``'s ``finally``, also on Ctrl-C and SIGTERM; a leftover of an interrupted run
under the same name is removed before starting.
"""

from __future__ import annotations

import ipaddress
import json
import os
import resource
import signal
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tabby.bpf import progstats
from tabby.bpf.maps.nat import BACKENDS_SPEC, FRONTENDS_SPEC, BackendKey, FrontendKey
from tabby.datastore.embedded import EmbeddedDatastore
from tabby.lab import baselines, processes, state, traffic
from tabby.lab.baselines import Baselines
from tabby.lab.cluster import HEALTH_PORT, Lab, pin_root
from tabby.lab.kubeproxy_rules import KubeServicePort
from tabby.netlink.netns import enter_netns

KERNEL_PATHS = ("plain", "iptables-legacy", "iptables-nft", "nftables")
TABBY_PATHS = ("tabby-direct", "tabby-nat", "tabby-ctlb")
# the kernel paths' shape in the lab: client pod and nginx on node2, two veth hops through it
LOCAL_PATHS = ("tabby-local", "tabby-local-nat", "tabby-local-ctlb", "tabby-local-stack")
EXTERNAL_PATHS = ("nodeport-plain", "nodeport-tunnel", "nodeport-dsr")
ALL_PATHS = KERNEL_PATHS + TABBY_PATHS + LOCAL_PATHS + EXTERNAL_PATHS
# a run's paths unless --paths says otherwise: tabby-local-stack (the fast path off, switched
# live before each of its cells) is a diagnostic, asked for by name
DEFAULT_PATHS = tuple(p for p in ALL_PATHS if p != "tabby-local-stack")
# families measured at the first and the last N only (as iperf3): the stretch target is read
# at 20,000, and the lookups these paths make are the tabby family's, measured at every N
ENDS_ONLY_FAMILIES = frozenset({"local"})
PATH_FAMILY = {
    **{p: "kernel" for p in KERNEL_PATHS},
    **{p: "tabby" for p in TABBY_PATHS},
    **{p: "local" for p in LOCAL_PATHS},
    **{p: "external" for p in EXTERNAL_PATHS},
}
DENOMINATOR = {
    "kernel": "plain",
    "tabby": "tabby-direct",
    "local": "plain",  # the same shape: what the node's stack costs, and what skipping it gains
    "external": "nodeport-plain",
}
REDIRECT_MODES = ("Enabled", "Disabled")
# bpfRedirectToPeer per path: tabby-local through the node's stack, whatever the run's setting
PATH_REDIRECT = {"tabby-local-stack": "Disabled"}
EXT_MODES = {"nodeport-tunnel": "Tunnel", "nodeport-dsr": "DSR"}
# one client address per external path (added to the external namespace's link)
EXT_SOURCES = {
    "nodeport-plain": "203.0.113.21",
    "nodeport-tunnel": "203.0.113.22",
    "nodeport-dsr": "203.0.113.23",
}
WEB_NODEPORT, IPERF_NODEPORT = 30080, 30201
FULL_SIZES = (1, 1000, 5000, 10000, 20000)
QUICK_SIZES = (1, 1000)
ENDPOINTS = 3
IPERF_PORT = 5201
KUBE_CHANGES = 3  # partial syncs per layout and N (each rewrites KUBE-SERVICES whole)
KUBE_CHANGE_BUDGET_MS = 20000.0  # no further sample of a layout once its samples took this long
CHANGE_IP_BASE = int(ipaddress.IPv4Address("100.120.255.1"))  # inside the backend's AnyIP range
WEB_VIP = "100.64.0.100"
SYN_VIP_BASE = int(ipaddress.IPv4Address("100.66.0.0"))  # the lab's synthetic services
SYN_BACKEND_BASE = int(ipaddress.IPv4Address("100.120.0.0"))
CLIENT_PODS = {
    "tabby-direct": "bc-direct",
    "tabby-nat": "bc-nat",
    "tabby-ctlb": "bc-ctlb",
    "tabby-local": "bc-local",
    "tabby-local-nat": "bc-lnat",
    "tabby-local-ctlb": "bc-lctlb",
    "tabby-local-stack": "bc-lstack",
}
SETTLE_S = 5.0  # at most, for the datastore's pages to be checkpointed after a bulk load
SMOKE_CONNS = 3  # connections a path must serve before it is measured at a size
CLIENT_SYSCTLS = {"net.ipv4.ip_local_port_range": "1024 65535", "net.ipv4.tcp_tw_reuse": "1"}
Progress = Callable[[str], None]


class BenchError(Exception):
    pass


@dataclass
class BenchConfig:
    sizes: tuple[int, ...] = FULL_SIZES
    reps: int = 3
    # cell lengths: 13 paths x 5 sizes x 3 repetitions fit the 25 minutes at these
    seconds: float = 3.0  # per rate cell
    latency_seconds: float = 1.0  # per unloaded latency cell
    iperf_seconds: float = 2.0  # per path and repetition, at the first and last N
    profile_seconds: float = 1.0  # per tabby path and repetition: BPF run time per connection
    inflight: int = 32
    changes: int = 10  # one-change latency samples per N
    paths: tuple[str, ...] = DEFAULT_PATHS
    name: str = "tbench"
    connload: str = ""
    ext_settle_s: float = 1.0  # after a bpfExternalServiceMode switch, before the next cell
    redirect: str = "Enabled"  # bpfRedirectToPeer of the tabby paths (tabby-local-stack: Disabled)

    @classmethod
    def quick(cls, **kw: Any) -> BenchConfig:
        base: dict[str, Any] = {
            "sizes": QUICK_SIZES,
            "reps": 1,
            "seconds": 2.0,
            "latency_seconds": 0.25,  # still hundreds of connections: p99 is shown, not read
            "iperf_seconds": 1.0,  # iperf3's shortest
            "profile_seconds": 0.25,  # a thousand connections or more
            "changes": 3,
            "ext_settle_s": 0.0,  # a smoke test: no figure is read
        }
        base.update(kw)
        return cls(**base)

    def check(self) -> None:
        unknown = [p for p in self.paths if p not in ALL_PATHS]
        if unknown:
            raise BenchError(f"paths: unknown {unknown}; use {', '.join(ALL_PATHS)}")
        if not self.sizes or any(not 1 <= n <= 20000 for n in self.sizes):
            raise BenchError(f"sizes: {self.sizes}: each between 1 and 20,000")
        if not 1 <= self.reps <= 10:
            raise BenchError(f"reps: {self.reps}: between 1 and 10")
        if not 0 < self.seconds <= 60 or not 0 < self.latency_seconds <= 60:
            raise BenchError("seconds / latency_seconds: in (0, 60]")
        if self.redirect not in REDIRECT_MODES:
            raise BenchError(f"redirect: {self.redirect!r}: one of {', '.join(REDIRECT_MODES)}")
        if not 1 <= self.inflight <= 1024:
            raise BenchError(f"inflight: {self.inflight}: between 1 and 1024")
        for p in self.paths:
            den = DENOMINATOR[PATH_FAMILY[p]]
            if den not in self.paths:
                raise BenchError(f"paths: {p} needs its denominator {den} in the same run")
        if not self.connload or not os.access(self.connload, os.X_OK):
            raise BenchError(f"load generator {self.connload or 'connload'} missing: run `make`")


@dataclass
class Cell:
    """One measured run of one path."""

    services: int
    rep: int
    path: str
    kind: str  # "rate" | "latency"
    rate: float
    conns: int
    p01_us: int
    p50_us: int
    p90_us: int
    p99_us: int
    errors: int
    cpu_busy_pct: list[float] = field(default_factory=list)
    cpu_us_per_conn: float = 0.0  # whole machine
    net_cpu_us_per_conn: float = 0.0  # minus the load generator and server processes


@dataclass
class SizeResult:
    """What is measured once per N (not per repetition)."""

    services: int
    program_s: dict[str, float | None] = field(default_factory=dict)
    program_notes: dict[str, str] = field(default_factory=dict)
    change_ms: dict[str, list[float]] = field(default_factory=dict)
    # tabby's one change split by its agent's own metrics (mean per change, ms)
    change_split_ms: dict[str, float] = field(default_factory=dict)
    change_notes: dict[str, str] = field(default_factory=dict)
    agent_rss_mb: float | None = None
    # one iperf3 stream per path and repetition (at the first and last N): each repetition's
    # in iperf_reps, the median in iperf_gbps
    iperf_gbps: dict[str, float] = field(default_factory=dict)
    iperf_reps: dict[str, list[float]] = field(default_factory=dict)
    # tabby paths' profile cells: BPF run time per connection (ns), all of the lab's programs,
    # median over the repetitions (each repetition's in bpf_ns_reps)
    bpf_ns_per_conn: dict[str, float] = field(default_factory=dict)
    bpf_ns_reps: dict[str, list[float]] = field(default_factory=dict)
    # ... per program name (both nodes summed), in the median repetition:
    # [ns per run, runs per connection]
    bpf_progs: dict[str, dict[str, list[float]]] = field(default_factory=dict)


@dataclass
class BenchResult:
    config: dict[str, Any]
    machine: dict[str, Any]
    started: str
    cells: list[Cell] = field(default_factory=list)
    sizes: list[SizeResult] = field(default_factory=list)
    duration_s: float = 0.0
    error: str = ""  # why the run stopped early (what was measured before is kept)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------- measuring primitives


def cpu_times() -> list[tuple[int, int]]:
    """(busy, total) jiffies per CPU from /proc/stat."""
    out = []
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                v = [int(x) for x in line.split()[1:]]
                idle = v[3] + v[4]
                out.append((sum(v) - idle, sum(v)))
    return out


def proc_cpu_s(pids: Sequence[int]) -> float:
    """utime + stime of the given processes (all their threads), seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return total / ticks


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_connload(
    binary: str,
    netns: str,
    target: str,
    port: int,
    seconds: float,
    inflight: int,
    cgroup: str | None = None,
    source: str | None = None,
    max_conns: int = 2000000,
) -> dict[str, float]:
    """connload inside ``netns`` on CPU 0 (in ``cgroup`` when given: connect-time LB sees it;
    from ``source`` when given); it stops after ``seconds`` or ``max_conns`` connections."""
    argv = ["nsenter", f"--net=/run/netns/{netns}", "taskset", "-c", "0", binary]
    argv += ["-a", target, "-p", str(port), "-c", str(inflight), "-t", str(seconds)]
    argv += ["-n", str(max_conns), *(["-b", source] if source else [])]

    done = _run_client(argv, seconds, cgroup)
    if done.returncode != 0:
        raise BenchError(f"connload to {target}:{port} failed: {done.stderr.strip()}")
    return {k: float(v) for k, v in (kv.split("=", 1) for kv in done.stdout.split())}


def _run_client(
    argv: list[str], seconds: float, cgroup: str | None
) -> subprocess.CompletedProcess[str]:
    """A load client (connload, iperf3) run to completion, in ``cgroup`` when given."""

    def into_cgroup() -> None:
        if cgroup:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        preexec_fn=into_cgroup,
        check=False,
    )


def run_iperf(
    netns: str,
    target: str,
    seconds: float,
    cgroup: str | None = None,
    port: int = IPERF_PORT,
    source: str | None = None,
    reverse: bool = False,
) -> float:
    """One iperf3 stream from ``netns`` (CPU 0) to ``target`` (``reverse``: the server sends);
    received Gbit/s."""
    argv = ["nsenter", f"--net=/run/netns/{netns}", "taskset", "-c", "0", "iperf3", "-J"]
    argv += ["-c", target, "-p", str(port), "-t", str(seconds), *(["-B", source] if source else [])]
    argv += ["-R"] if reverse else []

    done = _run_client(argv, seconds, cgroup)
    try:
        report = json.loads(done.stdout)
        return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9
    except (ValueError, KeyError) as e:
        raise BenchError(f"iperf3 to {target} failed: {done.stdout[-300:]} {done.stderr}") from e


def sysctls_in(netns: str, knobs: dict[str, str]) -> None:
    for knob, value in knobs.items():
        subprocess.run(
            ["nsenter", f"--net=/run/netns/{netns}", "sysctl", "-qw", f"{knob}={value}"],
            check=True,
        )


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None
    return None


def agent_get(netns: str, path: str) -> bytes:
    box: dict[str, bytes] = {}

    def fetch() -> None:
        with enter_netns(netns):
            try:
                url = f"http://127.0.0.1:{HEALTH_PORT}{path}"
                with urllib.request.urlopen(url, timeout=5) as r:
                    box["body"] = r.read()
            except urllib.error.HTTPError as e:
                box["body"] = e.read()
            except OSError:
                box["body"] = b""

    t = threading.Thread(target=fetch)
    t.start()
    t.join()
    return box.get("body", b"")


def agent_metric(netns: str, name: str) -> float | None:
    for line in agent_get(netns, "/metrics").decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def wait_programmed(netns: str, revision: int, timeout_s: float = 30.0) -> None:
    """Poll an agent's /readyz every ~1 ms from one thread in its netns until ``revision``."""
    box: dict[str, bool] = {}

    def poll() -> None:
        with enter_netns(netns):
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                try:
                    url = f"http://127.0.0.1:{HEALTH_PORT}/readyz"
                    with urllib.request.urlopen(url, timeout=2) as r:
                        body = json.load(r)
                except urllib.error.HTTPError as e:
                    body = json.load(e)
                except OSError:
                    body = {}
                if int(body.get("revision", 0)) >= revision:
                    box["ok"] = True
                    return
                time.sleep(0.001)

    t = threading.Thread(target=poll)
    t.start()
    t.join()
    if not box.get("ok"):
        raise BenchError(f"the agent in {netns} never programmed revision {revision}")


def fewest_switches(
    order: Sequence[str],
    needs: Callable[[str], tuple[str | None, ...]],
    now: tuple[str | None, ...],
) -> list[str]:
    """``order`` with the paths that need a live setting (a FelixConfiguration switch: every
    agent reloads, ~2 s here) refilled into those same slots, each slot taking the first of
    them whose settings are those already in place, else the next in ``order``: the other
    paths keep their rotated places, and the paths needing one setting run one after another
    starting with the one in place. ``needs(path)``: the settings a path's cells switch to
    (None: not this one), in the order of ``now``, the settings in place."""

    def fits(path: str, state: Sequence[str | None]) -> bool:
        return all(v is None or v == s for v, s in zip(needs(path), state, strict=True))

    setting = [i for i, p in enumerate(order) if any(v is not None for v in needs(p))]
    waiting = [order[i] for i in setting]
    out = list(order)
    state = list(now)
    for i in setting:
        pick = next((p for p in waiting if fits(p, state)), waiting[0])
        waiting.remove(pick)
        out[i] = pick
        state = [s if v is None else v for v, s in zip(needs(pick), state, strict=True)]
    return out


# ---------------------------------------------------------------------- synthetic services


class NatView:
    """A node's pinned tby_nat_fe / tby_nat_be, read from this process (no agent involved)."""

    def __init__(self, pin_root: str) -> None:
        self.fe = FRONTENDS_SPEC.open_pinned(pin_root)
        self.be = BACKENDS_SPEC.open_pinned(pin_root)

    def __enter__(self) -> NatView:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.fe.close()
        self.be.close()

    def backends(self, vip: str, port: int) -> set[str]:
        fe = self.fe.lookup(FrontendKey.make(vip, port, "TCP"))
        if fe is None:
            return set()
        found = (self.be.lookup(BackendKey(id=fe.id, ordinal=o)) for o in range(fe.count))
        return {b.describe() for b in found if b is not None}

    def wait_backend(self, vip: str, port: int, backend: str, timeout_s: float = 30.0) -> None:
        """Until ``backend`` ("ip:port") is one of ``vip:port``'s; polled every ~0.2 ms."""
        deadline = time.monotonic() + timeout_s
        while backend not in self.backends(vip, port):
            if time.monotonic() > deadline:
                raise BenchError(f"{vip}:{port} never got backend {backend}")
            time.sleep(0.0002)


def syn_vip(i: int) -> str:
    return str(ipaddress.IPv4Address(SYN_VIP_BASE + i))


def syn_service(i: int) -> dict[str, Any]:
    vip = syn_vip(i)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc-{i}", "namespace": "default"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": vip,
            "clusterIPs": [vip],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    }


def syn_slice(i: int, generation: int = 0) -> dict[str, Any]:
    """Service i's 3 endpoints (selector-less: the lab's controller leaves them alone);
    ``generation`` > 0 replaces the first endpoint (one endpoint change)."""
    addrs = [str(ipaddress.IPv4Address(SYN_BACKEND_BASE + i * 4 + j)) for j in range(ENDPOINTS)]
    if generation:
        addrs[0] = str(ipaddress.IPv4Address(SYN_BACKEND_BASE + 100000 + generation))
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"svc-{i}-bench",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": f"svc-{i}"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [a],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": "node2",
            }
            for a in addrs
        ],
    }


# ---------------------------------------------------------------------- the tabby side


@dataclass(frozen=True)
class Target:
    """Where a path's client runs and what it connects to."""

    netns: str
    ip: str
    port: int
    cgroup: str | None = None  # the client runs in it (connect-time LB)
    source: str | None = None  # the client binds to it
    iperf_port: int = IPERF_PORT
    # iperf3 -R: the server sends. External paths measure downloads, the direction DSR changes
    # (a NodePort's client mostly receives); their denominator is measured the same way.
    iperf_reverse: bool = False


class TabbySide:
    """The two-node lab: client pods on node1, nginx (+ iperf3) on node2, Service ``web``
    (NodePort), and the lab's external client for the NodePort paths."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.stored = 1  # services in the datastore: web
        self.split_before: dict[str, float] = {}
        self.extra_procs: list[dict[str, Any]] = []
        self.ext_mode = "Tunnel"  # the lab's bpfExternalServiceMode
        self.redirect = "Enabled"  # the lab's bpfRedirectToPeer (the default)

    @classmethod
    def up(cls, name: str, progress: Progress, paths: Sequence[str] = ALL_PATHS) -> TabbySide:
        """The lab, a client pod per tabby path in ``paths``, nginx, Service ``web``; the
        external client when ``paths`` has a NodePort path."""
        # both nodes on one subnet, as most clusters' nodes are: node1 -> node2 crosses the
        # fabric's bridge only (the lab's default alternates subnets, so that the router sat on
        # every node-to-node path, NodePort's included; bench/encap_modes.py measures that)
        lab = Lab.up(name, nodes=2, progress=lambda m: progress(f"lab: {m}"), placement=(0, 0))
        self = cls(lab)
        pods: list[tuple[str, str, str, dict[str, str] | None]] = [
            (pod, "node2" if PATH_FAMILY[path] == "local" else "node1", "pause", None)
            for path, pod in CLIENT_PODS.items()
            if path in paths
        ]
        pods.append(("web", "node2", "nginx", {"app": "web"}))
        # at once, as a kubelet would: each is a tabby-cni process (~1 s here, mostly waiting)
        with ThreadPoolExecutor(max_workers=len(pods)) as pool:
            added = [
                pool.submit(lab.add_pod, pod, node, image=image, labels=labels, wait=False)
                for pod, node, image, labels in pods
            ]
            for future in added:
                future.result()
        web = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "type": "NodePort",
                "clusterIP": WEB_VIP,
                "selector": {"app": "web"},
                "ports": [
                    {
                        "name": "http",
                        "port": 80,
                        "targetPort": 80,
                        "protocol": "TCP",
                        "nodePort": WEB_NODEPORT,
                    },
                    {
                        "name": "iperf",
                        "port": IPERF_PORT,
                        "targetPort": IPERF_PORT,
                        "protocol": "TCP",
                        "nodePort": IPERF_NODEPORT,
                    },
                ],
            },
        }
        lab.datastore().apply([web])
        self._wait_web_endpoint()
        web_pod = lab.pod("web")
        for rec in web_pod.get("procs", []):
            pid = int(rec["pid"])
            for p in (pid, *baselines.children(pid)):
                subprocess.run(["taskset", "-a", "-p", "-c", "1", str(p)], capture_output=True)
        for pod, *_ in pods[:-1]:
            sysctls_in(lab.pod(pod)["netns"], CLIENT_SYSCTLS)
        log = os.path.join(state.lab_dir(name), "iperf3-web.log")
        argv = ["taskset", "-c", "1", "iperf3", "-s", "-p", str(IPERF_PORT)]
        rec = processes.spawn(argv, "bench iperf3", log, netns=web_pod["netns"])
        self.extra_procs.append(rec)
        # in the lab's record too: `tabbyctl lab down` then stops it even if this run was
        # killed before its own clean-up (SIGKILL, a test's timeout)
        with state.editing(name) as st:
            st["procs"] = [*st.get("procs", []), rec]
        if any(PATH_FAMILY[p] == "external" for p in paths):
            self._external_client(web_pod["ip"])
        return self

    def _external_client(self, web_ip: str) -> None:
        """The external namespace gets one address per NodePort path and the client sysctls;
        the fabric's router a route to the nginx pod through node2 (nodeport-plain). All of it
        inside the lab's namespaces, removed with them."""
        plan = self.lab.plan
        for src in EXT_SOURCES.values():
            subprocess.run(
                ["ip", "-n", plan.external_netns, "addr", "add", f"{src}/24", "dev", "eth0"],
                check=True,
            )
        sysctls_in(plan.external_netns, CLIENT_SYSCTLS)
        node2 = plan.node("node2").ip
        subprocess.run(
            ["ip", "-n", plan.fabric_netns, "route", "replace", f"{web_ip}/32", "via", node2],
            check=True,
        )

    def set_ext_mode(self, mode: str, settle_s: float) -> None:
        """bpfExternalServiceMode, live, if it differs."""
        if mode != self.ext_mode:
            self._patch_felix("bpfExternalServiceMode", mode, settle_s)
            self.ext_mode = mode

    def set_redirect(self, mode: str, settle_s: float) -> None:
        """bpfRedirectToPeer, live, if it differs."""
        if mode != self.redirect:
            self._patch_felix("bpfRedirectToPeer", mode, settle_s)
            self.redirect = mode

    def _patch_felix(self, field: str, value: str, settle_s: float) -> None:
        """One FelixConfiguration field; every agent reloads its programs."""
        self.lab.datastore().patch("FelixConfiguration", "default", None, {"spec": {field: value}})
        self.lab.wait_ready(timeout_s=120)
        # the agents just reloaded their programs (the verifier, the first applies): let that
        # work finish before a cell measures (two NodePort cells gave 0.4x in a run without it;
        # not shown to be the cause)
        time.sleep(settle_s)

    def _wait_web_endpoint(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            slices, _ = self.lab.datastore().list("EndpointSlice", "default")
            if any(
                s["metadata"]["labels"].get("kubernetes.io/service-name") == "web"
                and s.get("endpoints")
                for s in slices
            ):
                self.lab.wait_ready()
                return
            time.sleep(0.1)
        raise BenchError("Service web: the lab's controller wrote no endpoint")

    def target(self, path: str) -> Target:
        """Where a tabby or external path's client runs and what it connects to."""
        if PATH_FAMILY[path] == "external":
            ext, src = self.lab.plan.external_netns, EXT_SOURCES[path]
            if path == "nodeport-plain":
                return Target(ext, self.lab.pod("web")["ip"], 80, source=src, iperf_reverse=True)
            node1 = self.lab.plan.node("node1").ip
            return Target(ext, node1, WEB_NODEPORT, None, src, IPERF_NODEPORT, iperf_reverse=True)
        client = self.lab.pod(CLIENT_PODS[path])
        if path in ("tabby-direct", "tabby-local", "tabby-local-stack"):
            return Target(client["netns"], self.lab.pod("web")["ip"], 80)
        if path in ("tabby-nat", "tabby-local-nat"):
            return Target(client["netns"], WEB_VIP, 80)
        return Target(client["netns"], WEB_VIP, 80, cgroup=client["cgroup"])

    def server_pids(self) -> list[int]:
        pids = []
        for rec in self.lab.pod("web").get("procs", []):
            pids += [int(rec["pid"]), *baselines.children(int(rec["pid"]))]
        return pids

    def grow(self, n: int, progress: Progress) -> None:
        """Store services up to ``n`` (web + n-1 synthetic) and wait for every agent."""
        objs: list[dict[str, Any]] = []
        for i in range(self.stored - 1, n - 1):
            objs += [syn_service(i), syn_slice(i)]
        revision = self.lab.datastore().revision()
        for start in range(0, len(objs), 2000):
            revision = self.lab.datastore().apply(objs[start : start + 2000])
        self.stored = max(self.stored, n)
        self.lab.wait_ready(revision, timeout_s=600)
        ds = self.lab.datastore()
        try:
            if isinstance(ds, EmbeddedDatastore):
                # the pages the bulk writes could not copy while the agents read them: copied
                # now, so the one-change samples don't pay for the bulk load (a reader's
                # snapshot still open holds some back for a moment)
                deadline = time.monotonic() + SETTLE_S
                while (p := ds.checkpoint())[1] < p[0] and time.monotonic() < deadline:
                    time.sleep(0.1)
        finally:
            ds.close()
        progress(f"tabby: {self.stored:,} services stored and programmed")

    def program_from_scratch(self) -> float | None:
        """node1's agent restarted over its store: in-sync -> last NAT map write (s)."""
        node = self.lab.plan.node("node1")
        processes.stop(self.lab.agent_proc("node1"), signal.SIGTERM)
        self.lab.start_agent(node)
        self.lab.wait_ready(timeout_s=600)
        return agent_metric(node.netns, "tabby_nat_sync_from_insync_seconds")

    def change_latency_ms(self, changes: int, generation0: int) -> dict[str, list[float]]:
        """A synthetic slice (or web's own when alone) changes one endpoint, ms from the
        datastore write: ``tabby`` until node1's ``tby_nat_be`` holds the new backend under the
        service's frontend (what a new connection reads; polled from this process, which
        perturbs the agent less than HTTP polls), ``tabby-readyz`` until node1's /readyz
        reports that revision (the whole apply done)."""
        node = self.lab.plan.node("node1")
        out: dict[str, list[float]] = {"tabby": [], "tabby-readyz": []}
        self.split_before = self._split_metrics()
        ds = self.lab.datastore()  # one client for the series, as a controller keeps one open
        try:
            with NatView(pin_root(self.lab.name, "node1")) as nat:
                for k in range(changes):
                    i = max(0, (self.stored - 1) // 2)
                    gen = generation0 + k + 1
                    objs = [syn_slice(i, gen)]
                    if self.stored <= 1:
                        objs = [syn_service(i), *objs]  # N=1: not the measured service
                    new = objs[-1]["endpoints"][0]["addresses"][0]
                    vip = syn_vip(i)
                    started = time.monotonic()
                    revision = ds.apply(objs)
                    nat.wait_backend(vip, 80, f"{new}:8080")
                    out["tabby"].append((time.monotonic() - started) * 1000)
                    wait_programmed(node.netns, revision)
                    out["tabby-readyz"].append((time.monotonic() - started) * 1000)
        finally:
            ds.close()
        return out

    def _split_metrics(self) -> dict[str, float]:
        netns = self.lab.plan.node("node1").netns
        out = {}
        for name in ("tabby_dataplane_apply_seconds", "tabby_nat_sync_seconds"):
            for part in ("sum", "count"):
                out[f"{name}_{part}"] = agent_metric(netns, f"{name}_{part}") or 0.0
        return out

    def change_split_ms(self) -> dict[str, float]:
        """Mean per apply round during the last changes: the agent's whole dataplane apply and
        its NAT map writes (the rest of a change is datastore, watch and calc)."""
        after = self._split_metrics()
        out = {}
        for name, label in (
            ("tabby_dataplane_apply_seconds", "dataplane_apply"),
            ("tabby_nat_sync_seconds", "nat_apply"),
        ):
            runs = after[f"{name}_count"] - self.split_before[f"{name}_count"]
            total = after[f"{name}_sum"] - self.split_before[f"{name}_sum"]
            if runs > 0:
                out[label] = total / runs * 1000
        return out

    def agent_rss_mb(self) -> float | None:
        return rss_mb(int(self.lab.agent_proc("node1")["pid"]))

    def down(self) -> None:
        for rec in self.extra_procs:
            processes.stop(rec)
        Lab.down(self.lab.name, progress=lambda _m: None)


# ---------------------------------------------------------------------- the run


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (make, CI) unwinds like Ctrl-C, so the run's finally removes what it made."""

    def raise_interrupt(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), "")
    except OSError:
        pass
    versions = {}
    for tool, argv in (
        ("iptables", ["iptables-legacy", "--version"]),
        ("nft", ["nft", "--version"]),
        ("iperf3", ["iperf3", "--version"]),
    ):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=5)
            versions[tool] = (done.stdout or done.stderr).splitlines()[0].strip()
        except (OSError, IndexError, subprocess.TimeoutExpired):
            versions[tool] = "missing"
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": os.uname().release,
        "tools": versions,
        "shared": "other work may run on this machine during the bench: figures are noisy",
    }


class Runner:
    def __init__(self, config: BenchConfig, progress: Progress) -> None:
        self.cfg = config
        self.progress = progress
        self.kernel: Baselines | None = None
        self.tabby: TabbySide | None = None
        self.kube_services: list[KubeServicePort] = []
        self.generation = 0
        self.dropped: dict[str, str] = {}  # kernel path -> why it is no longer measured
        # (N, path) -> each profile cell's (BPF ns per connection, per program figures)
        self.profiles: dict[tuple[int, str], list[tuple[float, dict[str, list[float]]]]] = {}

    @property
    def paths(self) -> list[str]:
        """The paths still measured (a layout whose loading failed is dropped, not the run)."""
        return [p for p in self.cfg.paths if p not in self.dropped]

    def run(self) -> BenchResult:
        cfg = self.cfg
        cfg.check()
        result = BenchResult(
            config=asdict(cfg),
            machine=machine(),
            started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        t0 = time.monotonic()
        prefix = f"{cfg.name}k"
        with sigterm_unwinds():
            Lab.down(cfg.name, progress=lambda _m: None)  # a leftover of an interrupted run
            baselines.down(prefix)
            try:
                kernel_paths = [p for p in cfg.paths if PATH_FAMILY[p] == "kernel"]
                if kernel_paths:
                    self.progress(f"baselines: {', '.join(kernel_paths)} ({prefix}-*)")
                    self.kernel = Baselines.up(prefix, kernel_paths)
                    self._start_kernel_iperf()
                if any(PATH_FAMILY[p] != "kernel" for p in cfg.paths):
                    self.tabby = TabbySide.up(cfg.name, self.progress, cfg.paths)
                for n in cfg.sizes:
                    size = self._program(n)
                    ends = n in (cfg.sizes[0], cfg.sizes[-1])
                    for rep in range(cfg.reps):
                        iperf = ends  # every repetition: a throughput ratio per repetition
                        result.cells += self._repetition(n, rep, size, iperf)
                    self._once_per_size(size)
                    result.sizes.append(size)
            except (BenchError, baselines.BaselineError, subprocess.TimeoutExpired) as e:
                result.error = str(e)
                self.progress(f"stopped early: {e}")
            except KeyboardInterrupt:
                # the sizes completed so far are kept; the caller writes them out
                result.error = "interrupted (Ctrl-C or SIGTERM): the sizes completed are kept"
                self.progress("interrupted")
            finally:
                self.progress("cleaning up")
                if self.tabby is not None:
                    self.tabby.down()
                else:
                    Lab.down(cfg.name, progress=lambda _m: None)
                baselines.down(prefix)
        result.duration_s = time.monotonic() - t0
        return result

    def _start_kernel_iperf(self) -> None:
        assert self.kernel is not None
        k = self.kernel
        log = os.path.join(k.work, "iperf3.log")
        argv = ["taskset", "-c", "1", "iperf3", "-s", "-p", str(IPERF_PORT)]
        rec = processes.spawn(argv, "bench iperf3", log, netns=k.backend_netns)
        # recorded with nginx: baselines.down stops both by pid
        procs_file = os.path.join(k.work, "procs.json")
        with open(procs_file) as f:
            recs = json.load(f)
        with open(procs_file, "w") as f:
            json.dump([*recs, rec], f)

    def _kube_services(self, n: int) -> list[KubeServicePort]:
        """n services; the last (measured) one also has the iperf3 port, as its last rule."""
        svcs = baselines.kube_services(n, ENDPOINTS)
        last = svcs[-1]
        iperf = KubeServicePort(
            namespace=last.namespace,
            name=last.name,
            cluster_ip=last.cluster_ip,
            port=IPERF_PORT,
            port_name="iperf",
            endpoints=tuple((ip, IPERF_PORT) for ip, _ in last.endpoints),
        )
        return [*svcs, iperf]

    def _program(self, n: int) -> SizeResult:
        size = SizeResult(services=n)
        if self.kernel is not None:
            self.kube_services = self._kube_services(n)
            for path in self.kernel.plans:
                if path in self.dropped:
                    size.program_notes[path] = self.dropped[path]
                    continue
                try:
                    done = self.kernel.program(path, self.kube_services)
                except (baselines.BaselineError, subprocess.TimeoutExpired) as e:
                    if path == "plain":
                        raise
                    self.dropped[path] = f"dropped from N={n:,} on: loading failed: {e}"
                    size.program_notes[path] = self.dropped[path]
                    size.program_s[path] = None
                    self.progress(f"N={n:,} {path}: {self.dropped[path]}")
                    continue
                if path != "plain":
                    size.program_s[path] = done.seconds
                    if done.note:
                        size.program_notes[path] = done.note
                    shown = "-" if done.seconds is None else f"{done.seconds:.2f} s"
                    self.progress(f"N={n:,} {path}: programmed in {shown} {done.note}")
        if self.tabby is not None:
            self.tabby.grow(n, self.progress)
            took = self.tabby.program_from_scratch()
            size.program_s["tabby"] = took
            size.program_notes["tabby"] = "agent restart: in-sync -> last NAT map write"
            self.progress(f"N={n:,} tabby: programmed in {took} s (agent restart)")
        return size

    def _target(self, path: str) -> Target:
        if PATH_FAMILY[path] == "kernel":
            assert self.kernel is not None
            measured = self.kube_services[:-1]  # the http port list
            ip, port = self.kernel.target(path, measured)
            return Target(self.kernel.plans[path].client_netns, ip, port)
        assert self.tabby is not None
        return self.tabby.target(path)

    def _prepare(self, path: str) -> None:
        if PATH_FAMILY[path] == "kernel":
            assert self.kernel is not None
            self.kernel.prepare_run(path)
        else:
            assert self.tabby is not None
            mode = PATH_REDIRECT.get(path, self.cfg.redirect)
            self.tabby.set_redirect(mode, self.cfg.ext_settle_s)
            if path in EXT_MODES:
                self.tabby.set_ext_mode(EXT_MODES[path], self.cfg.ext_settle_s)

    def _server_pids(self, path: str) -> list[int]:
        if PATH_FAMILY[path] == "kernel":
            assert self.kernel is not None
            return self.kernel.server_pids()
        assert self.tabby is not None
        return self.tabby.server_pids()

    def _paths_at(self, n: int) -> list[str]:
        """The paths measured at N: the ends-only families at the first and the last N."""
        ends = n in (self.cfg.sizes[0], self.cfg.sizes[-1])
        return [p for p in self.paths if ends or PATH_FAMILY[p] not in ENDS_ONLY_FAMILIES]

    def _smoke(self, n: int, path: str) -> None:
        """The path answers before it is measured at N (a broken path stops the run)."""
        self._prepare(path)
        t = self._target(path)
        out = run_connload(
            self.cfg.connload, t.netns, t.ip, t.port, 2.0, 1, t.cgroup, t.source, SMOKE_CONNS
        )
        if out["conns"] < SMOKE_CONNS or any(v for k, v in out.items() if k.startswith("err_")):
            raise BenchError(f"N={n}: {path} does not answer at {t.ip}:{t.port}: {out}")

    @staticmethod
    def _needs(path: str) -> tuple[str | None, str | None]:
        """The live settings a path's cells switch to: (bpfRedirectToPeer,
        bpfExternalServiceMode); None: the run's own (every other path)."""
        return PATH_REDIRECT.get(path), EXT_MODES.get(path)

    def _repetition(self, n: int, rep: int, size: SizeResult, iperf: bool) -> list[Cell]:
        """Every path's rate and latency cells, the order rotated by ``rep`` (then arranged
        for the fewest live switches), each tabby path's profile cell after them; the first
        repetition checks each path answers first; ``iperf``: each path's iperf3 stream right
        after its cells, into ``size``."""
        paths = self._paths_at(n)
        k = rep % len(paths)
        now = (self.tabby.redirect, self.tabby.ext_mode) if self.tabby else (None, None)
        order = fewest_switches(paths[k:] + paths[:k], self._needs, now)
        cells = []
        for path in order:
            if rep == 0:
                self._smoke(n, path)
            for kind in ("rate", "latency"):
                cells.append(self._cell(n, rep, path, kind))
                c = cells[-1]
                self.progress(
                    f"N={n:>6,} rep {rep} {path:15s} {kind:7s} {c.rate:9,.0f} conn/s "
                    f"p50 {c.p50_us} us p99 {c.p99_us} us err {c.errors} "
                    f"cpu {'/'.join(f'{x:.0f}' for x in c.cpu_busy_pct)}% "
                    f"{c.cpu_us_per_conn:.0f} cpu-us/conn"
                )
            if PATH_FAMILY[path] != "kernel" and self.cfg.profile_seconds > 0:
                self._bpf_profile(size, path)
            if iperf:
                self._iperf(size, path)
        return cells

    def _cell(self, n: int, rep: int, path: str, kind: str) -> Cell:
        cfg = self.cfg
        self._prepare(path)
        t = self._target(path)
        seconds, inflight = (
            (cfg.seconds, cfg.inflight) if kind == "rate" else (cfg.latency_seconds, 1)
        )
        servers = self._server_pids(path)
        srv0, gen0, cpu0 = proc_cpu_s(servers), children_cpu_s(), cpu_times()
        out = run_connload(
            cfg.connload, t.netns, t.ip, t.port, seconds, inflight, t.cgroup, t.source
        )
        cpu1, gen1, srv1 = cpu_times(), children_cpu_s(), proc_cpu_s(servers)
        hz = os.sysconf("SC_CLK_TCK")
        busy_s = sum(b1 - b0 for (b0, _), (b1, _) in zip(cpu0, cpu1, strict=True)) / hz
        busy_pct = [
            round(100.0 * (b1 - b0) / max(1, t1 - t0), 1)
            for (b0, t0), (b1, t1) in zip(cpu0, cpu1, strict=True)
        ]
        conns = max(1, int(out["conns"]))
        own = (gen1 - gen0) + (srv1 - srv0)
        return Cell(
            services=n,
            rep=rep,
            path=path,
            kind=kind,
            rate=out["rate"],
            conns=int(out["conns"]),
            p01_us=int(out.get("p01_us", 0)),
            p50_us=int(out["p50_us"]),
            p90_us=int(out["p90_us"]),
            p99_us=int(out["p99_us"]),
            errors=int(sum(v for k, v in out.items() if k.startswith("err_"))),
            cpu_busy_pct=busy_pct,
            cpu_us_per_conn=busy_s * 1e6 / conns,
            net_cpu_us_per_conn=max(0.0, busy_s - own) * 1e6 / conns,
        )

    def _once_per_size(self, size: SizeResult) -> None:
        cfg = self.cfg
        if self.tabby is not None:
            size.change_ms.update(self.tabby.change_latency_ms(cfg.changes, self.generation))
            size.change_split_ms = self.tabby.change_split_ms()
            self.generation += cfg.changes
            size.agent_rss_mb = self.tabby.agent_rss_mb()
            median = statistics.median(size.change_ms["tabby"])
            split = ", ".join(f"{k} {v:.1f} ms" for k, v in size.change_split_ms.items())
            self.progress(
                f"N={size.services:,} tabby: one change {median:.1f} ms median ({split}), "
                f"agent RSS {size.agent_rss_mb} MB"
            )
        if self.kernel is not None:
            self._kube_changes(size, min(cfg.changes, KUBE_CHANGES))

    def _bpf_profile(self, size: SizeResult, path: str) -> None:
        """A rate cell with BPF run-time stats on: the lab's programs' time per connection."""
        assert self.tabby is not None
        self._prepare(path)
        t = self._target(path)
        roots = [pin_root(self.cfg.name, node.name) for node in self.tabby.lab.plan.nodes]
        ids = progstats.pinned_program_ids(roots)
        with progstats.RunTimeStats():
            before = progstats.sample(ids)
            out = run_connload(
                self.cfg.connload,
                t.netns,
                t.ip,
                t.port,
                self.cfg.profile_seconds,
                self.cfg.inflight,
                t.cgroup,
                t.source,
            )
            after = progstats.sample(ids)
        conns = max(1.0, out["conns"])
        runs = progstats.delta_by_name(before, after)
        ns = sum(r.run_time_ns for r in runs.values()) / conns
        progs = {
            name: [r.run_time_ns / r.run_cnt, r.run_cnt / conns] for name, r in sorted(runs.items())
        }
        reps = self.profiles.setdefault((size.services, path), [])
        reps.append((ns, progs))
        size.bpf_ns_reps[path] = [r for r, _ in reps]
        median = statistics.median(size.bpf_ns_reps[path])
        size.bpf_ns_per_conn[path] = median
        size.bpf_progs[path] = min(reps, key=lambda r: abs(r[0] - median))[1]
        self.progress(
            f"N={size.services:,} {path}: BPF {ns:,.0f} ns/conn "
            + " ".join(f"{k} {v[0]:.0f}ns x{v[1]:.1f}" for k, v in progs.items())
        )

    def _iperf(self, size: SizeResult, path: str) -> None:
        """One iperf3 stream on ``path`` (its live settings as for its cells), added to the
        size's repetitions of that path."""
        self._prepare(path)
        t = self._target(path)
        ip = self.kube_services[-1].endpoints[0][0] if path == "plain" else t.ip
        gbps = run_iperf(
            t.netns, ip, self.cfg.iperf_seconds, t.cgroup, t.iperf_port, t.source, t.iperf_reverse
        )
        reps = size.iperf_reps.setdefault(path, [])
        reps.append(gbps)
        size.iperf_gbps[path] = statistics.median(reps)
        self.progress(f"N={size.services:,} {path}: iperf3 {gbps:.1f} Gbit/s")

    def _kube_changes(self, size: SizeResult, changes: int) -> None:
        """One endpoint of the middle service replaced, ``changes`` times, through each
        layout's partial sync (the transaction timed); then the new endpoint must answer."""
        assert self.kernel is not None
        paths = [p for p in self.kernel.plans if p != "plain" and p not in self.dropped]
        new = self.kube_services[0]
        for _ in range(changes):
            self.generation += 1
            svcs = self.kube_services
            idx = (len(svcs) - 2) // 2  # the last entry is the measured service's iperf port
            old = svcs[idx]
            new_ip = str(ipaddress.IPv4Address(CHANGE_IP_BASE + self.generation % 250))
            new = replace(old, endpoints=((new_ip, old.endpoints[0][1]), *old.endpoints[1:]))
            after = [*svcs[:idx], new, *svcs[idx + 1 :]]
            for path in paths:
                if sum(size.change_ms.get(path, [])) > KUBE_CHANGE_BUDGET_MS:
                    continue  # one slow sample is enough (iptables-nft --noflush at 5,000)
                try:
                    took = self.kernel.change_one(path, after, old, new)
                except (baselines.BaselineError, subprocess.TimeoutExpired) as e:
                    size.change_notes[path] = f"failed: {e}"
                    continue
                if took is None:
                    size.change_notes[path] = (
                        f"not measured above {baselines.IPT_NFT_NOFLUSH_MAX:,} services "
                        "(--noflush is quadratic)"
                    )
                else:
                    size.change_ms.setdefault(path, []).append(took * 1000)
            self.kube_services = after
        for path in paths:
            if path in size.change_ms and path not in size.change_notes:
                size.change_notes[path] = (
                    "the partial sync's restore / nft transaction only (kube-proxy adds its "
                    "own work and a 1 s min-sync-period)"
                )
                self._check_endpoint(path, new.cluster_ip, new.port, new.endpoints[0][0])

    def _check_endpoint(self, path: str, vip: str, port: int, want: str) -> None:
        """After a change, connections to ``vip`` reach the new endpoint (checked, not timed)."""
        assert self.kernel is not None
        netns = self.kernel.prepare_run(path)
        seen = set()
        for _ in range(60):
            seen.add(traffic.http_get(netns, vip, port, "/").split()[1])
            if want in seen:
                return
        raise BenchError(f"{path}: after the change {vip} never reached {want} (saw {seen})")


def default_connload() -> str:
    """$TABBY_CONNLOAD, else build/bench/connload of the source tree this module lives in."""
    env = os.environ.get("TABBY_CONNLOAD")
    if env:
        return env
    return str(Path(__file__).resolve().parents[3] / "build" / "bench" / "connload")

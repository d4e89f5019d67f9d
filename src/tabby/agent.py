"""The agent: datastore -> calc -> dataplane for one node, like Felix.

Threads and namespaces: the main thread and the watch thread stay in the root namespace and are
the only ones that talk to the datastore. One dedicated worker thread enters the node's network
namespace, loads and attaches the BPF programs, applies every desired state and serves /healthz,
/readyz and /metrics on the node's loopback. Nothing is programmed before the first full list
(in-sync); what is pinned is adopted, never flushed.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import queue
import random
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from tabby import preflight
from tabby.calc import bird, names
from tabby.calc.intake import kept
from tabby.calc.nodestate import NodeState, compute, with_services
from tabby.calc.services import ServiceIndex
from tabby.cni.ipam import BlockIPAM, IPAMError
from tabby.dataplane.conntrack import GcStats
from tabby.dataplane.node import NodeDataplane
from tabby.datastore import open_datastore
from tabby.datastore.api import (
    Compacted,
    Datastore,
    DatastoreError,
    Event,
    StreamingList,
    WatchHealth,
)
from tabby.datastore.typha import consistent
from tabby.netlink import links
from tabby.netlink.netns import setns_path

log = logging.getLogger("tabby.agent")
KINDS = (
    "Node",
    "Pod",
    "IPPool",
    "IPAMBlock",
    "FelixConfiguration",
    "Namespace",
    "Service",
    "EndpointSlice",
    "NetworkPolicy",
    "BGPConfiguration",
    "BGPPeer",
)
SERVICE_KINDS = ("Service", "EndpointSlice")  # calc.services' inputs; compute() reads the rest
RETRY_S = 1.0
# an apply error that stays the same is logged when it appears, then this often (it is on
# /readyz all along): a refused bpfMapSize* retried every RETRY_S must not flood the log
ERROR_LOG_REPEAT_S = 60.0
PREPARE = -1  # the revision of a dataplane worker's inbox item that only loads the datapath
# Every manager re-checks what it programmed this often even if its input did not change
# (Felix's routeRefreshInterval is 90 s): repairs what something else changed under us.
RESYNC_S = 90.0
DATASTORE_BACKOFF_S = (0.5, 10.0)  # first and longest wait between datastore attempts
WATCH_HEALTH_S = 1.0  # how often a quiet watch is asked whether its stream is up
BGP_SYNC_S = 1.0  # learnt routes -> the route map (a withdrawal shows within this)
CT_SWEEP_S = 10.0  # conntrack GC period; also right after backends left a service
# Python's cyclic GC runs when the watch is quiet, not in a change's path (Agent.run): young
# objects to collect at the least (the interpreter's own gen0 threshold), and at the most even
# while events keep coming
GC_YOUNG = 700
GC_YOUNG_MAX = 100_000
DEFAULT_HEALTH_PORT = 9099


@dataclass
class Status:
    """What /readyz reports; written by the worker, read by the HTTP threads."""

    node: str
    synced: bool = False
    programmed_revision: int = 0
    seen_revision: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    datastore_problem: str | None = None  # set by the main thread while the datastore is away
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "node": self.node,
                "ready": self.synced and not self.errors and self.datastore_problem is None,
                "datastore": self.datastore_problem or "ok",
                "revision": self.programmed_revision,
                "seen_revision": self.seen_revision,
                "errors": list(self.errors),
                "warnings": list(self.warnings),
            }


class Metrics:
    def __init__(self, status: Status) -> None:
        self.registry = CollectorRegistry()
        self.revision = Gauge(
            "tabby_programmed_revision",
            "Datastore revision the dataplane has programmed",
            registry=self.registry,
        )
        self.apply_s = Histogram(
            "tabby_dataplane_apply_seconds",
            "Time to apply one desired state",
            registry=self.registry,
        )
        self.apply_errors = Counter(
            "tabby_dataplane_apply_errors", "Apply rounds that left errors", registry=self.registry
        )
        # Service NAT (kube-proxy's sync_proxy_rules_* and network_programming_* counterparts).
        self.services = Gauge(
            "tabby_services", "Service frontends programmed (tby_nat_fe)", registry=self.registry
        )
        self.service_backends = Gauge(
            "tabby_service_backends",
            "Service backends programmed (tby_nat_be)",
            registry=self.registry,
        )
        self.nat_sync_s = Histogram(
            "tabby_nat_sync_seconds", "Time of one service NAT apply", registry=self.registry
        )
        self.nat_sync_from_insync_s = Gauge(
            "tabby_nat_sync_from_insync_seconds",
            "From the datastore's first in-sync to the first complete service NAT programming",
            registry=self.registry,
        )
        self.start_to_insync_s = Gauge(
            "tabby_start_to_insync_seconds",
            "From the agent process's start (exec) to the datastore's first in-sync: imports, "
            "the datastore connection and the first full list",
            registry=self.registry,
        )
        self._in_sync_at: float | None = None  # time.monotonic() of the first in-sync
        self._nat_first_done = False
        # Conntrack GC (bpf/ct_gc.c): one observation per sweep.
        self.ct_entries = Gauge(
            "tabby_conntrack_entries",
            "Conntrack entries (halves of NAT pairs) the last sweep left in tby_ct",
            registry=self.registry,
        )
        self.ct_cleaned = Counter(
            "tabby_conntrack_cleaned",
            "Conntrack entries deleted by the sweep, by reason",
            ["reason"],
            registry=self.registry,
        )
        for reason in ("expired", "stale_udp"):
            self.ct_cleaned.labels(reason)
        self.ct_sweep_s = Histogram(
            "tabby_conntrack_sweep_seconds",
            "Wall time of one conntrack sweep",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.datastore_up = Gauge(
            "tabby_datastore_connected",
            "1 while the datastore (or its watch) is reachable; 0 while the agent retries",
            registry=self.registry,
        )
        self.datastore_retries = Counter(
            "tabby_datastore_retries", "Datastore attempts that failed", registry=self.registry
        )
        # NetworkPolicy (dataplane/policy.py)
        self.policy_endpoints = Gauge(
            "tabby_policy_endpoints",
            "Local pods some NetworkPolicy isolates (tby_pol_ep entries)",
            registry=self.registry,
        )
        self.policy_writes = Counter(
            "tabby_policy_map_writes",
            "Policy map entries written or deleted (a changed pod is rewritten under a new set)",
            registry=self.registry,
        )
        self.read_packets: Callable[[], dict[str, int]] = dict
        self.registry.register(_PacketCollector(self))

    def observe_ct_sweep(self, stats: GcStats) -> None:
        self.ct_entries.set(stats.kept)
        self.ct_cleaned.labels("expired").inc(stats.expired)
        self.ct_cleaned.labels("stale_udp").inc(stats.stale_udp)
        self.ct_sweep_s.observe(stats.wall_s)

    def mark_in_sync(self) -> None:
        """The datastore's first full list is in: starts tabby_nat_sync_from_insync_seconds."""
        if self._in_sync_at is None:
            self._in_sync_at = time.monotonic()
            self.start_to_insync_s.set(process_age_s())

    def observe_nat(
        self,
        frontends: int,
        backends: int,
        seconds: float,
        complete: bool = True,
        finished_at: float | None = None,
    ) -> None:
        """One NAT apply took ``seconds`` and left ``frontends``/``backends`` in the maps.

        ``complete``: it left no errors; the first complete one after in-sync sets
        tabby_nat_sync_from_insync_seconds (once per agent process).
        """
        self.services.set(frontends)
        self.service_backends.set(backends)
        self.nat_sync_s.observe(seconds)
        if complete and not self._nat_first_done and self._in_sync_at is not None:
            self._nat_first_done = True
            done = time.monotonic() if finished_at is None else finished_at
            self.nat_sync_from_insync_s.set(done - self._in_sync_at)


class _PacketCollector:
    """Reads the per-CPU reason counters at scrape time (map fds work from any thread)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Any:
        fam = CounterMetricFamily(
            "tabby_bpf_packets", "Packets counted by the BPF programs, by reason", labels=["reason"]
        )
        for reason, value in sorted(self.metrics.read_packets().items()):
            fam.add_metric([reason], value)
        yield fam


class ApplyErrorLog:
    """Logs an apply's errors when they change, then every ``repeat_s`` while they stay, and
    once when they clear. The worker retries every RETRY_S; its log says so without a line each
    time."""

    def __init__(
        self, repeat_s: float = ERROR_LOG_REPEAT_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.repeat_s, self.clock = repeat_s, clock
        self.errors: tuple[str, ...] = ()
        self.retries = 0
        self.logged_at = 0.0

    def failed(self, errors: Sequence[str]) -> None:
        now = self.clock()
        if tuple(errors) != self.errors:
            self.errors, self.retries, self.logged_at = tuple(errors), 0, now
            log.warning(
                "apply left %d errors (retrying every %.0f s): %s",
                len(errors), RETRY_S, "; ".join(errors),
            )  # fmt: skip
            return
        self.retries += 1
        if now - self.logged_at >= self.repeat_s:
            self.logged_at = now
            log.warning(
                "apply still left %d errors after %d retries: %s",
                len(errors), self.retries, "; ".join(errors),
            )  # fmt: skip

    def succeeded(self) -> None:
        if self.errors:
            log.info("apply: the errors are gone after %d retries", self.retries)
        self.errors, self.retries = (), 0


class DataplaneWorker(threading.Thread):
    """The one thread inside the node's namespace; it coalesces, applying only the newest state."""

    def __init__(
        self,
        node: str,
        netns: str | None,
        pin_root: str,
        data_iface: str | None,
        port: int,
        status: Status,
        metrics: Metrics,
        cgroup: str | None = None,
        bird_dir: str | None = None,
    ) -> None:
        super().__init__(name="dataplane", daemon=True)
        self.bird_dir = bird_dir  # the BIRD backend's directory; None: no BGP
        self.next_bgp_sync = 0.0
        self.node, self.netns, self.pin_root = node, netns, pin_root
        self.cgroup = cgroup  # the node's cgroup v2 group (connect-time LB); None: CTLB off
        self.data_iface, self.port = data_iface, port
        self.status, self.metrics = status, metrics
        self.inbox: queue.Queue[tuple[NodeState, int]] = queue.Queue()
        self.started_ok = threading.Event()
        self.failed: BaseException | None = None
        self.stopping = threading.Event()
        self.dataplane: NodeDataplane | None = None
        self.next_sweep = 0.0  # time.monotonic() of the next periodic conntrack sweep
        self.swept_after: object = None  # the NAT apply result the last sweep followed
        self.applied: tuple[NodeState, int] | None = None  # the last state applied without error
        self.next_resync = 0.0  # time.monotonic() of the next full re-check (RESYNC_S)
        self.error_log = ApplyErrorLog()
        # set by the first apply: a datapath loaded ahead (prepare) gets no route sync or
        # conntrack sweep before a state has been applied to it
        self.apply_tried = False

    def submit(self, state: NodeState, revision: int) -> None:
        self.inbox.put((state, revision))

    def prepare(self, base: NodeState) -> None:
        """Load the datapath for ``base`` (its services need not be computed yet) while the
        caller computes them: at a start over 20,000 services the programs' load (the kernel's
        verifier, no GIL held) runs beside the services' calc instead of after it."""
        self.inbox.put((base, PREPARE))

    def run(self) -> None:
        try:
            if self.netns:
                setns_path(self.netns)  # this thread only, for good
            self._serve_http()
            self.started_ok.set()
            self._loop()
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            self.failed = e
            self.started_ok.set()
            log.exception("dataplane worker failed")

    def _serve_http(self) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self.status, self.metrics))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="http", daemon=True).start()

    def _loop(self) -> None:
        pending: tuple[NodeState, int] | None = None
        while not self.stopping.is_set():
            timeout = RETRY_S if pending else self._until_sweep()
            try:
                pending = self._take(pending, self.inbox.get(timeout=timeout))
                while True:  # coalesce a burst into its newest state
                    pending = self._take(pending, self.inbox.get_nowait())
            except queue.Empty:
                pass
            if pending is not None:
                state, revision = pending
                if self._apply(state, revision):
                    pending = None
                    self.applied = (state, revision)
            elif self.applied is not None and time.monotonic() >= self.next_resync:
                if not self._apply(*self.applied, full=True):
                    pending = self.applied  # what it found broken is retried every RETRY_S
            self._sync_bgp()
            self._sweep_conntrack()

    def _take(
        self, pending: tuple[NodeState, int] | None, item: tuple[NodeState, int]
    ) -> tuple[NodeState, int] | None:
        if item[1] != PREPARE:
            return _newer(pending, item)
        if self.dataplane is None:
            try:
                self._open_dataplane(item[0])
            except Exception:  # noqa: BLE001 - the first apply tries again and reports it
                log.warning("loading the datapath ahead of the first apply failed", exc_info=True)
        return pending

    def _open_dataplane(self, state: NodeState) -> NodeDataplane:
        with links.rtnl() as ipr:
            iface = self.data_iface or links.default_route_device(ipr) or "eth0"
        dp = NodeDataplane(self.pin_root, iface, state, self.cgroup, self.bird_dir)
        self.dataplane = dp
        self.metrics.read_packets = dp.counters.read
        self.next_resync = time.monotonic() + RESYNC_S
        return dp

    def _until_sweep(self) -> float | None:
        """Seconds to wait for a state before the next sweep (or BGP route sync) is due; None:
        nothing applied yet."""
        if self.dataplane is None or not self.apply_tried:
            return None
        due = self.next_sweep
        if self.applied is not None:
            due = min(due, self.next_resync)
        if self.bird_dir:
            due = min(due, self.next_bgp_sync)
        return max(0.0, due - time.monotonic())

    def _sync_bgp(self) -> None:
        """Learnt routes change without a datastore event: mirror them every BGP_SYNC_S."""
        dp = self.dataplane
        if dp is None or not self.apply_tried or dp.bird is None:
            return
        if time.monotonic() < self.next_bgp_sync:
            return
        self.next_bgp_sync = time.monotonic() + BGP_SYNC_S
        try:
            errors = dp.sync_learned_routes()
        except Exception as e:  # noqa: BLE001 - retried on the next period
            errors = [f"BGP route sync: {e}"]
        if errors:
            log.warning("BGP route sync: %s", "; ".join(errors))

    def _sweep_conntrack(self) -> None:
        """Every CT_SWEEP_S, and at once after an apply that took backends out of a service's
        UDP port (its UDP flows must move on; TCP flows to a removed backend finish). On this
        thread only: never in the middle of an apply."""
        dp = self.dataplane
        if dp is None or not self.apply_tried:
            return
        nat = dp.last_nat
        after_removal = nat.udp_backends_removed and nat is not self.swept_after
        if not after_removal and time.monotonic() < self.next_sweep:
            return
        self.swept_after = nat
        self.next_sweep = time.monotonic() + CT_SWEEP_S
        try:
            stats = dp.sweep_conntrack()
        except Exception:  # noqa: BLE001 - the next period retries; packets do not depend on it
            log.exception("conntrack sweep failed")
            return
        self.metrics.observe_ct_sweep(stats)
        if stats.deleted:
            log.info(
                "conntrack sweep: %d entries kept, %d expired, %d stale udp (%.1f ms)",
                stats.kept, stats.expired, stats.stale_udp, stats.wall_s * 1e3,
            )  # fmt: skip

    def _apply(self, state: NodeState, revision: int, full: bool = False) -> bool:
        """``full``: every manager re-checks its part even if its input did not change."""
        started = time.monotonic()
        self.apply_tried = True
        if full:
            self.next_resync = started + RESYNC_S
        try:
            dataplane = self.dataplane or self._open_dataplane(state)
            result = dataplane.apply(state, full=full)
            errors, warnings = result.errors, result.warnings
            nat = dataplane.last_nat
            self.metrics.observe_nat(
                nat.frontends, nat.backends, nat.seconds, not nat.errors, nat.finished_at
            )
            self.metrics.policy_endpoints.set(len(dataplane.policy.programmed))
            self.metrics.policy_writes.inc(dataplane.last_policy.writes)
        except Exception as e:  # noqa: BLE001 - any failure is retried, and reported on /readyz
            log.exception("apply failed")
            errors, warnings = [f"apply: {e}"], []
        self.metrics.apply_s.observe(time.monotonic() - started)
        with self.status.lock:
            # logged when they change, not on every apply (they stay on /readyz)
            seen = set(self.status.warnings)
            for w in warnings:
                if w not in seen:
                    log.warning("%s", w)
            self.status.errors, self.status.warnings = errors, warnings
            if not errors:
                self.status.synced = True
                self.status.programmed_revision = revision
        if errors:
            self.metrics.apply_errors.inc()
            self.error_log.failed(errors)
            return False
        self.error_log.succeeded()
        self.metrics.revision.set(revision)
        return True


def _handler(status: Status, metrics: Metrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            snap = status.snapshot()
            if self.path == "/healthz":
                self._send(200, b"ok\n", "text/plain")
            elif self.path == "/readyz":
                code = 200 if snap["ready"] else 503
                self._send(code, json.dumps(snap).encode(), "application/json")
            elif self.path == "/metrics":
                self._send(200, generate_latest(metrics.registry), "text/plain; version=0.0.4")
            else:
                self._send(404, b"not found\n", "text/plain")

    return Handler


class Agent:
    def __init__(
        self,
        node: str,
        datastore_url: str,
        netns: str | None,
        pin_root: str,
        data_iface: str | None = None,
        port: int = DEFAULT_HEALTH_PORT,
        cgroup: str | None = None,
        bird_dir: str | None = None,
    ) -> None:
        self.node, self.url = node, datastore_url
        self.bgp = bird_dir is not None  # Calico's BIRD backend: BGP routes plain pools
        self.status = Status(node)
        self.metrics = Metrics(self.status)
        self.worker = DataplaneWorker(
            node, netns, pin_root, data_iface, port, self.status, self.metrics, cgroup, bird_dir
        )
        self.stop = threading.Event()
        self.resources: dict[str, dict[tuple[str, str], dict[str, Any]]] = defaultdict(dict)
        self.services = ServiceIndex(node)  # incremental: one change recomputes one service
        # compute()'s last result: reused while only Services and EndpointSlices change
        self.base: NodeState | None = None
        self.prepared = False  # the worker was asked to load the datapath ahead

    def run(self) -> None:
        preflight.require()
        # No automatic collections: at 20,000 services a young collection walks the states'
        # service dicts (20,000 entries each), 10-30 ms that landed in whichever change
        # triggered it; the agent collects when its watch is quiet instead (_collect_garbage).
        gc.disable()
        self.worker.start()
        self.worker.started_ok.wait()
        if self.worker.failed:
            raise RuntimeError(f"dataplane worker failed to start: {self.worker.failed}")
        wait_s = DATASTORE_BACKOFF_S[0]
        while not self.stop.is_set():
            ds: Datastore | None = None
            try:
                ds = open_datastore(self.url)
                self._ensure_tunnel_address(ds)
                revision = self._relist(ds)
                wait_s = DATASTORE_BACKOFF_S[0]  # back: a full resync is done
                self._set_datastore_problem(None)
                self._watch(ds, revision)
            except Compacted:
                log.info("watch history compacted: relisting")
            except (DatastoreError, IPAMError) as e:
                # Not ready until a relist succeeds; the dataplane keeps serving what it has.
                self._set_datastore_problem(str(e))
                self.metrics.datastore_retries.inc()
                delay = random.uniform(wait_s / 2, wait_s)  # jittered: agents do not stampede
                log.warning(
                    "datastore: %s (retrying in %.1f s; the dataplane keeps what it has)", e, delay
                )
                _collect_garbage()
                self.stop.wait(delay)
                wait_s = min(wait_s * 2, DATASTORE_BACKOFF_S[1])
            finally:
                if ds is not None:  # a fan-out client holds a connection and a thread
                    ds.close()

    def _set_datastore_problem(self, problem: str | None) -> None:
        with self.status.lock:
            changed = self.status.datastore_problem != problem
            self.status.datastore_problem = problem
        self.metrics.datastore_up.set(0 if problem else 1)
        if changed and problem:
            log.warning("not ready: %s", problem)
        elif changed:
            log.info("datastore reachable again: ready")

    def _ensure_tunnel_address(self, ds: Datastore) -> None:
        """Claim this node's VXLAN device address from IPAM, as calico-node does at start-up."""
        pools, _ = ds.list("IPPool")
        if any(p["spec"].get("vxlanMode", "Never") != "Never" for p in pools):
            # IPAM's compare-and-swap reads the real store, not a fan-out's replica
            ip = BlockIPAM(consistent(ds)).assign(self.node, names.tunnel_handle(self.node))
            log.info("tunnel address %s", ip)

    def _relist(self, ds: Datastore) -> int:
        fresh: dict[str, dict[tuple[str, str], dict[str, Any]]] = defaultdict(dict)
        services = ServiceIndex(self.node)
        revision = ds.revision()
        for kind in KINDS:
            if kind not in SERVICE_KINDS:
                items, _ = ds.list(kind)
                for obj in items:
                    fresh[kind][_key(obj)] = kept(kind, obj)  # Pods, Nodes: what calc reads
        self.resources = fresh
        self.services = services
        self.base = None
        # The base state (everything but services) first: the worker loads the datapath (the
        # verifier, no GIL) while the services are listed and computed.
        base = self._base()
        services.set_node_ip(base.node_ip, base.node_ip6)
        # The cluster's objects live as long as the agent: move them out of the cyclic GC's
        # sight before calc allocates, or every collection walks them (a third of the time to
        # program 20,000 services, measured by bench/services_scale.py).
        gc.unfreeze()  # what an earlier relist froze may be garbage now
        gc.collect()
        gc.freeze()
        # Every service is computed now: ~a million objects that all live on, and nothing
        # cyclic to free (unpacked objects go by reference counting), so collections would
        # only walk them: 15-20% of the calc's CPU time at 20,000 services.
        collecting = gc.isenabled()
        gc.disable()
        try:
            # Held by the index only, packed, streamed when possible; the slices before the
            # Services, so each Service is computed as it is listed (its slices are in): the
            # calc overlaps the list instead of following the in-sync.
            for kind in ("EndpointSlice", "Service"):
                stream = ds.iter_list(kind) if isinstance(ds, StreamingList) else ds.list(kind)[0]
                for obj in stream:
                    key = _key(obj)
                    if kind == "EndpointSlice":
                        services.on_slice(key, obj)
                    else:
                        services.on_service(key, obj)
                        services.compute_listed(key, obj)
            gc.collect()  # whatever cyclic garbage the list's client left (young objects only)
            gc.freeze()  # and the services' results out of sight too
            self.metrics.mark_in_sync()
            self._publish(revision)
        finally:
            if collecting:
                gc.enable()
        gc.freeze()
        _give_back_heap()
        return revision

    def _watch(self, ds: Datastore, revision: int) -> None:
        events: queue.Queue[Event | BaseException] = queue.Queue()

        def pump() -> None:
            try:
                for ev in ds.watch(revision, stop=self.stop):
                    events.put(ev)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                events.put(e)

        threading.Thread(target=pump, name="watch", daemon=True).start()
        health = ds if isinstance(ds, WatchHealth) else None
        while not self.stop.is_set():
            try:
                batch = [events.get(timeout=WATCH_HEALTH_S)]
            except queue.Empty:
                # A quiet watch may be a lost one retrying by itself: not ready meanwhile.
                if health is not None:
                    self._set_datastore_problem(health.watch_problem())
                _collect_garbage()
                continue
            if health is not None:
                self._set_datastore_problem(health.watch_problem())
            while not events.empty():
                batch.append(events.get_nowait())
            for item in batch:
                if isinstance(item, BaseException):
                    raise item
                self._on_event(item)
                revision = max(revision, item.revision)
            self._publish(revision)
            _collect_garbage(GC_YOUNG_MAX)  # events without a quiet second: now and then

    def _on_event(self, ev: Event) -> None:
        if ev.kind not in KINDS:
            return
        key = _key(ev.obj)
        current = None if ev.type == "DELETED" else ev.obj
        if ev.kind == "Service":  # the index holds them: compute() reads neither
            self.services.on_service(key, current)
            return
        if ev.kind == "EndpointSlice":
            self.services.on_slice(key, current)
            return
        if current is None:
            self.resources[ev.kind].pop(key, None)
        else:
            self.resources[ev.kind][key] = kept(ev.kind, current)
        self.base = None  # compute() reads every other kind

    def _base(self) -> NodeState:
        """compute()'s state of everything but services (reused while only Services and
        EndpointSlices change); the first one also has the worker load the datapath."""
        base = self.base
        if base is None:
            base = compute(self.resources, self.node, bgp=self.bgp)
            if self.bgp:
                base.bird = bird.render(self.resources, self.node)
                if base.bird is not None:
                    base.warnings.extend(base.bird.warnings)
            self.base = base
            if not self.prepared:  # the first state: load while the services compute
                self.worker.prepare(base)
                self.prepared = True
        return base

    def _publish(self, revision: int) -> None:
        with self.status.lock:
            self.status.seen_revision = revision
        base = self._base()
        self.services.set_node_ip(base.node_ip, base.node_ip6)
        self.worker.submit(with_services(base, self.services), revision)


def _newer(
    pending: tuple[NodeState, int] | None, new: tuple[NodeState, int]
) -> tuple[NodeState, int]:
    """``new`` replaces a pending state (coalescing); its changed services then cover both."""
    if pending is not None:
        old, changed = pending[0].services_changed, new[0].services_changed
        new[0].services_changed = None if old is None or changed is None else old | changed
    return new


def _collect_garbage(young: int = GC_YOUNG) -> None:
    """A full collection if ``young`` tracked objects were made since the last one (the agent
    runs with automatic collections off: Agent.run). What the relists froze is not walked."""
    if gc.get_count()[0] >= young:
        gc.collect()


def _give_back_heap() -> None:
    """Return the heap a relist freed to the kernel (glibc's malloc_trim): the decoded pages of
    a streamed list are gone, but glibc keeps freed memory mapped (in the main arena and the
    datastore client's loop thread's) and the agent's resident size would stay at its peak."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return
    trim(0)


def process_age_s() -> float:
    """Seconds since this process started (its start time in /proc, against the boot clock)."""
    with open("/proc/self/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    started_s = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, in ticks
    return time.clock_gettime(time.CLOCK_BOOTTIME) - started_s


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata", {})
    # one string per namespace, not one per object: these keys live as long as the objects
    return sys.intern(meta.get("namespace", "") or ""), meta["name"]

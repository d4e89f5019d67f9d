#!/usr/bin/env python3
"""Bench: programming N ClusterIP services x 3 endpoints, and one endpoint change.

Part A, in process (precise): N Services + N EndpointSlices as dicts -> ``ServiceIndex`` (feed all,
``results()``) -> ``NatManager.apply`` on a real datapath loaded on a pin root of its own
(/sys/fs/bpf/tabby/bench-<id>-<N>, removed afterwards even on failure). Reported per N: calc
seconds, map-write seconds, total, map writes; then one endpoint change (one slice, one endpoint
replaced): on_slice + results() + apply, median of 50 with spread. After every step the maps are
read back (frontend count == N, backends == 3N, the changed backend visible in tby_nat_be), so no
figure can come from a no-op.

Part B, end to end in the lab: a one-node lab; N Services + slices stored in its datastore
(chunked applies; the time is reported, not part of the target); node1's agent is then stopped
and restarted by its recorded PID, and its /metrics give ``tabby_nat_sync_from_insync_seconds``
(agent in-sync -> last NAT map write). Then one EndpointSlice change is applied 20 times and the
time from ``apply`` to the agent's /readyz revision reaching it is taken (apply-to-programmed).

Targets (the services issue): N=20,000 programs in under a second from in-sync to the last map
write; one endpoint change reaches the datapath in milliseconds.

Usage (root): .venv/bin/python bench/services_scale.py [--services 1 1000 20000] [--no-lab]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import os
import pstats
import shutil
import signal
import sys
import time
import unittest.mock
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import benchlib
from rich.console import Console
from rich.table import Table

from tabby.bpf.maps.nat import (
    BACKENDS_SPEC,
    FRONTENDS_SPEC,
    SOURCE_RANGES_SPEC,
    BackendKey,
    FrontendKey,
)
from tabby.bpf.objects import PIN_BASE, DatapathConfig, DatapathObjects
from tabby.calc.services import ServiceIndex
from tabby.dataplane.nat import NatManager

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "services_scale.json")
DEFAULT_SIZES = (1, 1000, 5000, 10000, 20000)
CHANGE_REPS = 50
LAB_CHANGE_REPS = 20
NODE = "node1"
PROFILE_S = 12  # --profile-agent: py-spy records the restarted agent this long
console = Console(width=150)


@dataclass
class ScaleRow:
    services: int
    calc_s: float
    adopt_s: float  # NatManager() on empty pins: reads what is pinned
    write_s: float  # NatManager.apply
    total_s: float
    writes: int
    frontends: int
    backends: int
    change: dict[str, float] = field(default_factory=dict)  # seconds, spread of one change
    change_calc: dict[str, float] = field(default_factory=dict)
    change_write: dict[str, float] = field(default_factory=dict)
    change_writes: int = 0
    restart_adopt_s: float = 0.0
    restart_apply_s: float = 0.0


@contextlib.contextmanager
def bench_pins(tag: str) -> Iterator[str]:
    """A pin root of our own, removed afterwards whatever happens."""
    root = os.path.join(PIN_BASE, f"bench-{uuid.uuid4().hex[:8]}-{tag}")
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(PIN_BASE)  # only if nothing else lives there


def count(bpf_map: Any) -> int:
    return len(bpf_map.lookup_batch())


def measure(n: int, profile: bool = False) -> ScaleRow:
    services = [benchlib.service(i) for i in range(n)]
    slices = [benchlib.endpoint_slice(i) for i in range(n)]
    with bench_pins(str(n)) as pin_root:
        dp = DatapathObjects(pin_root, DatapathConfig.build()).load()
        maps = [s.open_pinned(pin_root) for s in (FRONTENDS_SPEC, BACKENDS_SPEC)]
        maps.append(SOURCE_RANGES_SPEC.open_pinned(pin_root))
        prof = cProfile.Profile() if profile else None
        try:
            gc.collect()
            if prof:
                prof.enable()
            t0 = time.perf_counter()
            index = ServiceIndex(NODE)
            index.set_node_ip("172.20.32.2")
            for svc in services:
                index.on_service(benchlib.key(svc), svc)
            for sl in slices:
                index.on_slice(benchlib.key(sl), sl)
            desired = index.results()
            t1 = time.perf_counter()
            nat = NatManager(*maps)
            t2 = time.perf_counter()
            result = nat.apply(desired)
            t3 = time.perf_counter()
            if prof:
                prof.disable()
                report_profile(prof, f"N={n}: calc + apply")
            assert not result.errors, result.errors
            fe, be = count(maps[0]), count(maps[1])
            assert fe == n, f"{fe} frontends in tby_nat_fe, expected {n}"
            assert be == 3 * n, f"{be} backends in tby_nat_be, expected {3 * n}"
            row = ScaleRow(n, t1 - t0, t2 - t1, t3 - t2, t3 - t0, result.writes, fe, be)
            one_change(row, index, nat, slices, maps)
            # what an agent restart pays on these pins: adopt, then rewrite under fresh ids
            t4 = time.perf_counter()
            restarted = NatManager(*maps)
            t5 = time.perf_counter()
            again = restarted.apply(index.results())
            t6 = time.perf_counter()
            assert not again.errors and count(maps[0]) == n and count(maps[1]) == 3 * n
            row.restart_adopt_s, row.restart_apply_s = t5 - t4, t6 - t5
        finally:
            for m in maps:
                m.close()
            dp.close()
    return row


def one_change(
    row: ScaleRow, index: ServiceIndex, nat: NatManager, slices: list[Any], maps: list[Any]
) -> None:
    """Replace one endpoint of one service, CHANGE_REPS times (a different service each time)."""
    n = row.services
    totals, calcs, writes = [], [], []
    for rep in range(CHANGE_REPS):
        i = (rep * 7919) % n  # spread over the services
        new_ip = benchlib.backend_ip(n + 1000 + rep, 0)
        addrs = [new_ip] + [benchlib.backend_ip(i, j) for j in (1, 2)]
        sl = benchlib.endpoint_slice(i, addrs)
        t0 = time.perf_counter()
        index.on_slice(benchlib.key(sl), sl)
        desired = index.results()
        t1 = time.perf_counter()
        result = nat.apply(desired)
        t2 = time.perf_counter()
        assert not result.errors, result.errors
        totals.append(t2 - t0)
        calcs.append(t1 - t0)
        writes.append(t2 - t1)
        row.change_writes = result.writes
        # the datapath sees it: the frontend names a set holding the new address
        fe = maps[0].lookup(FrontendKey.make(benchlib.vip(i), benchlib.SERVICE_PORT, "TCP"))
        assert fe is not None and fe.count == 3
        seen = set()
        for ordinal in range(fe.count):
            be = maps[1].lookup(BackendKey(id=fe.id, ordinal=ordinal))
            assert be is not None
            seen.add(be.describe())
        assert f"{new_ip}:{benchlib.TARGET_PORT}" in seen, (new_ip, seen)
        slices[i] = sl
    assert count(maps[0]) == n
    row.change = benchlib.spread(totals)
    row.change_calc = benchlib.spread(calcs)
    row.change_write = benchlib.spread(writes)


def report_profile(prof: cProfile.Profile, title: str) -> None:
    console.print(f"[bold]profile: {title}[/] (top 15 by cumulative time)")
    stats = pstats.Stats(prof)
    stats.sort_stats("cumulative").print_stats(15)


def part_a(sizes: list[int], profile: bool) -> list[ScaleRow]:
    rows = []
    for n in sizes:
        console.print(f"part A: {n} services ...")
        rows.append(measure(n, profile and n == max(sizes)))
    table = Table(title="Part A: in-process ServiceIndex + NatManager on a real datapath")
    for col in (
        "services",
        "calc s",
        "adopt s",
        "map write s",
        "total s",
        "map writes",
        "fe / be",
        "1 change ms (p10-p90)",
        "calc / write ms",
        "restart adopt + apply s",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            f"{r.services:,}",
            f"{r.calc_s:.3f}",
            f"{r.adopt_s:.4f}",
            f"{r.write_s:.3f}",
            f"{r.total_s:.3f}",
            f"{r.writes:,}",
            f"{r.frontends:,} / {r.backends:,}",
            f"{r.change['median'] * 1e3:.2f} ({r.change['p10'] * 1e3:.2f}-"
            f"{r.change['p90'] * 1e3:.2f})",
            f"{r.change_calc['median'] * 1e3:.2f} / {r.change_write['median'] * 1e3:.2f}",
            f"{r.restart_adopt_s:.3f} + {r.restart_apply_s:.3f}",
        )
    console.print(table)
    return rows


# --------------------------------------------------------------------------- part B: the lab


@dataclass
class LabResult:
    services: int
    store_s: float
    restart_to_ready_s: float
    nat_sync_from_insync_s: float
    first_nat_apply_s: float  # NatManager.apply of that first programming (histogram sum)
    frontends: float
    change_dataplane_apply_s: float = 0.0  # mean NodeDataplane.apply per change (agent metric)
    change_nat_apply_s: float = 0.0  # mean NatManager.apply per change (agent metric)
    change_s: dict[str, float] = field(default_factory=dict)  # write -> /readyz revision
    change_map_s: dict[str, float] = field(default_factory=dict)  # write -> backend in tby_nat_be
    change_write_s: dict[str, float] = field(default_factory=dict)  # the datastore write alone
    agent_rss_mb: float = 0.0  # node1's agent VmRSS after the restart
    change_agent_s: dict[str, float] = field(default_factory=dict)  # write done -> tby_nat_be
    # every restart of --starts: (cold|warm, load average, restart -> ready s, in-sync -> NAT s,
    # start -> in-sync s)
    restarts: list[tuple[str, float, float, float, float]] = field(default_factory=list)


def backend_seen(maps: list[Any], vip: str, backend: str) -> bool:
    """Does ``vip``'s frontend (read from the node's pinned maps, no agent involved) have
    ``backend`` ("ip:port") among its backends: what a new connection would pick from."""
    fe = maps[0].lookup(FrontendKey.make(vip, benchlib.SERVICE_PORT, "TCP"))
    if fe is None:
        return False
    found = (maps[1].lookup(BackendKey(id=fe.id, ordinal=o)) for o in range(fe.count))
    return any(b is not None and b.describe() == backend for b in found)


def agent_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmRSS:"))


def py_spy_wrapper(out_path: str, seconds: int) -> str:
    """An executable that runs the agent under ``py-spy record`` (collapsed stacks, every
    thread, ``seconds`` long) and writes ``out_path``: the lab starts it in the agent's place."""
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(py_spy):
        raise SystemExit("--profile-agent needs py-spy (pip install -e '.[dev]')")
    from tabby.lab.cluster import tabby_bin

    wrapper = out_path + ".sh"
    with open(wrapper, "w") as f:
        f.write(
            f"#!/bin/sh\nexec {py_spy} record --nonblocking --format raw --threads --rate 250"
            f' --duration {seconds} --output {out_path} -- {tabby_bin()} "$@"\n'
        )
    os.chmod(wrapper, 0o755)
    return wrapper


def restart_agent(lab: Any, revision: int, cold: bool) -> tuple[float, dict[str, float]]:
    """Stop node1's agent by its PID and start it again (``cold``: its pins removed first, a
    joining node); seconds to /readyz at ``revision``, and its /metrics then."""
    from tabby.dataplane.node import remove_pins
    from tabby.lab import processes
    from tabby.lab.cluster import pin_root

    node = lab.plan.node(NODE)
    processes.stop(lab.agent_proc(NODE), signal.SIGTERM)
    if cold:
        remove_pins(pin_root(lab.name, NODE))
    started = time.monotonic()
    lab.start_agent(node)
    lab.wait_ready(revision, timeout_s=300)
    took = time.monotonic() - started
    got = benchlib.agent_metrics(node.netns)
    got["cpu_s"] = agent_cpu_s(int(lab.agent_proc(NODE)["pid"]))
    return took, got


def agent_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) the process has used: a restart's cost that
    the machine's load does not stretch as it does wall time."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def part_b(
    n: int,
    lab_name: str,
    changes: int = LAB_CHANGE_REPS,
    profile_to: str | None = None,
    starts: list[str] | None = None,
) -> LabResult:
    from tabby.lab import cluster, processes
    from tabby.lab.cluster import Lab, pin_root

    Lab.down(lab_name, progress=lambda _m: None)  # a leftover of an interrupted run
    lab = Lab.up(lab_name, nodes=1, progress=lambda m: console.print(f"  lab: {m}"))
    try:
        ds = lab.datastore()
        objs: list[dict[str, Any]] = []
        for i in range(n):
            objs += [benchlib.service(i), benchlib.endpoint_slice(i, node=NODE)]
        console.print(f"part B: storing {n} services + {n} slices in the lab datastore ...")
        store_s, revision = benchlib.store(ds, objs)
        console.print(f"  stored in {store_s:.1f} s (revision {revision})")
        lab.wait_ready(revision, timeout_s=300)

        node = lab.plan.node(NODE)
        rec = lab.agent_proc(NODE)
        console.print(f"  restarting agent {NODE} (pid {rec['pid']})")
        load0 = os.getloadavg()[0]
        processes.stop(rec, signal.SIGTERM)
        if profile_to:  # the restarted agent runs under py-spy for its first seconds
            wrapper = py_spy_wrapper(profile_to, PROFILE_S)
            with unittest.mock.patch.object(cluster, "tabby_bin", lambda: wrapper):
                lab.start_agent(node)
        started = time.monotonic()
        if not profile_to:
            lab.start_agent(node)
        lab.wait_ready(revision, timeout_s=300)
        ready_s = time.monotonic() - started
        metrics = benchlib.agent_metrics(node.netns)
        insync = metrics.get("tabby_nat_sync_from_insync_seconds", float("nan"))
        result = LabResult(
            n,
            store_s,
            ready_s,
            insync,
            metrics.get("tabby_nat_sync_seconds_sum", float("nan"))
            / max(1.0, metrics.get("tabby_nat_sync_seconds_count", 1.0)),
            metrics.get("tabby_services", float("nan")),
        )
        assert result.frontends >= n, f"agent reports {result.frontends} frontends, expected {n}"
        pid = int(lab.agent_proc(NODE)["pid"])
        if profile_to:  # the recorded process is py-spy: the agent is its child
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                pid = int(f.read().split()[0])
        result.agent_rss_mb = agent_rss_mb(pid)
        result.restarts.append(
            ("warm", load0, ready_s, insync, metrics.get("tabby_start_to_insync_seconds", 0.0))
        )
        if profile_to:  # py-spy writes its file when its duration is over
            deadline = started + PROFILE_S + 30
            while not os.path.exists(profile_to) and time.monotonic() < deadline:
                time.sleep(0.5)
            console.print(f"  agent profile: {profile_to}")
            # py-spy ends the agent with its recording: the changes run on a plain one
            processes.stop(lab.agent_proc(NODE), signal.SIGTERM)
            lab.start_agent(node)
            lab.wait_ready(revision, timeout_s=300)

        for start in starts or ():  # more restarts, cold or warm, with the load average
            load = os.getloadavg()[0]
            took, got = restart_agent(lab, revision, start == "cold")
            row = (
                start,
                load,
                took,
                got.get("tabby_nat_sync_from_insync_seconds", float("nan")),
                got.get("tabby_start_to_insync_seconds", float("nan")),
            )
            console.print(
                f"  restart {row[0]} at load {load:.1f}: ready {took:.2f} s, "
                f"in-sync -> NAT {row[3]:.3f} s, start -> in-sync {row[4]:.2f} s, "
                f"agent CPU until ready {got['cpu_s']:.2f} s"
            )
            result.restarts.append(row)

        latencies, to_map, writes = [], [], []
        i = n // 2
        before = benchlib.agent_metrics(node.netns)
        maps = [s.open_pinned(pin_root(lab_name, NODE)) for s in (FRONTENDS_SPEC, BACKENDS_SPEC)]
        try:
            for rep in range(changes):
                new = benchlib.backend_ip(n + 1000 + rep, 0)
                addrs = [new] + [benchlib.backend_ip(i, j) for j in (1, 2)]
                sl = benchlib.endpoint_slice(i, addrs, node=NODE)
                t0 = time.monotonic()
                rev = ds.apply([sl])
                writes.append(time.monotonic() - t0)
                # what a new connection reads, polled from here (no HTTP poll loading the agent)
                deadline = t0 + 30
                while not backend_seen(maps, benchlib.vip(i), f"{new}:{benchlib.TARGET_PORT}"):
                    assert time.monotonic() < deadline, f"{new} never reached tby_nat_be"
                    time.sleep(0.0002)
                to_map.append(time.monotonic() - t0)
                benchlib.wait_programmed(node.netns, rev, timeout_s=30)
                latencies.append(time.monotonic() - t0)
        finally:
            for m in maps:
                m.close()
        after = benchlib.agent_metrics(node.netns)
        for name, attr in (
            ("tabby_dataplane_apply_seconds", "change_dataplane_apply_s"),
            ("tabby_nat_sync_seconds", "change_nat_apply_s"),
        ):
            runs = after[f"{name}_count"] - before[f"{name}_count"]
            total = after[f"{name}_sum"] - before[f"{name}_sum"]
            setattr(result, attr, total / runs if runs else float("nan"))
        result.change_s = benchlib.spread(latencies)
        result.change_map_s = benchlib.spread(to_map)
        result.change_write_s = benchlib.spread(writes)
        result.change_agent_s = benchlib.spread(
            [t - w for t, w in zip(to_map, writes, strict=True)]
        )
        for label, sp in (
            ("write -> tby_nat_be", result.change_map_s),
            ("the datastore write", result.change_write_s),
            ("write done -> tby_nat_be", result.change_agent_s),
        ):
            console.print(
                f"  {label}, ms: median {sp['median'] * 1e3:.2f}, p90 {sp['p90'] * 1e3:.2f}, "
                f"p99 {sp['p99'] * 1e3:.2f}, max {sp['max'] * 1e3:.2f} (n={sp['n']:.0f})"
            )
        slow = [
            (round(t * 1e3, 1), round(w * 1e3, 1))
            for t, w in zip(to_map, writes, strict=True)
            if t > 0.01
        ]
        console.print(f"  changes over 10 ms (to tby_nat_be, of which the write), ms: {slow}")
    finally:
        Lab.down(lab_name, progress=lambda m: console.print(f"  {m}"))

    table = Table(title=f"Part B: the lab's agent ({NODE}), {n:,} services stored")
    for col in (
        "store s (not target)",
        "restart->ready s",
        "in-sync->last map write s",
        "NAT apply s",
        "frontends",
        "agent RSS MB",
        "1 change apply->tby_nat_be ms (p10-p90, max)",
        "1 change apply->/readyz ms (p10-p90)",
        "of which dataplane / NAT apply ms",
    ):
        table.add_column(col, justify="right")
    c, m = result.change_s, result.change_map_s
    table.add_row(
        f"{result.store_s:.1f}",
        f"{result.restart_to_ready_s:.2f}",
        f"{result.nat_sync_from_insync_s:.3f}",
        f"{result.first_nat_apply_s:.3f}",
        f"{result.frontends:,.0f}",
        f"{result.agent_rss_mb:.0f}",
        f"{m['median'] * 1e3:.1f} ({m['p10'] * 1e3:.1f}-{m['p90'] * 1e3:.1f}, "
        f"{m['max'] * 1e3:.1f})",
        f"{c['median'] * 1e3:.1f} ({c['p10'] * 1e3:.1f}-{c['p90'] * 1e3:.1f})",
        f"{result.change_dataplane_apply_s * 1e3:.1f} / {result.change_nat_apply_s * 1e3:.2f}",
    )
    console.print(table)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--lab-services", type=int, default=20000)
    parser.add_argument("--no-lab", action="store_true", help="part A only")
    parser.add_argument("--no-inprocess", action="store_true", help="part B only")
    parser.add_argument("--profile", action="store_true", help="cProfile the largest N of part A")
    parser.add_argument("--lab-name", default="bench")
    parser.add_argument("--changes", type=int, default=LAB_CHANGE_REPS, help="part B changes")
    parser.add_argument(
        "--starts",
        default="",
        help="part B: more agent restarts after the first, e.g. cold,warm,cold,warm (cold: "
        "the node's pins removed first); each printed with the load average",
    )
    parser.add_argument(
        "--profile-agent",
        metavar="FILE",
        help="part B: run the restarted agent under py-spy (collapsed stacks of every thread "
        f"for its first {PROFILE_S} s, written to FILE; `py-spy` from the dev extras)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("services_scale: needs root (BPF maps, the lab)", file=sys.stderr)
        return 2
    # SIGTERM (make, CI) unwinds like Ctrl-C, so the lab and pins are removed by the finally blocks
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "kernel": os.uname().release}}
    if not args.no_inprocess:
        out["in_process"] = [asdict(r) for r in part_a(args.services, args.profile)]
    if not args.no_lab:
        out["lab"] = asdict(
            part_b(
                args.lab_services,
                args.lab_name,
                args.changes,
                args.profile_agent,
                [s for s in args.starts.split(",") if s],
            )
        )
    out["when"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    for section, data in out.items():
        benchlib.write_json(RESULTS, section, data)
    console.print(f"results: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

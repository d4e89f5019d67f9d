#!/usr/bin/env python3
"""Bench: new TCP connections/s through a ClusterIP, as a ratio to plain pod-to-pod routing.

A two-node lab of its own (``--lab-name``, removed afterwards even on failure or Ctrl-C): a
client pod on node1, an nginx pod on node2 (port 80) behind one ClusterIP Service. The load
generator (build/bench/connload, from bench/connload.c: connect, GET with Connection: close, read
to EOF, close; 32 in flight) runs inside the client pod's netns via ``nsenter --net=``, pinned to
CPU 0 with ``taskset``; nginx is pinned to CPU 1. Cases, interleaved in every repetition (ratios
are taken within one repetition, then the median over repetitions):

  direct      the backend pod's IP: plain routing (VXLAN node1 -> node2), the baseline
  clusterip   the Service's ClusterIP from a process OUTSIDE the pod's cgroup: connect-time LB
              (cgroup hooks on the node's group) does not see it, so every SYN takes the
              per-packet NAT path of tc_from_workload (tby_nat_fe/tby_nat_be + conntrack)
  ctlb        the ClusterIP from a process INSIDE the pod's cgroup: connect() is rewritten to
              the backend by the connect-time LB, packets then travel as in "direct"

with 1 Service programmed, then again after 19,999 more Services (+ slices of 3 endpoints) were
stored and programmed on every node. Per-CPU busy % (from /proc/stat) is recorded for every run.

Usage (root): .venv/bin/python bench/conn_rate.py [--seconds 5] [--reps 3] [--services 20000]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import benchlib
from rich.console import Console
from rich.table import Table

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONNLOAD = os.path.join(ROOT, "build", "bench", "connload")
RESULTS = os.path.join(HERE, "results", "conn_rate.json")
VIP = "100.64.0.100"
CASES = ("direct", "clusterip", "ctlb")
# One client pod per case, all on node1: a direct connection must never reuse the 4-tuple a
# NATed one used moments before (see bench/README.md: tby_ct keeps the closed NAT pair and its
# reverse entry captures the direct flow's replies).
CLIENTS = {"direct": "client-direct", "clusterip": "client-vip", "ctlb": "client-ctlb"}
console = Console(width=150)


@dataclass
class Run:
    services: int
    rep: int
    case: str
    rate: float
    conns: int
    p50_us: int
    p90_us: int
    p99_us: int
    errors: int
    cpu_busy_pct: list[float] = field(default_factory=list)


def cpu_times() -> list[tuple[int, int]]:
    """(busy, total) jiffies per CPU."""
    out = []
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                v = [int(x) for x in line.split()[1:]]
                idle = v[3] + v[4]  # idle + iowait
                out.append((sum(v) - idle, sum(v)))
    return out


def busy_pct(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[float]:
    return [
        100.0 * (b1 - b0) / max(1, t1 - t0)
        for (b0, t0), (b1, t1) in zip(before, after, strict=True)
    ]


def connload(
    netns: str, target: str, seconds: float, cgroup: str | None, inflight: int, max_conns: int
) -> dict[str, float]:
    argv = [
        "nsenter",
        f"--net=/run/netns/{netns}",
        "taskset",
        "-c",
        "0",
        CONNLOAD,
        "-a",
        target,
        "-p",
        "80",
        "-c",
        str(inflight),
        "-t",
        str(seconds),
        "-n",
        str(max_conns),
    ]

    def into_cgroup() -> None:
        if cgroup:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        preexec_fn=into_cgroup,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"connload failed ({proc.returncode}): {proc.stderr.strip()}")
    fields = dict(kv.split("=", 1) for kv in proc.stdout.split())
    return {k: float(v) for k, v in fields.items()}


def pin_to_cpu1(pids: list[int]) -> None:
    """nginx (master and workers, processes this lab started) on CPU 1, away from the client."""
    for pid in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", "1", str(pid)], capture_output=True)
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = [int(c) for c in f.read().split()]
        except FileNotFoundError:
            continue
        for child in children:
            subprocess.run(["taskset", "-a", "-p", "-c", "1", str(child)], capture_output=True)


def wait_slices(lab: Any, service: str, count: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        slices, _ = lab.datastore().list("EndpointSlice", "default")
        ready = sum(
            1
            for s in slices
            if s["metadata"]["labels"].get("kubernetes.io/service-name") == service
            for e in s["endpoints"]
        )
        if ready == count:
            lab.wait_ready()
            return
        time.sleep(0.1)
    raise RuntimeError(f"{service}: the controller never wrote {count} endpoints")


def measure(
    lab: Any, n: int, reps: int, seconds: float, inflight: int, max_conns: int
) -> list[Run]:
    web = lab.pod("web")
    targets = {
        "direct": (web["ip"], None),
        "clusterip": (VIP, None),
        "ctlb": (VIP, lab.pod(CLIENTS["ctlb"])["cgroup"]),
    }
    runs = []
    for rep in range(reps):
        order = (
            CASES[rep % len(CASES) :] + CASES[: rep % len(CASES)]
        )  # rotate: no case always first
        for case in order:
            target, cgroup = targets[case]
            before = cpu_times()
            netns = lab.pod(CLIENTS[case])["netns"]
            out = connload(netns, target, seconds, cgroup, inflight, max_conns)
            cpu = busy_pct(before, cpu_times())
            errors = int(sum(v for k, v in out.items() if k.startswith("err_")))
            run = Run(
                n,
                rep,
                case,
                out["rate"],
                int(out["conns"]),
                int(out["p50_us"]),
                int(out["p90_us"]),
                int(out["p99_us"]),
                errors,
                cpu,
            )
            console.print(
                f"  N={n:>6} rep {rep} {case:9s} {run.rate:9.0f} conn/s  p50 {run.p50_us} us  "
                f"p99 {run.p99_us} us  errors {errors}  cpu {' '.join(f'{c:.0f}%' for c in cpu)}"
            )
            runs.append(run)
    return runs


def summarise(runs: list[Run]) -> list[dict[str, Any]]:
    rows = []
    for n in sorted({r.services for r in runs}):
        by_rep: dict[int, dict[str, Run]] = {}
        for r in runs:
            if r.services == n:
                by_rep.setdefault(r.rep, {})[r.case] = r
        for case in CASES:
            cell = [reps[case] for reps in by_rep.values()]
            ratios = [reps[case].rate / reps["direct"].rate for reps in by_rep.values()]
            rows.append(
                {
                    "services": n,
                    "case": case,
                    "rate_median": statistics.median(r.rate for r in cell),
                    "rate_min": min(r.rate for r in cell),
                    "rate_max": max(r.rate for r in cell),
                    "ratio_median": statistics.median(ratios),
                    "ratio_min": min(ratios),
                    "ratio_max": max(ratios),
                    "p50_us": statistics.median(r.p50_us for r in cell),
                    "p99_us": statistics.median(r.p99_us for r in cell),
                    "errors": sum(r.errors for r in cell),
                    "cpu_busy_pct": [
                        round(statistics.median(r.cpu_busy_pct[i] for r in cell), 1)
                        for i in range(len(cell[0].cpu_busy_pct))
                    ],
                }
            )
    return rows


def print_table(rows: list[dict[str, Any]], reps: int) -> None:
    title = "New TCP connections/s, client pods on node1 -> nginx pod on node2"
    table = Table(title=f"{title} ({reps} interleaved repetitions)")
    for col in (
        "services",
        "path",
        "conn/s median (min-max)",
        "ratio to direct (min-max)",
        "p50 / p99 us",
        "errors",
        "CPU busy %",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            f"{r['services']:,}",
            r["case"],
            f"{r['rate_median']:,.0f} ({r['rate_min']:,.0f}-{r['rate_max']:,.0f})",
            f"{r['ratio_median']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})",
            f"{r['p50_us']:.0f} / {r['p99_us']:.0f}",
            str(r["errors"]),
            " ".join(f"{c:.0f}" for c in r["cpu_busy_pct"]),
        )
    console.print(table)
    console.print(
        "clusterip: the load generator runs outside the pod's cgroup, so connect-time LB does "
        "not apply and the per-packet NAT is measured; ctlb: inside the pod's cgroup "
        "(connect() rewritten to the backend)."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per run (<= 60)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--services", type=int, default=20000, help="the large case")
    parser.add_argument("--inflight", type=int, default=32)
    parser.add_argument("--max-conns", type=int, default=500000, help="per run")
    parser.add_argument("--lab-name", default="benchconn")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("conn_rate: needs root (the lab)", file=sys.stderr)
        return 2
    if not os.access(CONNLOAD, os.X_OK):
        print(f"conn_rate: {CONNLOAD} missing: run `make bench`", file=sys.stderr)
        return 2
    if not 0 < args.seconds <= 60 or not 1 <= args.reps <= 10:
        print("conn_rate: --seconds in (0, 60], --reps in [1, 10]", file=sys.stderr)
        return 2

    from tabby.lab.cluster import Lab

    # SIGTERM (make, CI) unwinds like Ctrl-C, so the finally below removes the lab
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    Lab.down(args.lab_name, progress=lambda _m: None)  # a leftover of an interrupted run
    runs: list[Run] = []
    try:
        lab = Lab.up(args.lab_name, nodes=2, progress=lambda m: console.print(f"  lab: {m}"))
        for pod in CLIENTS.values():
            lab.add_pod(pod, "node1", image="pause", wait=False)
        lab.add_pod("web", "node2", image="nginx", labels={"app": "web"}, wait=False)
        web_svc = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "clusterIP": VIP,
                "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP"}],
            },
        }
        lab.datastore().apply([web_svc])
        wait_slices(lab, "web", 1)
        pin_to_cpu1([int(p["pid"]) for p in lab.pod("web").get("procs", [])])
        for pod in CLIENTS.values():
            for knob, value in (
                ("net.ipv4.ip_local_port_range", "1024 65535"),
                ("net.ipv4.tcp_tw_reuse", "1"),
            ):
                netns = f"--net=/run/netns/{lab.pod(pod)['netns']}"
                subprocess.run(["nsenter", netns, "sysctl", "-qw", f"{knob}={value}"], check=True)
        # smoke: every path answers before anything is measured
        for case in CASES:
            target, cg = (lab.pod("web")["ip"], None) if case == "direct" else (VIP, None)
            if case == "ctlb":
                cg = lab.pod(CLIENTS[case])["cgroup"]
            out = connload(lab.pod(CLIENTS[case])["netns"], target, 1, cg, 1, 20)
            if out["conns"] < 1:
                raise RuntimeError(f"{case}: no connection to {target}: {out}")

        runs += measure(lab, 1, args.reps, args.seconds, args.inflight, args.max_conns)
        extra: list[dict[str, Any]] = []
        for i in range(args.services - 1):
            extra += [benchlib.service(i), benchlib.endpoint_slice(i)]
        console.print(f"storing {args.services - 1} more services + slices ...")
        store_s, revision = benchlib.store(lab.datastore(), extra)
        lab.wait_ready(revision, timeout_s=600)
        console.print(f"  stored in {store_s:.1f} s, every agent programmed revision {revision}")
        runs += measure(lab, args.services, args.reps, args.seconds, args.inflight, args.max_conns)
    finally:
        Lab.down(args.lab_name, progress=lambda m: console.print(f"  {m}"))

    rows = summarise(runs)
    print_table(rows, args.reps)
    benchlib.write_json(
        RESULTS,
        "conn_rate",
        {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
            "seconds_per_run": args.seconds,
            "inflight": args.inflight,
            "summary": rows,
            "runs": [asdict(r) for r in runs],
        },
    )
    console.print(f"results: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

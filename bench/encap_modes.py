#!/usr/bin/env python3
"""Bench: pod-to-pod across nodes in each of the pool's routing modes (IP-in-IP Always and
CrossSubnet, VXLAN Always and CrossSubnet, Never with routes learnt over BGP), as ratios to
pod-to-pod on the same node, in one run.

A lab of its own (``--lab-name``, removed afterwards even on failure, Ctrl-C or SIGTERM) from the
example kOps spec stretched over two subnets with the BIRD backend: a client pod on node1 and one
nginx pod on each node: node1 (same node), node3 (other node, same subnet: one L2 hop) and node2
(across the fabric's router). The pool's mode is switched live between cells (a patch of the
IPPool, as a user would), so one lab serves every mode. Per repetition, modes and cases are
rotated so that none is always first; per cell: TCP throughput with iperf3 (client pinned to
CPU 0, server to CPU 1, ``--seconds``), and new TCP connections/s with connload (bench/connload.c,
32 in flight, nginx pinned to CPU 1). Ratios are taken to the same-node cell of the same mode and
repetition, then the median over repetitions.

Usage (root, after `make bench` built connload):
  .venv/bin/python bench/encap_modes.py [--seconds 4] [--reps 3] [--modes ipip-always,never-bgp]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from conn_rate import CONNLOAD, connload, pin_to_cpu1
from rich.console import Console
from rich.table import Table

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "encap_modes.json")
CASES = {"same-node": "web1", "same-subnet": "web3", "across-router": "web2"}
SERVERS = {"web1": "node1", "web2": "node2", "web3": "node3"}
POOL = "default-ipv4-ippool"
MODES = {  # name -> (ipipMode, vxlanMode)
    "ipip-always": ("Always", "Never"),
    "ipip-crosssubnet": ("CrossSubnet", "Never"),
    "vxlan-always": ("Never", "Always"),
    "vxlan-crosssubnet": ("Never", "CrossSubnet"),
    "never-bgp": ("Never", "Never"),
}
console = Console(width=150)


def spec() -> Any:
    sys.path.insert(0, os.path.join(ROOT, "tests", "fv"))
    from spec_lab import two_subnet_spec  # the fv tests' spec: one source for both

    return two_subnet_spec(None, ipipMode="Never")


def iperf(client_netns: str, server_netns: str, ip: str, seconds: float) -> float:
    """Gbit/s of one iperf3 TCP stream client -> server (a server we start and end by PID)."""
    server = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{server_netns}", "taskset", "-c", "1",
         "iperf3", "-s", "-1", "-p", "5201"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(0.3)
        out = subprocess.run(
            ["nsenter", f"--net=/run/netns/{client_netns}", "taskset", "-c", "0",
             "iperf3", "-c", ip, "-p", "5201", "-t", str(seconds), "-J"],
            capture_output=True, text=True, timeout=seconds + 30, check=True,
        ).stdout  # fmt: skip
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        server.terminate()
        server.wait(timeout=10)


def set_mode(lab: Any, mode: str) -> None:
    """Switch the pool's mode live and wait until every agent has programmed it."""
    ipip, vxlan = MODES[mode]
    lab.datastore().patch("IPPool", POOL, None, {"spec": {"ipipMode": ipip, "vxlanMode": vxlan}})
    lab.wait_ready()


def wait_answers(lab: Any, client: str, mode: str) -> None:
    """Every path answers in this mode (routes converged, BGP included)."""
    for case, pod in CASES.items():
        deadline = time.monotonic() + 30
        while connload(client, lab.pod(pod)["ip"], 1, None, 1, 5)["conns"] < 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mode} {case}: {lab.pod(pod)['ip']} never answered")


def rotated(names: list[str], rep: int) -> list[str]:
    k = rep % len(names)
    return names[k:] + names[:k]


def summarize(runs: list[dict[str, Any]], modes: list[str]) -> list[dict[str, Any]]:
    """Per mode and case: medians, and ratios to that mode's same-node cell of the same rep."""
    rows = []
    for mode in modes:
        base = {r["rep"]: r for r in runs if r["mode"] == mode and r["case"] == "same-node"}
        for case in CASES:
            cells = {r["rep"]: r for r in runs if r["mode"] == mode and r["case"] == case}

            def ratio(
                key: str,
                cells: dict[int, dict[str, Any]] = cells,
                base: dict[int, dict[str, Any]] = base,
            ) -> float:
                return statistics.median(cells[i][key] / base[i][key] for i in cells)

            rows.append({
                "mode": mode, "case": case,
                "gbit_s": statistics.median(r["gbit_s"] for r in cells.values()),
                "gbit_ratio": ratio("gbit_s"),
                "conn_s": statistics.median(r["conn_s"] for r in cells.values()),
                "conn_ratio": ratio("conn_s"),
                "errors": sum(r["errors"] for r in cells.values()),
            })  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per cell (<= 60)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES)
    )
    parser.add_argument("--lab-name", default="benchmodes")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if os.geteuid() != 0:
        print("encap_modes: needs root (the lab)", file=sys.stderr)
        return 2
    if not os.access(CONNLOAD, os.X_OK):
        print(f"encap_modes: {CONNLOAD} missing: run `make bench`", file=sys.stderr)
        return 2
    if not 0 < args.seconds <= 60 or not 1 <= args.reps <= 10:
        print("encap_modes: --seconds in (0, 60], --reps in [1, 10]", file=sys.stderr)
        return 2
    if not modes or set(modes) - set(MODES):
        print(f"encap_modes: --modes takes some of {', '.join(MODES)}", file=sys.stderr)
        return 2

    from tabby.lab.cluster import Lab

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    Lab.down(args.lab_name, progress=lambda _m: None)  # a leftover of an interrupted run
    runs: list[dict[str, Any]] = []
    try:
        lab = Lab.up(args.lab_name, progress=lambda m: console.print(f"  lab: {m}"), cluster=spec())
        lab.add_pod("client", "node1", image="pause", wait=False)
        for pod, node in SERVERS.items():
            lab.add_pod(pod, node, image="nginx", wait=False)
        lab.wait_ready()
        for pod in SERVERS:
            pin_to_cpu1([int(p["pid"]) for p in lab.pod(pod).get("procs", [])])
        client = lab.pod("client")["netns"]
        for knob in ("net.ipv4.ip_local_port_range=1024 65535", "net.ipv4.tcp_tw_reuse=1"):
            subprocess.run(
                ["nsenter", f"--net=/run/netns/{client}", "sysctl", "-qw", knob], check=True
            )
        for rep in range(args.reps):
            for mode in rotated(modes, rep):
                set_mode(lab, mode)
                wait_answers(lab, client, mode)
                for case in rotated(list(CASES), rep):
                    server = lab.pod(CASES[case])
                    gbit = iperf(client, server["netns"], server["ip"], args.seconds)
                    out = connload(client, server["ip"], args.seconds, None, 32, 500000)
                    errors = int(sum(v for k, v in out.items() if k.startswith("err_")))
                    runs.append({"rep": rep, "mode": mode, "case": case, "gbit_s": gbit,
                                 "conn_s": out["rate"], "p50_us": out["p50_us"],
                                 "errors": errors})  # fmt: skip
                    console.print(
                        f"  rep {rep} {mode:17s} {case:13s} {gbit:6.2f} Gbit/s  "
                        f"{out['rate']:8.0f} conn/s  errors {errors}"
                    )
    finally:
        Lab.down(args.lab_name, progress=lambda m: console.print(f"  {m}"))

    rows = summarize(runs, modes)
    table = Table(
        title=f"pod-to-pod from node1 per pool mode ({args.reps} interleaved repetitions)"
    )
    for col in ("mode", "destination", "Gbit/s", "ratio", "conn/s", "ratio", "errors"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["mode"], r["case"], f"{r['gbit_s']:.2f}", f"{r['gbit_ratio']:.2f}",
            f"{r['conn_s']:,.0f}", f"{r['conn_ratio']:.2f}", str(r["errors"]),
        )  # fmt: skip
    console.print(table)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump({"when": time.strftime("%Y-%m-%d"), "seconds": args.seconds,
                   "reps": args.reps, "rows": rows, "runs": runs}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The report of `tabbyctl bench`: medians and spread per (N, path), ratios taken within one
repetition, the issue's targets checked (reported, never asserted), a markdown file, one PNG per
figure vs N (matplotlib's Agg backend: no display needed) and the raw JSON.

Pure apart from ``write``: ``summarise`` and ``markdown`` take the result dict (``-o json``'s
shape), so a saved run can be re-rendered.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from tabby.lab.benchrun import DENOMINATOR, PATH_FAMILY

# the targets, at the largest N of a run
TARGET_RATIO = 1.0  # ClusterIP conn/s >= 1.0x plain routing
TARGET_LOCAL_RATIO = 1.2  # stretch: the kernel paths' shape, the node's stack skipped
TARGET_FLAT = 0.05  # ... within 5% from the smallest N to the largest
TARGET_P99 = 1.1  # connect+first-byte p99 <= 1.1x plain routing's
TARGET_PROGRAM_S = 1.0  # 20,000 services x 3 endpoints from scratch
TARGET_CHANGE_MS = 10.0  # one endpoint change, p99
TARGET_RSS_MB = 150.0
TARGET_NODEPORT_RATIO = 0.9  # NodePort (DSR) conn/s >= 0.9x the external client's plain routing
TARGET_NODEPORT_GBPS = 0.95  # ... and throughput >= 0.95x


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def _p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Rows per (N, path) and per N, and the targets, from a run's JSON."""
    cells = result["cells"]
    sizes = sorted({c["services"] for c in cells})
    paths = [p for p in result["config"]["paths"] if any(c["path"] == p for c in cells)]
    rows = []
    for n in sizes:
        rate = {
            p: [c for c in cells if c["services"] == n and c["path"] == p and c["kind"] == "rate"]
            for p in paths
        }
        lat = {
            p: [
                c for c in cells if c["services"] == n and c["path"] == p and c["kind"] == "latency"
            ]
            for p in paths
        }
        by_rep = {p: {c["rep"]: c for c in rate[p]} for p in paths}
        for p in paths:
            if not rate[p]:
                continue
            den = DENOMINATOR[PATH_FAMILY[p]]
            ratios = [
                c["rate"] / by_rep[den][rep]["rate"]
                for rep, c in by_rep[p].items()
                if rep in by_rep.get(den, {}) and by_rep[den][rep]["rate"] > 0
            ]
            cross = []
            if PATH_FAMILY[p] == "tabby" and "plain" in by_rep:
                cross = [
                    c["rate"] / by_rep["plain"][rep]["rate"]
                    for rep, c in by_rep[p].items()
                    if rep in by_rep["plain"] and by_rep["plain"][rep]["rate"] > 0
                ]
            ncpu = len(rate[p][0]["cpu_busy_pct"])
            row: dict[str, Any] = {
                "services": n,
                "path": p,
                "denominator": den,
                "rate": _spread([c["rate"] for c in rate[p]]),
                "ratio": _spread(ratios) if ratios else None,
                "ratio_to_plain": _spread(cross) if cross else None,
                "loaded_p50_us": statistics.median(c["p50_us"] for c in rate[p]),
                "loaded_p99_us": statistics.median(c["p99_us"] for c in rate[p]),
                "cpu_us_per_conn": statistics.median(c["cpu_us_per_conn"] for c in rate[p]),
                "net_cpu_us_per_conn": statistics.median(c["net_cpu_us_per_conn"] for c in rate[p]),
                "cpu_busy_pct": [
                    round(statistics.median(c["cpu_busy_pct"][i] for c in rate[p]), 1)
                    for i in range(ncpu)
                ],
                "errors": sum(c["errors"] for c in rate[p] + lat[p]),
            }
            for q in ("p01_us", "p50_us", "p90_us", "p99_us"):
                row[q] = statistics.median(c[q] for c in lat[p]) if lat[p] else None
            rows.append(row)
    per_size = []
    for s in result["sizes"]:
        change = {
            k: {"median": statistics.median(v), "p99": _p99(v), "n": len(v)}
            for k, v in s["change_ms"].items()
            if v
        }
        per_size.append({**s, "change": change})
    return {"rows": rows, "sizes": per_size, "targets": targets(rows, per_size)}


def _throughput_ratio(size: dict[str, Any], path: str, base: str) -> float | None:
    """``path``'s iperf3 over ``base``'s: per repetition (the two streams of one repetition ran
    minutes apart at most), then the median; a result without repetitions: its medians."""
    reps = size.get("iperf_reps") or {}
    # an interrupted run may end between the two: the repetitions both have
    both = zip(reps.get(path, []), reps.get(base, []), strict=False)
    pairs = [(a, b) for a, b in both if b]
    if pairs:
        return float(statistics.median(a / b for a, b in pairs))
    gbps = size.get("iperf_gbps") or {}
    a, b = gbps.get(path), gbps.get(base)
    return a / b if a is not None and b else None


def targets(rows: list[dict[str, Any]], per_size: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets at the largest N measured; each met, missed or not measured."""
    out: list[dict[str, Any]] = []
    if not rows:
        return out
    big = max(r["services"] for r in rows)
    small = min(r["services"] for r in rows)

    def row(n: int, path: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["services"] == n and r["path"] == path), None)

    def add(what: str, value: float | None, goal: str, met: bool | None) -> None:
        verdict = "not measured" if value is None or met is None else ("met" if met else "MISSED")
        out.append({"target": what, "value": value, "goal": goal, "verdict": verdict})

    for path in ("tabby-nat", "tabby-ctlb"):
        r, r0 = row(big, path), row(small, path)
        ratio = r["ratio"]["median"] if r and r["ratio"] else None
        add(
            f"{path} conn/s vs tabby-direct at N={big:,}",
            ratio,
            f">= {TARGET_RATIO}x",
            None if ratio is None else ratio >= TARGET_RATIO,
        )
        if r and r0 and r["ratio"] and r0["ratio"] and big != small:
            drift = abs(r["ratio"]["median"] / r0["ratio"]["median"] - 1)
            add(
                f"{path} flat from N={small:,} to N={big:,} (ratio drift)",
                drift,
                f"<= {TARGET_FLAT:.0%}",
                drift <= TARGET_FLAT,
            )
        d = row(big, "tabby-direct")
        if r and d and r["p99_us"] and d["p99_us"]:
            p99 = r["p99_us"] / d["p99_us"]
            add(
                f"{path} p99 vs tabby-direct at N={big:,}",
                p99,
                f"<= {TARGET_P99}x",
                p99 <= TARGET_P99,
            )
    for path in ("tabby-local", "tabby-local-nat", "tabby-local-ctlb"):
        r = row(big, path)
        ratio = r["ratio"]["median"] if r and r["ratio"] else None
        if ratio is None:
            continue  # a run without the local rows says nothing about them
        add(
            f"{path} conn/s vs plain (same shape) at N={big:,}",
            ratio,
            f">= {TARGET_LOCAL_RATIO}x",
            ratio >= TARGET_LOCAL_RATIO,
        )
    r = row(big, "nodeport-dsr")
    ratio = r["ratio"]["median"] if r and r["ratio"] else None
    add(
        f"nodeport-dsr conn/s vs nodeport-plain at N={big:,}",
        ratio,
        f">= {TARGET_NODEPORT_RATIO}x",
        None if ratio is None else ratio >= TARGET_NODEPORT_RATIO,
    )
    last = next((s for s in per_size if s["services"] == big), None)
    first = next((s for s in per_size if s["services"] == small), None)
    # the translation's own BPF cost against N: a path's time per connection over the same
    # path's without translation, at the largest N against the smallest (what the whole
    # machine's state does to every program, a few % between phases, cancels out)
    for path, base in BPF_BASES.items():
        rel = [
            (s or {}).get("bpf_ns_per_conn", {}).get(path, 0)
            / ((s or {}).get("bpf_ns_per_conn", {}).get(base) or float("inf"))
            for s in (first, last)
        ]
        if not all(rel) or big == small:
            continue
        drift = abs(rel[1] / rel[0] - 1)
        add(
            f"{path} BPF time per connection over {base}'s, N={small:,} to N={big:,} (drift)",
            drift,
            f"<= {TARGET_FLAT:.0%}",
            drift <= TARGET_FLAT,
        )
    tput = _throughput_ratio(last or {}, "nodeport-dsr", "nodeport-plain")
    add(
        f"nodeport-dsr iperf3 vs nodeport-plain at N={big:,}",
        tput,
        f">= {TARGET_NODEPORT_GBPS}x",
        None if tput is None else tput >= TARGET_NODEPORT_GBPS,
    )
    if last:
        prog = last["program_s"].get("tabby")
        add(
            f"tabby programs N={big:,} from scratch (s)",
            prog,
            f"< {TARGET_PROGRAM_S} s (at 20,000)",
            None if prog is None else prog < TARGET_PROGRAM_S,
        )
        ch = last["change"].get("tabby")
        add(
            f"tabby one endpoint change at N={big:,}, p99 (ms)",
            ch["p99"] if ch else None,
            f"< {TARGET_CHANGE_MS} ms",
            None if not ch else ch["p99"] < TARGET_CHANGE_MS,
        )
        rss = last.get("agent_rss_mb")
        add(
            f"agent RSS at N={big:,} (MB)",
            rss,
            f"< {TARGET_RSS_MB} MB",
            None if rss is None else rss < TARGET_RSS_MB,
        )
    return out


BPF_BASES = {  # a translating path -> the same path without translation
    "tabby-nat": "tabby-direct",
    "tabby-ctlb": "tabby-direct",
    "tabby-local-nat": "tabby-local",
    "tabby-local-ctlb": "tabby-local",
}


def _fmt(v: float | None, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(result: dict[str, Any], summary: dict[str, Any]) -> str:
    cfg, mach = result["config"], result["machine"]
    out = [
        f"# tabby bench, {result['started']}",
        "",
        f"Machine: {mach['cpus']} CPUs ({mach['cpu_model']}), kernel {mach['kernel']}; "
        + ", ".join(f"{v}" for v in mach["tools"].values())
        + f". {mach['shared']}.",
        f"Run: N = {', '.join(f'{n:,}' for n in cfg['sizes'])} services x 3 endpoints, "
        f"{cfg['reps']} interleaved repetition(s), {cfg['seconds']} s rate cells "
        f"({cfg['inflight']} in flight), {cfg['latency_seconds']} s latency cells (1 in flight); "
        f"{result['duration_s']:.0f} s in all.",
        *([f"**The run stopped early**: {result['error']}", ""] if result.get("error") else []),
        "",
        "## New TCP connections/s (connect, GET, response, close)",
        "",
        "Ratios are per repetition, to the path's own plain routing (kernel paths: `plain`; "
        "tabby paths: `tabby-direct`; tabby-local paths, the kernel's shape: `plain`), "
        "median (min-max). Latency: connect + first response byte, "
        "one connection at a time (µs, median over repetitions). CPU: whole machine per "
        "connection, and net of the load generator's and server's own process time.",
        "",
        "| N | path | conn/s median (min-max) | ratio (min-max) | vs plain "
        "| p01 / p50 / p90 / p99 µs | CPU µs/conn (net) | CPU0 / CPU1 % | errors |",
        "|---:|---|---|---|---:|---|---|---|---:|",
    ]
    for r in summary["rows"]:
        ratio = r["ratio"]
        cross = r["ratio_to_plain"]
        out.append(
            f"| {r['services']:,} | {r['path']} | {r['rate']['median']:,.0f} "
            f"({r['rate']['min']:,.0f}-{r['rate']['max']:,.0f}) | "
            + (f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})" if ratio else "-")
            + (f" | {cross['median']:.2f}" if cross else " | -")
            + f" | {_fmt(r['p01_us'])} / {_fmt(r['p50_us'])} / {_fmt(r['p90_us'])} / "
            f"{_fmt(r['p99_us'])} | {r['cpu_us_per_conn']:.0f} ({r['net_cpu_us_per_conn']:.0f}) "
            f"| {' / '.join(f'{c:.0f}' for c in r['cpu_busy_pct'])} | {r['errors']} |"
        )
    paths = [p for p in cfg["paths"] if p != "plain" and PATH_FAMILY.get(p) == "kernel"]
    out += [
        "",
        "## Programming, one change, memory, throughput",
        "",
        "| N | program from scratch s: "
        + " / ".join([*paths, "tabby"])
        + " | one change ms, median (p99) | agent RSS MB | iperf3 Gbit/s |",
        "|---:|---|---|---:|---|",
    ]
    for s in summary["sizes"]:
        prog = " / ".join(_fmt(s["program_s"].get(p), ".2f") for p in [*paths, "tabby"])
        change = (
            ", ".join(
                f"{p} {c['median']:.1f} ({c['p99']:.1f})" for p, c in sorted(s["change"].items())
            )
            or "-"
        )
        iperf = ", ".join(f"{p} {g:.1f}" for p, g in s["iperf_gbps"].items()) or "-"
        out.append(
            f"| {s['services']:,} | {prog} | {change} | {_fmt(s['agent_rss_mb'], '.0f')} | "
            f"{iperf} |"
        )
    for s in summary["sizes"]:
        split = s.get("change_split_ms") or {}
        if split:
            out.append(
                f"\ntabby one change at N={s['services']:,}: of which the agent's dataplane "
                f"apply {split.get('dataplane_apply', 0):.1f} ms and NAT map writes "
                f"{split.get('nat_apply', 0):.1f} ms per change (mean); the rest is datastore "
                "write, watch and calc."
            )
    out += _bpf_section(summary["sizes"])
    notes = sorted(
        {f"{p}: {note}" for s in summary["sizes"] for p, note in s["program_notes"].items()}
        | {
            f"{p} one change: {note}"
            for s in summary["sizes"]
            for p, note in s["change_notes"].items()
        }
    )
    if notes:
        out += ["", "Notes:", *[f"- {n}" for n in notes]]
    out += ["", "## Targets (largest N of this run)", "", "| target | value | goal | verdict |"]
    out += ["|---|---:|---|---|"]
    for t in summary["targets"]:
        out.append(f"| {t['target']} | {_fmt(t['value'], '.3g')} | {t['goal']} | {t['verdict']} |")
    return "\n".join(out) + "\n"


def _bpf_section(per_size: list[dict[str, Any]]) -> list[str]:
    """tabby's programs per connection (the profile cells), and their split at the largest N."""
    paths = list(dict.fromkeys(p for s in per_size for p in s.get("bpf_ns_per_conn") or {}))
    if not paths:
        return []
    out = [
        "",
        "## tabby's BPF programs per connection",
        "",
        "Run time of every program of both nodes, per connection, from a profile cell with the "
        "kernel's BPF run-time stats on (one per repetition, median; not in the compared "
        "cells). Flat across N is the datapath's own cost not growing with the services "
        "programmed.",
        "",
        "| N | " + " | ".join(f"{p} ns" for p in paths) + " |",
        "|---:|" + "---:|" * len(paths),
    ]
    for s in per_size:
        ns = s.get("bpf_ns_per_conn") or {}
        out.append(f"| {s['services']:,} | " + " | ".join(_fmt(ns.get(p)) for p in paths) + " |")
    last = per_size[-1]
    out += ["", f"At N={last['services']:,}, per program: ns per run x runs per connection:", ""]
    for p, progs in (last.get("bpf_progs") or {}).items():
        split = ", ".join(f"{name} {v[0]:,.0f} x {v[1]:.1f}" for name, v in progs.items())
        out.append(f"- {p}: {split}")
    return out


Getter = Callable[[dict[str, Any]], Any]

FIGURES: tuple[tuple[str, str, Getter], ...] = (
    ("conn_rate", "new TCP connections/s (median)", lambda r: r["rate"]["median"]),
    ("conn_ratio", "conn/s ratio to own plain routing", lambda r: (r["ratio"] or {}).get("median")),
    ("latency_p50", "connect+first byte p50 µs (1 in flight)", lambda r: r["p50_us"]),
    ("latency_p99", "connect+first byte p99 µs (1 in flight)", lambda r: r["p99_us"]),
    ("cpu_per_conn", "whole-machine CPU µs per connection", lambda r: r["cpu_us_per_conn"]),
)


def _legend(ax: Any) -> None:
    """Beside the axes: never over a line, and no search for the emptiest corner (loc="best"
    costs a second of the report's time at 12 paths)."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plots(summary: dict[str, Any], out_dir: str) -> list[str]:
    """One PNG per figure vs N; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    sizes = sorted({r["services"] for r in rows})
    xs = {n: i for i, n in enumerate(sizes)}
    paths = list(dict.fromkeys(r["path"] for r in rows))
    written = []

    def save(fig: Any, name: str) -> None:
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    def axes(title: str) -> tuple[Any, Any]:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.set_title(title)
        ax.set_xticks(range(len(sizes)), [f"{n:,}" for n in sizes])
        ax.set_xlabel("services (x 3 endpoints)")
        ax.grid(alpha=0.3)
        return fig, ax

    for name, title, value in FIGURES:
        fig, ax = axes(title)
        for p in paths:
            pts = [(xs[r["services"]], value(r)) for r in rows if r["path"] == p]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                style = "-" if PATH_FAMILY.get(p) == "tabby" else "--"
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o", label=p)
        _legend(ax)
        save(fig, name)
    per_size = summary["sizes"]

    def per_path(
        ax: Any, by_path: Callable[[dict[str, Any]], dict[str, Any]], sort: bool = True
    ) -> None:
        """One line per path of a per-N figure (``by_path``: a size's {path: value}; sorted by
        name, or in the order met); a missing or zero value is no point."""
        paths = list(dict.fromkeys(k for s in per_size for k in by_path(s)))
        for p in sorted(paths) if sort else paths:
            pts = [(xs[s["services"]], by_path(s).get(p)) for s in per_size if s["services"] in xs]
            pts = [(x, y) for x, y in pts if y]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)

    fig, ax = axes("programming N services from scratch, s (log)")
    per_path(ax, lambda s: s["program_s"])
    ax.set_yscale("log")
    _legend(ax)
    save(fig, "program_seconds")
    fig, ax = axes("one endpoint change, ms, median (log)")
    per_path(ax, lambda s: {p: c["median"] for p, c in s["change"].items()})
    ax.set_yscale("log")
    _legend(ax)
    save(fig, "change_ms")
    if any(s.get("bpf_ns_per_conn") for s in per_size):
        # runs without tabby paths (or from before the profile cell) have none
        fig, ax = axes("tabby's BPF programs, ns per connection")
        per_path(ax, lambda s: s.get("bpf_ns_per_conn") or {}, sort=False)
        ax.set_ylim(bottom=0)
        _legend(ax)
        save(fig, "bpf_ns_per_conn")
    fig, ax = axes("agent resident memory, MB")
    pts = [
        (xs[s["services"]], s["agent_rss_mb"])
        for s in per_size
        if s["services"] in xs and s.get("agent_rss_mb") is not None
    ]
    if pts:
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label="tabby")
        _legend(ax)
    save(fig, "agent_rss")
    return written


def write(result: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """results.json, results.md and the PNGs into ``out_dir``; returns the summary."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:  # the raw run, kept if below fails
        json.dump(result, f, indent=1, sort_keys=True)
    summary = summarise(result)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({**result, "summary": summary}, f, indent=1, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(result, summary))
    plots(summary, out_dir)
    return summary

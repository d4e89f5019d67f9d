"""The bench report's arithmetic: ratios are taken within one repetition and against the path's
own denominator, medians and spread over repetitions, targets reported (met / MISSED / not
measured), and every output (markdown, PNGs) is produced from the run's JSON."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tabby.lab import benchreport, benchrun


def cell(n: int, rep: int, path: str, kind: str, rate: float, p99: int = 100) -> dict[str, Any]:
    return {
        "services": n,
        "rep": rep,
        "path": path,
        "kind": kind,
        "rate": rate,
        "conns": int(rate * 2),
        "p01_us": 10,
        "p50_us": 50,
        "p90_us": 90,
        "p99_us": p99,
        "errors": 0,
        "cpu_busy_pct": [100.0, 50.0],
        "cpu_us_per_conn": 100.0,
        "net_cpu_us_per_conn": 60.0,
    }


def run(cells: list[dict[str, Any]], sizes: list[dict[str, Any]]) -> dict[str, Any]:
    paths = list(dict.fromkeys(c["path"] for c in cells))
    return {
        "config": {
            "paths": paths,
            "sizes": sorted({c["services"] for c in cells}),
            "reps": 3,
            "seconds": 5.0,
            "latency_seconds": 2.0,
            "inflight": 32,
        },
        "machine": {
            "cpus": 2,
            "cpu_model": "test",
            "kernel": "6.18",
            "tools": {"nft": "nftables v1.0.6"},
            "shared": "shared",
        },
        "started": "2026-12-07T00:00:00Z",
        "duration_s": 1.0,
        "cells": cells,
        "sizes": sizes,
    }


def size(n: int, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "services": n,
        "program_s": {},
        "program_notes": {},
        "change_ms": {},
        "change_notes": {},
        "agent_rss_mb": None,
        "iperf_gbps": {},
    }
    base.update(kw)
    return base


def test_ratios_are_taken_within_a_repetition_against_the_own_denominator() -> None:
    # plain swings 2x between repetitions; nftables is always 0.8x of the plain of its rep
    cells = []
    for rep, plain in enumerate((10000.0, 20000.0, 15000.0)):
        for path, rate in (("plain", plain), ("nftables", plain * 0.8)):
            cells += [cell(1, rep, path, "rate", rate), cell(1, rep, path, "latency", 1000)]
        for path, rate in (("tabby-direct", 5000.0 + rep), ("tabby-nat", 5000.0 + rep)):
            cells += [cell(1, rep, path, "rate", rate), cell(1, rep, path, "latency", 1000)]
    summary = benchreport.summarise(run(cells, [size(1)]))
    rows = {r["path"]: r for r in summary["rows"]}
    assert rows["nftables"]["ratio"]["min"] == pytest.approx(0.8)
    assert rows["nftables"]["ratio"]["max"] == pytest.approx(0.8)
    assert rows["nftables"]["denominator"] == "plain"
    # the median of rates alone would give 12000/15000: not what is reported
    assert rows["nftables"]["rate"]["median"] == pytest.approx(12000.0)
    assert rows["tabby-nat"]["denominator"] == "tabby-direct"
    assert rows["tabby-nat"]["ratio"]["median"] == pytest.approx(1.0)
    assert rows["tabby-nat"]["ratio_to_plain"]["median"] == pytest.approx(5002.0 / 15000.0)  # rep 2
    assert rows["plain"]["ratio_to_plain"] is None


def test_targets_report_met_missed_and_not_measured() -> None:
    cells = []
    for n, nat in ((1, 1.0), (20000, 0.9)):
        for rep in range(2):
            cells += [
                cell(n, rep, "tabby-direct", "rate", 1000.0),
                cell(n, rep, "tabby-direct", "latency", 100.0, p99=100),
                cell(n, rep, "tabby-nat", "rate", 1000.0 * nat),
                cell(n, rep, "tabby-nat", "latency", 100.0, p99=105),
            ]
    sizes = [
        size(1),
        size(20000, program_s={"tabby": 0.8}, change_ms={"tabby": [2.0] * 99 + [30.0]}),
    ]
    verdicts = {
        t["target"]: t["verdict"] for t in benchreport.summarise(run(cells, sizes))["targets"]
    }
    assert verdicts["tabby-nat conn/s vs tabby-direct at N=20,000"] == "MISSED"
    assert verdicts["tabby-nat flat from N=1 to N=20,000 (ratio drift)"] == "MISSED"
    assert verdicts["tabby-nat p99 vs tabby-direct at N=20,000"] == "met"
    assert verdicts["tabby programs N=20,000 from scratch (s)"] == "met"
    # p99 of 100 samples is the worst one here: 30 ms misses the 10 ms target
    assert verdicts["tabby one endpoint change at N=20,000, p99 (ms)"] == "MISSED"
    assert verdicts["agent RSS at N=20,000 (MB)"] == "not measured"
    assert verdicts["tabby-ctlb conn/s vs tabby-direct at N=20,000"] == "not measured"


def test_dsr_throughput_is_a_ratio_per_repetition_then_the_median() -> None:
    """The machine's throughput swings between repetitions (plain here: 20 -> 10 -> 16 Gbit/s);
    DSR is judged against nodeport-plain of its own repetition, as conn/s is."""
    reps = {"nodeport-dsr": [19.0, 9.0, 16.5], "nodeport-plain": [20.0, 10.0, 16.0]}
    medians = {p: sorted(g)[1] for p, g in reps.items()}  # 16.5 / 16.0 if taken apart
    cells = [
        cell(n, 0, "nodeport-plain", k, 1000.0) for n in (1, 20000) for k in ("rate", "latency")
    ]
    sizes = [size(1), size(20000, iperf_gbps=medians, iperf_reps=reps)]
    targets = {t["target"]: t for t in benchreport.summarise(run(cells, sizes))["targets"]}
    got = targets["nodeport-dsr iperf3 vs nodeport-plain at N=20,000"]
    assert got["value"] == pytest.approx(0.95)  # 0.95, 0.90, 1.03
    assert got["verdict"] == "met"
    # a result written before the repetitions were kept: its medians
    sizes = [size(1), size(20000, iperf_gbps={"nodeport-dsr": 9.0, "nodeport-plain": 10.0})]
    targets = {t["target"]: t for t in benchreport.summarise(run(cells, sizes))["targets"]}
    assert targets["nodeport-dsr iperf3 vs nodeport-plain at N=20,000"]["value"] == 0.9


def test_outputs_are_written(tmp_path: Path) -> None:
    cells = []
    for n in (1, 1000):
        for path in ("plain", "iptables-legacy", "tabby-direct", "tabby-nat"):
            cells += [cell(n, 0, path, "rate", 1000.0), cell(n, 0, path, "latency", 900.0)]
    sizes = [
        size(1, program_s={"iptables-legacy": 0.1, "tabby": 0.2}, agent_rss_mb=60.0),
        size(
            1000,
            program_s={"iptables-legacy": 0.3, "tabby": 0.3},
            program_notes={"iptables-legacy": "a note"},
            change_ms={"tabby": [3.0, 4.0]},
            agent_rss_mb=70.0,
            iperf_gbps={"plain": 20.0},
        ),
    ]
    benchreport.write(run(cells, sizes), str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    assert "| 1,000 | iptables-legacy | 1,000 (1,000-1,000) | 1.00 (1.00-1.00) | - |" in md
    assert "- iptables-legacy: a note" in md
    assert "tabby 3.5 (4.0)" in md  # one change: median (p99)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(pngs) == len(benchreport.FIGURES) + 3
    assert all(os.path.getsize(tmp_path / p) > 1000 for p in pngs)
    assert (tmp_path / "results.json").stat().st_size > 0


def test_config_refuses_bad_input_naming_the_field() -> None:
    good = {"connload": "/bin/true"}
    with pytest.raises(benchrun.BenchError, match="paths: unknown"):
        benchrun.BenchConfig(paths=("plain", "ipvs"), **good).check()
    with pytest.raises(benchrun.BenchError, match="needs its denominator plain"):
        benchrun.BenchConfig(paths=("nftables",), **good).check()
    with pytest.raises(benchrun.BenchError, match="sizes"):
        benchrun.BenchConfig(sizes=(0,), **good).check()
    with pytest.raises(benchrun.BenchError, match="load generator"):
        benchrun.BenchConfig(connload="/nonexistent/connload").check()
    benchrun.BenchConfig.quick(**good).check()


def test_local_rows_are_taken_against_plain_and_checked_against_the_stretch_target() -> None:
    # the same shape as plain: tabby-local 1.3x of its repetition's plain, the stack path 0.9x
    cells = []
    for rep, plain in enumerate((10000.0, 20000.0, 15000.0)):
        for path, rate in (
            ("plain", plain),
            ("tabby-local", plain * 1.3),
            ("tabby-local-nat", plain * 1.1),
            ("tabby-local-stack", plain * 0.9),
        ):
            cells += [cell(1, rep, path, "rate", rate), cell(1, rep, path, "latency", 1000)]
    summary = benchreport.summarise(run(cells, [size(1)]))
    rows = {r["path"]: r for r in summary["rows"]}
    assert rows["tabby-local"]["denominator"] == "plain"
    assert rows["tabby-local"]["ratio"]["median"] == pytest.approx(1.3)
    assert rows["tabby-local-stack"]["ratio"]["median"] == pytest.approx(0.9)
    verdicts = {t["target"]: t["verdict"] for t in summary["targets"]}
    assert verdicts["tabby-local conn/s vs plain (same shape) at N=1"] == "met"
    assert verdicts["tabby-local-nat conn/s vs plain (same shape) at N=1"] == "MISSED"
    assert not any("tabby-local-ctlb" in t for t in verdicts)  # not measured in this run
    assert benchrun.PATH_REDIRECT["tabby-local-stack"] == "Disabled"


def test_bench_config_refuses_an_unknown_redirect_mode(tmp_path: Path) -> None:
    exe = tmp_path / "connload"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    cfg = benchrun.BenchConfig(connload=str(exe), redirect="L2Only")
    with pytest.raises(benchrun.BenchError, match="redirect: 'L2Only'"):
        cfg.check()
    cfg = benchrun.BenchConfig(connload=str(exe), paths=("tabby-local",))
    with pytest.raises(benchrun.BenchError, match="tabby-local needs its denominator plain"):
        cfg.check()


def needs(path: str) -> tuple[str | None, str | None]:
    return benchrun.PATH_REDIRECT.get(path), benchrun.EXT_MODES.get(path)


def test_paths_needing_a_live_switch_start_with_the_setting_in_place() -> None:
    # a switch reloads every agent (~2 s): the NodePort paths keep their slots, the one whose
    # mode is already set goes first; every other path keeps its rotated place
    order = ["nodeport-tunnel", "plain", "nodeport-dsr", "tabby-direct", "nodeport-plain"]
    got = benchrun.fewest_switches(order, needs, ("Enabled", "DSR"))
    assert got == ["nodeport-dsr", "plain", "nodeport-tunnel", "tabby-direct", "nodeport-plain"]
    assert benchrun.fewest_switches(order, needs, ("Enabled", "Tunnel")) == order
    # the stack path (bpfRedirectToPeer Disabled) waits while a NodePort mode fits
    order = ["tabby-local-stack", "nodeport-dsr", "nodeport-tunnel"]
    got = benchrun.fewest_switches(order, needs, ("Enabled", "Tunnel"))
    assert got == ["nodeport-tunnel", "tabby-local-stack", "nodeport-dsr"]
    assert benchrun.fewest_switches(["plain", "tabby-nat"], needs, ("Enabled", "DSR")) == [
        "plain",
        "tabby-nat",
    ]


def test_bpf_time_per_connection_is_tabled_plotted_and_judged_for_growth(tmp_path: Path) -> None:
    cells = []
    for n in (1, 20000):
        for path in ("tabby-direct", "tabby-nat"):
            cells += [cell(n, 0, path, "rate", 1000.0), cell(n, 0, path, "latency", 900.0)]
    progs = {"tby_from_wl": [1500.0, 6.0], "tby_to_wl": [400.0, 5.0]}
    sizes = [
        size(1, bpf_ns_per_conn={"tabby-direct": 9000.0, "tabby-nat": 10000.0}),
        size(
            20000,
            bpf_ns_per_conn={"tabby-direct": 9100.0, "tabby-nat": 11000.0},
            bpf_progs={"tabby-nat": progs},
        ),
    ]
    summary = benchreport.write(run(cells, sizes), str(tmp_path))
    verdicts = {t["target"]: (t["verdict"], t["value"]) for t in summary["targets"]}
    # 11,000 / 9,100 over 10,000 / 9,000: the translation's share grew by 8.8%
    verdict, drift = verdicts[
        "tabby-nat BPF time per connection over tabby-direct's, N=1 to N=20,000 (drift)"
    ]
    assert verdict == "MISSED" and drift == pytest.approx(11000 / 9100 / (10000 / 9000) - 1)
    md = (tmp_path / "results.md").read_text()
    assert "| N | tabby-direct ns | tabby-nat ns |" in md
    assert "| 20,000 | 9,100 | 11,000 |" in md
    assert "- tabby-nat: tby_from_wl 1,500 x 6.0, tby_to_wl 400 x 5.0" in md
    assert (tmp_path / "bpf_ns_per_conn.png").stat().st_size > 1000

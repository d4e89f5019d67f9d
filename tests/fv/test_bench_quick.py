"""`tabbyctl bench --quick` as a smoke test of the harness (no performance assertion): every path
is measured at both sizes with real connections and no failure, every output is written, and
nothing it created is left behind (lab, baseline namespaces, processes, pins)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tabby.bpf.objects import PIN_BASE
from tabby.lab import benchreport, benchrun, fabric, state

pytestmark = [pytest.mark.root, pytest.mark.lab]

TABBYCTL = os.path.join(os.path.dirname(sys.executable), "tabbyctl")


def test_quick_bench_measures_every_path_and_cleans_up(tmp_path: Path, root_caps: None) -> None:
    connload = benchrun.default_connload()
    if not os.access(connload, os.X_OK):
        pytest.fail(f"{connload} missing: `make test` builds it (make build/bench/connload)")
    name = "tq" + uuid.uuid4().hex[:6]
    out = subprocess.run(
        [TABBYCTL, "bench", "--quick", "--name", name, "--results", str(tmp_path), "-o", "json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout)
        paths = benchrun.DEFAULT_PATHS  # quick's two sizes are both ends: the local rows too
        for n in benchrun.QUICK_SIZES:
            for path in paths:
                for kind in ("rate", "latency"):
                    got = [
                        c
                        for c in result["cells"]
                        if (c["services"], c["path"], c["kind"]) == (n, path, kind)
                    ]
                    assert len(got) == 1, (n, path, kind)
                    assert got[0]["conns"] > 0 and got[0]["errors"] == 0, got[0]
        sizes = {s["services"]: s for s in result["sizes"]}
        assert sorted(sizes) == list(benchrun.QUICK_SIZES)
        big = sizes[benchrun.QUICK_SIZES[-1]]
        for path in ("iptables-legacy", "iptables-nft", "nftables", "tabby"):
            assert big["program_s"][path] is not None, path
        assert len(big["change_ms"]["tabby"]) == 3
        assert big["agent_rss_mb"] > 0
        assert set(big["iperf_gbps"]) == set(paths)
        assert all(g > 0 for g in big["iperf_gbps"].values())
        # the profile cell: the lab's programs found by their pinned links, run-time stats read
        tabby_paths = [p for p in paths if benchrun.PATH_FAMILY[p] != "kernel"]
        assert set(big["bpf_ns_per_conn"]) == set(tabby_paths)
        assert all(ns > 0 for ns in big["bpf_ns_per_conn"].values())
        for path in ("tabby-direct", "tabby-nat", "tabby-local"):
            ns_per_run, runs_per_conn = big["bpf_progs"][path]["tby_from_wl"]
            assert ns_per_run > 0 and runs_per_conn >= 2, (path, big["bpf_progs"][path])
        md = (tmp_path / "results.md").read_text()
        assert md.count("| 1,000 |") >= len(paths)
        assert "## tabby's BPF programs per connection" in md
        assert len(list(tmp_path.glob("*.png"))) == len(benchreport.FIGURES) + 4
        assert {t["target"] for t in result["summary"]["targets"]}
    finally:
        leftovers = fabric.lab_netns(f"{name}-") + fabric.lab_netns(f"{name}k-")
        pins = (
            [p for p in os.listdir(PIN_BASE) if p.startswith(f"{name}-")]
            if os.path.isdir(PIN_BASE)
            else []
        )
        lab_left = state.exists(name)
        if leftovers or pins or lab_left:
            subprocess.run([TABBYCTL, "lab", "down", "--name", name], capture_output=True)
            from tabby.lab import baselines

            baselines.down(f"{name}k")
        assert not leftovers and not pins and not lab_left, (leftovers, pins, lab_left)

"""`tabbyctl bench`: tabby against kube-proxy's iptables and nftables layouts, N services."""

from __future__ import annotations

import json
import os
import sys
import time

import typer


def _fail(msg: str) -> None:
    typer.secho(msg, fg="red", err=True)
    raise typer.Exit(1)


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x.replace("_", "")) for x in text.split(",") if x.strip())
    except ValueError:
        _fail(f"{what}: {text!r} is not a comma-separated list of integers")
        raise AssertionError from None  # unreachable: _fail exits


def bench(
    quick: bool = typer.Option(
        False, "--quick", help="N=1 and 1,000, one repetition, 2 s cells (< 2 minutes)"
    ),
    sizes: str = typer.Option("", help="services per step, e.g. 1,1000,20000 (default: full)"),
    reps: int = typer.Option(0, help="interleaved repetitions (default 3; --quick 1)"),
    seconds: float = typer.Option(0.0, help="per rate cell (default 3; --quick 2)"),
    latency_seconds: float = typer.Option(0.0, help="per latency cell (default 1; --quick 0.5)"),
    paths: str = typer.Option(
        "", help="comma-separated paths (default: all but tabby-local-stack)"
    ),
    redirect_to_peer: str = typer.Option(
        "Enabled",
        help="bpfRedirectToPeer for the tabby paths: Enabled or Disabled "
        "(tabby-local-stack is always Disabled)",
    ),
    name: str = typer.Option("tbench", help="lab name; baselines use <name>k-*"),
    results: str = typer.Option(
        "", help="results folder (default bench/results/<quick|full> under the current dir)"
    ),
    output: str = typer.Option("table", "--output", "-o", help="table (markdown) or json"),
) -> None:
    """Connections/s, latency, CPU per connection, throughput, programming time, one-change
    latency and agent memory: tabby's paths next to plain routing and kube-proxy's layouts.
    Writes results.md, results.json and one PNG per figure; removes all it created."""
    from tabby.lab import benchreport, benchrun

    if output not in ("table", "json"):
        _fail(f"--output must be table or json, not {output!r}")
    if os.geteuid() != 0:
        _fail("tabbyctl bench needs root (namespaces, rules, the lab)")
    kw: dict[str, object] = {
        "name": name,
        "connload": benchrun.default_connload(),
        "redirect": redirect_to_peer,
    }
    if sizes:
        kw["sizes"] = _ints(sizes, "--sizes")
    if reps:
        kw["reps"] = reps
    if seconds:
        kw["seconds"] = seconds
    if latency_seconds:
        kw["latency_seconds"] = latency_seconds
    if paths:
        kw["paths"] = tuple(p.strip() for p in paths.split(",") if p.strip())
    cfg = benchrun.BenchConfig.quick(**kw) if quick else benchrun.BenchConfig(**kw)  # type: ignore[arg-type]
    try:
        cfg.check()
    except benchrun.BenchError as e:
        _fail(str(e))
    out_dir = results or os.path.join("bench", "results", "quick" if quick else "full")

    def progress(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)

    try:
        result = benchrun.Runner(cfg, progress).run().to_json()
    except benchrun.BenchError as e:
        _fail(f"bench failed (everything it created was removed): {e}")
    except KeyboardInterrupt:
        _fail("bench interrupted (everything it created was removed)")
    summary = benchreport.write(result, out_dir)
    progress(f"results in {out_dir}/ (results.md, results.json, *.png)")
    if result["error"]:
        _fail(f"bench stopped early (what it measured is in {out_dir}/): {result['error']}")
    if output == "json":
        json.dump({**result, "summary": summary}, sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(benchreport.markdown(result, summary))

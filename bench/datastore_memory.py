#!/usr/bin/env python3
"""Bench: where an agent's memory goes when it lists 20,000 services, per datastore client.

What bench/agent_scale.py reports as one RSS figure, taken apart. One store per datastore is
filled with agent_scale's cluster (N services x 3 endpoints, 1,000 pods): ``embedded`` (a SQLite
file in a temporary directory), ``etcd`` (a private etcd on 127.0.0.1, stopped by PID),
``kubernetes`` (tests/fakeapi in this process, on 127.0.0.1) and ``typha`` (``tabby typha``
over the embedded file, a process on 127.0.0.1). Then, per datastore and repetition, a fresh
probe process (this file with ``--probe URL``) does what the agent does with its datastore and
nothing else (no BPF, no netlink): it imports the agent's modules, opens the datastore, lists
every kind as ``Agent._relist`` does (Services and EndpointSlices streamed into a
``ServiceIndex``, packed), frees and trims the heap as the agent does, and starts the watch.
It reports its RSS after each step, anonymous and file-backed apart
(/proc/self/status RssAnon/RssFile), and with ``--tracemalloc`` the Python allocations still
live at the end, by file and by line (tracemalloc's own overhead is in that run's RSS).

Nothing leaves 127.0.0.1; every process started is stopped by PID, the directory removed.

Usage (root not needed): .venv/bin/python bench/datastore_memory.py [--services 20000]
    [--datastores embedded etcd kubernetes typha] [--reps 3] [--tracemalloc]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def _rss() -> dict[str, float]:
    out: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _heap_free_mib() -> float:
    """Free bytes glibc keeps in its heaps (main arena and the threads'), after a trim: what
    malloc_trim could not return (fragments between live blocks)."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return float("nan")
    fn.restype = _MallInfo2
    info = fn()
    return round(int(info.fordblks) / 2**20, 1)


def _pymalloc_free_mib() -> float:
    """Free space inside pymalloc's arenas (blocks and pools not in use), from
    sys._debugmallocstats (written to stderr: read through a pipe)."""
    read, write = os.pipe()
    saved = os.dup(2)
    os.dup2(write, 2)
    try:
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(write)
        os.close(saved)
    with os.fdopen(read) as f:
        text = f.read()
    free = 0  # available blocks, unused pools: pymalloc space no live object uses
    for line in text.splitlines():
        if line.startswith("# bytes in available blocks") or "unused pools *" in line:
            free += int(line.rsplit("=", 1)[1].replace(",", "").strip())
    return round(free / 2**20, 1)


def probe(url: str, trace: bool) -> None:
    """The agent's datastore work only, in this (fresh) process; one JSON line on stdout."""
    steps: list[tuple[str, dict[str, float]]] = [("start", _rss())]
    if trace:
        import tracemalloc

        tracemalloc.start(1)
    import gc

    import tabby.agent as agent
    from tabby.calc.services import ServiceIndex
    from tabby.datastore import open_datastore
    from tabby.datastore.api import StreamingList

    steps.append(("agent imports", _rss()))
    ds = open_datastore(url)
    steps.append(("client open", _rss()))
    index = ServiceIndex("node1")
    resources: dict[str, dict[tuple[str, str], Any]] = {}
    revision = ds.revision()
    for kind in agent.KINDS:  # as Agent._relist
        if kind in agent.SERVICE_KINDS:
            on = index.on_service if kind == "Service" else index.on_slice
            stream = ds.iter_list(kind) if isinstance(ds, StreamingList) else ds.list(kind)[0]
            for obj in stream:
                on(agent._key(obj), obj)
            continue
        items, _ = ds.list(kind)
        resources[kind] = {agent._key(o): o for o in items}
    steps.append(("listed", _rss()))
    gc.collect()
    agent._give_back_heap()
    steps.append(("trimmed", _rss()))
    free = {"glibc_free_mib": _heap_free_mib(), "pymalloc_free_mib": _pymalloc_free_mib()}
    stop = threading.Event()

    def watch() -> None:
        for _ in ds.watch(revision, stop=stop):
            pass

    threading.Thread(target=watch, daemon=True).start()
    time.sleep(2.0)
    steps.append(("watching", _rss()))
    result: dict[str, Any] = {"steps": steps, **free}
    if trace:
        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        result["by_file"] = [
            (str(s.traceback), round(s.size / 2**20, 2), s.count)
            for s in snap.statistics("filename")[:15]
        ]
        result["by_line"] = [
            (str(s.traceback), round(s.size / 2**20, 2), s.count)
            for s in snap.statistics("lineno")[:20]
        ]
        result["traced_mib"] = round(sum(s.size for s in snap.statistics("filename")) / 2**20, 1)
    stop.set()
    print(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # the watch thread and the client's loop need no orderly goodbye here


def _plan_objects(n_services: int, n_pods: int) -> list[dict[str, Any]]:
    sys.path.insert(0, str(REPO / "bench"))
    from agent_scale import dataset

    from tabby.lab.topology import plan

    return dataset(plan("dsmem", nodes=1), n_services, n_pods)


def run_probe(url: str, trace: bool) -> dict[str, Any]:
    argv = [PYTHON, __file__, "--probe", url] + (["--tracemalloc"] if trace else [])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"probe failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=20_000)
    ap.add_argument("--pods", type=int, default=1_000)
    ap.add_argument(
        "--datastores", nargs="+", default=["embedded", "etcd", "kubernetes", "typha"],
        choices=["embedded", "etcd", "kubernetes", "typha"],
    )  # fmt: skip
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tracemalloc", action="store_true", help="one more run, traced")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        probe(args.probe, args.tracemalloc)
        return

    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO / "bench"))
    import benchlib
    from agent_scale import _wire
    from fakeapi import FakeApiServer

    from tabby.datastore import open_datastore
    from tabby.lab import etcd, processes

    objs = _plan_objects(args.services, args.pods)
    work = tempfile.mkdtemp(prefix="tabby-dsmem-")
    stoppers: list[Any] = []
    urls: dict[str, str] = {}
    try:
        db = f"sqlite://{work}/store.db"
        if {"embedded", "typha"} & set(args.datastores):
            benchlib.store(open_datastore(db), objs)
            urls["embedded"] = db
        if "etcd" in args.datastores:
            client, peer = etcd.free_port(), etcd.free_port()
            rec = processes.spawn(
                etcd.argv(f"{work}/etcd", client, peer), "dsmem etcd", f"{work}/etcd.log", cwd=work
            )
            stoppers.append(lambda rec=rec: processes.stop(rec))
            url = f"etcd://127.0.0.1:{client}"
            etcd.wait_ready(url, alive=lambda: processes.alive(rec))
            ds = open_datastore(url)
            benchlib.store(ds, objs)
            ds.close()
            urls["etcd"] = url
        if "kubernetes" in args.datastores:
            api = FakeApiServer().start()
            stoppers.append(api.stop)
            api.load([_wire(o) for o in objs])
            urls["kubernetes"] = f"kubernetes://{api.kubeconfig(Path(work) / 'kubeconfig')}"
        if "typha" in args.datastores:
            port = etcd.free_port()
            argv = [str(REPO / ".venv/bin/tabby"), "typha", "--datastore", db]
            rec = processes.spawn(
                argv + ["--listen", f"127.0.0.1:{port}"], "dsmem typha", f"{work}/typha.log"
            )
            stoppers.append(lambda rec=rec: processes.stop(rec))
            urls["typha"] = f"typha://127.0.0.1:{port}"
            time.sleep(5.0)  # its own list of the store
        for name in args.datastores:
            for rep in range(args.reps):
                res = run_probe(urls[name], False)
                load = os.getloadavg()[0]
                print(
                    f"{name} #{rep + 1} (load {load:.1f}): "
                    + " | ".join(
                        f"{step} {m['VmRSS']:.0f} (anon {m['RssAnon']:.0f} file {m['RssFile']:.0f})"
                        for step, m in res["steps"]
                    )
                    + f" | peak {res['steps'][-1][1]['VmHWM']:.0f} MiB; free after the trim:"
                    + f" glibc {res['glibc_free_mib']} MiB, pymalloc {res['pymalloc_free_mib']} MiB"
                )
            if args.tracemalloc:
                res = run_probe(urls[name], True)
                print(f"{name} traced: {res['traced_mib']} MiB live in Python allocations")
                for where, mib, count in res["by_file"]:
                    print(f"   {mib:7.2f} MiB {count:8d}  {where}")
                for where, mib, count in res["by_line"]:
                    print(f"   {mib:7.2f} MiB {count:8d}  {where}")
    finally:
        for stop in reversed(stoppers):
            stop()
        subprocess.run(["rm", "-rf", work], check=False)


if __name__ == "__main__":
    main()

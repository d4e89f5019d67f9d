#!/usr/bin/env python3
"""Bench: one BPF conntrack sweep (tby_ct_gc) over a million-entry tby_ct.

Loads build/bpf/ct_gc.o alone on a pin root of its own (/sys/fs/bpf/tabby/bench-<id>, removed
after, even on failure) with tby_ct resized to hold the entries, fills it with NAT pairs by batch
updates (TCP established and UDP, half of every kind expired; 1024 frontends of 8 backends each, so
every kept UDP pair pays the stale-backend scan), and measures:

  sweep, half expired      the case the agent meets: deletes half the map
  sweep, none expired      the same number of entries, all kept (steady state)
  python batch read        Map.lookup_batch() of the same map: what a user-space GC would pay
                           before judging a single entry (the baseline of the ratio)

CPU is the calling thread's (time.thread_time: the kernel walk is charged to it); "prog" is the
kernel's own measure of the program run (BPF_PROG_TEST_RUN duration). Target: a full sweep of
1,048,576 entries under 1 CPU-second.

Usage (root): .venv/bin/python bench/ct_gc_sweep.py [--entries N]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import struct
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tabby.bpf import libbpf
from tabby.bpf.maps.conntrack import CONNTRACK_SPEC, CtKey, CtType, CtValue, TcpFlags
from tabby.bpf.maps.nat import (
    BACKENDS_SPEC,
    FRONTENDS_SPEC,
    BackendKey,
    BackendValue,
    FrontendKey,
    FrontendValue,
)
from tabby.bpf.objects import PIN_BASE, DatapathConfig, default_bpf_dir
from tabby.dataplane.conntrack import ConntrackGC, GcStats

ADVANCE_S = 3700  # the sweep judges this far ahead, so "idle 3601 s" needs no hour of uptime
SERVICES = 1024
BACKENDS_PER_SERVICE = 8
CHUNK = 65536
TCP, UDP = 6, 17

_KEY = struct.Struct(">IIHHB3x")
_VAL_HEAD = struct.Struct("<QQBBH")
_VAL_NAT = struct.Struct(">IHHI")


@dataclass
class Row:
    case: str
    entries: int
    deleted: int
    wall_s: float
    cpu_s: float
    prog_s: float | None


def frontend(service: int, proto: int) -> tuple[int, int]:
    return 0x0A600000 + service, 80 if proto == TCP else 53  # 10.96.x.y


def backend(service: int, ordinal: int) -> tuple[int, int]:
    return 0x64400000 + service * 16 + ordinal, 8080  # 100.64.x.y


def install_services(obj: libbpf.Object) -> None:
    fe, be = FRONTENDS_SPEC.open_in(obj), BACKENDS_SPEC.open_in(obj)
    fkeys, fvals, bkeys, bvals = [], [], [], []
    for s in range(SERVICES):
        for i, proto in enumerate((TCP, UDP)):
            set_id = 2 * s + i + 1
            addr, port = frontend(s, proto)
            fkeys.append(FrontendKey(addr=addr, port=port, proto=proto))
            fvals.append(FrontendValue(set_id, BACKENDS_PER_SERVICE))
            for b in range(BACKENDS_PER_SERVICE):
                baddr, bport = backend(s, b)
                bkeys.append(BackendKey(set_id, b))
                bvals.append(BackendValue(addr=baddr, port=bport))
    be.update_batch(bkeys, bvals)
    fe.update_batch(fkeys, fvals)


def pairs(first: int, count: int, judged_ns: int, expire: bool | None) -> tuple[Any, Any]:
    """Keys and values of ``count`` pairs from pair number ``first`` (2 entries each).

    expire None: every other pair of each protocol idle past its timeout; True/False: all/none.
    """
    n = 2 * count
    keys = (CtKey * n)()
    vals = (CtValue * n)()
    kbuf, vbuf = memoryview(keys).cast("B"), memoryview(vals).cast("B")
    ks, vs = ctypes.sizeof(CtKey), ctypes.sizeof(CtValue)
    syn, est = int(TcpFlags.SYN), int(TcpFlags.SYN | TcpFlags.SYNACK)
    for j in range(count):
        p = first + j
        proto = TCP if p % 2 == 0 else UDP
        old = (p // 2) % 2 == 0 if expire is None else expire
        idle_s = (3601 if proto == TCP else 61) if old else 1
        seen = judged_ns - idle_s * 1_000_000_000
        svc, ordinal = p % SERVICES, (p // SERVICES) % BACKENDS_PER_SERVICE
        client, cport = 0x0A000000 + p, 40000 + p % 20000
        fe_addr, fe_port = frontend(svc, proto)
        be_addr, be_port = backend(svc, ordinal)
        i = 2 * j
        _KEY.pack_into(kbuf, i * ks, client, fe_addr, cport, fe_port, proto)
        _VAL_HEAD.pack_into(vbuf, i * vs, seen - 10**9, seen, CtType.NAT_FWD, syn, 0)
        _VAL_NAT.pack_into(vbuf, i * vs + 20, be_addr, be_port, 0, 0)
        _KEY.pack_into(kbuf, (i + 1) * ks, client, be_addr, cport, be_port, proto)
        _VAL_HEAD.pack_into(vbuf, (i + 1) * vs, seen - 10**9, seen, CtType.NAT_REV, est, 0)
        _VAL_NAT.pack_into(vbuf, (i + 1) * vs + 20, fe_addr, fe_port, 0, 0)
    return keys, vals


def fill(ct: libbpf.Map[Any, Any], first_pair: int, n_pairs: int, expire: bool | None) -> None:
    judged = time.monotonic_ns() + ADVANCE_S * 10**9
    step = CHUNK // 2
    for first in range(first_pair, first_pair + n_pairs, step):
        keys, vals = pairs(first, min(step, first_pair + n_pairs - first), judged, expire)
        ct.update_batch(keys, vals)


def measure(case: str, fn: Callable[[], tuple[int, int, float | None]]) -> Row:
    wall0, cpu0 = time.monotonic(), time.thread_time()
    entries, deleted, prog_s = fn()
    return Row(case, entries, deleted, time.monotonic() - wall0, time.thread_time() - cpu0, prog_s)


def run(entries: int) -> list[Row]:
    if os.geteuid() != 0:
        sys.exit("needs root (BPF maps and BPF_PROG_TEST_RUN)")
    path = default_bpf_dir() / "ct_gc.o"
    if not path.is_file():
        sys.exit(f"{path} missing: run `make bpf`")
    made_base = not os.path.isdir(PIN_BASE)
    pin_root = f"{PIN_BASE}/bench-{uuid.uuid4().hex[:8]}"
    os.makedirs(pin_root, mode=0o700)
    obj = libbpf.Object(str(path), pin_root=pin_root)
    try:
        obj.set_rodata(DatapathConfig.build())
        # LRU lists keep per-CPU free slots: leave room so that filling never evicts
        obj.set_max_entries(CONNTRACK_SPEC.name, entries + entries // 8)
        obj.load()
        ct = CONNTRACK_SPEC.open_in(obj)
        gc = ConntrackGC.of_object(obj)
        install_services(obj)
        rows: list[Row] = []

        def timed_sweep(expect_deleted: int) -> tuple[int, int, float | None]:
            st: GcStats
            ctx = libbpf.SkBuffCtx()
            ctx.cb[0] = ADVANCE_S
            _, _, prog_ns = libbpf.test_run(gc.prog_fd, bytes(64), ctx)
            st = _read(gc)
            assert st.kept + st.deleted == entries, st
            assert st.deleted == expect_deleted, (st.deleted, expect_deleted)
            return entries, st.deleted, prog_ns / 1e9

        t0 = time.monotonic()
        fill(ct, 0, entries // 2, None)
        setup_s = time.monotonic() - t0
        assert _count(ct) == entries, "the fill was evicted from: enlarge the map"
        rows.append(measure("sweep, half expired", lambda: timed_sweep(entries // 2)))
        fill(ct, 0, entries // 2, False)  # the deleted half again, fresh: the map full again
        assert _count(ct) == entries
        rows.append(measure("sweep, none expired", lambda: timed_sweep(0)))
        rows.append(measure("python batch read", lambda: (len(ct.lookup_batch()), 0, None)))
        print(f"(fill of {entries} entries by batch updates: {setup_s:.1f} s, not measured)")
        return rows
    finally:
        obj.close()
        shutil.rmtree(pin_root, ignore_errors=True)
        if made_base:
            shutil.rmtree(PIN_BASE, ignore_errors=True)


def _read(gc: ConntrackGC) -> GcStats:
    st = gc.stats_map.lookup(ctypes.c_uint32(0))
    assert st is not None
    return GcStats(st.scanned, st.kept, st.expired, st.stale_udp, st.orphans, 0.0, 0.0)


def _count(ct: libbpf.Map[Any, Any]) -> int:
    return len(ct.lookup_batch(chunk=CHUNK))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1 << 20)
    args = ap.parse_args()
    if args.entries % 4:
        sys.exit("--entries must be a multiple of 4 (pairs of two protocols)")
    rows = run(args.entries)
    base = rows[-1]
    print(f"{'case':<22} {'entries':>9} {'deleted':>8} {'wall s':>7} {'cpu s':>7} "
          f"{'prog s':>7} {'ns/entry':>8} {'cpu vs read':>11}")  # fmt: skip
    for r in rows:
        prog = f"{r.prog_s:7.3f}" if r.prog_s is not None else f"{'-':>7}"
        print(
            f"{r.case:<22} {r.entries:>9} {r.deleted:>8} {r.wall_s:7.3f} {r.cpu_s:7.3f} {prog} "
            f"{r.cpu_s / r.entries * 1e9:8.0f} {r.cpu_s / base.cpu_s:10.3f}x"
        )
    worst = max(r.cpu_s for r in rows[:2])
    print(f"target: a full sweep under 1 CPU-second: {'met' if worst < 1.0 else 'MISSED'} "
          f"(worst {worst:.3f} s)")  # fmt: skip


if __name__ == "__main__":
    main()

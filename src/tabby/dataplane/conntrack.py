"""Conntrack garbage collection and reading, for the agent and the CLI.

The sweep itself is BPF (``bpf/ct_gc.c``, program ``tby_ct_gc``): one BPF_PROG_TEST_RUN walks the
whole ``tby_ct`` map in the kernel, deletes expired pairs and stale UDP flows, and leaves its counts
in ``tby_ct_gc_st``. Python only triggers it and reads the result, so a sweep of a million
entries costs no per-entry syscall and no Python loop.

Invariants:
- a NAT pair is deleted whole (both halves in the same visit), never half of it;
- sweeps and NAT applies are serialised by the caller (the agent's one dataplane thread): the
  stale-UDP check reads frontend/backends and must not see a half-written backend set;
- nothing here flushes conntrack: only what the BPF rules judge expired or stale goes.
"""

from __future__ import annotations

import ctypes
import ipaddress
import time
from dataclasses import dataclass
from typing import Any

from tabby.bpf import libbpf
from tabby.bpf.maps.conntrack import CONNTRACK_SPEC, CtEntry, CtKey, CtType, CtValue
from tabby.bpf.maps.ctgc import CT_GC_STATS_SPEC, CtGcStats
from tabby.bpf.maps.nat import PROTOCOLS
from tabby.bpf.objects import DatapathObjects

PROGRAM = "tby_ct_gc"
_DUMMY_FRAME = bytes(64)  # test_run wants a frame (>= 14 bytes); the program never reads it


class SweepError(RuntimeError):
    """The sweep program ran but reported a failed walk."""


@dataclass(frozen=True)
class GcStats:
    """One sweep: counts in entries (halves) and what it cost the calling thread."""

    scanned: int
    kept: int
    expired: int
    stale_udp: int
    orphans: int  # of expired: halves whose partner was already gone
    wall_s: float
    cpu_s: float  # thread CPU time: the kernel walk is charged to the caller

    @property
    def deleted(self) -> int:
        return self.expired + self.stale_udp


class ConntrackGC:
    """Runs ``tby_ct_gc`` on a node's pinned maps and reads back what it did."""

    def __init__(self, prog_fd: int, stats_map: libbpf.Map[Any, Any]) -> None:
        self.prog_fd = prog_fd
        self.stats_map = stats_map

    @classmethod
    def of(cls, objects: DatapathObjects) -> ConntrackGC:
        """The sweeper of loaded datapath objects (their fds: rebuild it after a reload)."""
        return cls(objects.prog_fd(PROGRAM), objects.map(CT_GC_STATS_SPEC))

    @classmethod
    def of_object(cls, obj: libbpf.Object) -> ConntrackGC:
        """The sweeper of ct_gc.o loaded alone on a pin root (benches, tests)."""
        return cls(obj.prog_fd(PROGRAM), CT_GC_STATS_SPEC.open_in(obj))

    def sweep(self, advance_s: int = 0) -> GcStats:
        """One full sweep; ``advance_s`` judges entries as that many seconds later (tests)."""
        ctx = libbpf.SkBuffCtx()
        ctx.cb[0] = advance_s
        wall0, cpu0 = time.monotonic(), time.thread_time()
        retval, _, _ = libbpf.test_run(self.prog_fd, _DUMMY_FRAME, ctx)
        cpu_s, wall_s = time.thread_time() - cpu0, time.monotonic() - wall0
        if retval != libbpf.TC_ACT_OK:
            raise SweepError(f"{PROGRAM} returned {retval}: the conntrack walk failed")
        st = self.stats_map.lookup(ctypes.c_uint32(0))
        if st is None:  # an array slot always exists; this would be a broken map
            raise SweepError(f"{CT_GC_STATS_SPEC.name}: no slot 0")
        assert isinstance(st, CtGcStats)
        return GcStats(
            scanned=st.scanned,
            kept=st.kept,
            expired=st.expired,
            stale_udp=st.stale_udp,
            orphans=st.orphans,
            wall_s=wall_s,
            cpu_s=cpu_s,
        )

    @staticmethod
    def entries(objects: DatapathObjects, **match: Any) -> list[CtEntry]:
        """``read_entries`` over the objects' ``tby_ct``, same filters."""
        return read_entries(objects.map(CONNTRACK_SPEC), **match)


def read_entries(
    ct_map: libbpf.Map[Any, Any],
    *,
    proto: str | None = None,
    addr: str | None = None,
    port: int | None = None,
    kind: CtType | None = None,
    now_ns: int | None = None,
) -> list[CtEntry]:
    """Decode every entry of a ``tby_ct`` map (one batch dump, no per-key syscall), sorted by key.

    Filters: ``proto`` ("TCP"/"UDP"), ``addr`` (matches the key's source or destination or the
    NAT address), ``port`` (likewise), ``kind`` (FWD/REV). Ages are against CLOCK_MONOTONIC,
    which is what bpf_ktime_get_ns() reads.
    """
    now = time.monotonic_ns() if now_ns is None else now_ns
    proto_n = PROTOCOLS[proto.upper()] if proto is not None else None
    addr_n = int(ipaddress.IPv4Address(addr)) if addr is not None else None
    out = []
    for key, val in ct_map.lookup_batch():
        if not _matches(key, val, proto_n, addr_n, port, kind):
            continue
        order = (key.proto, key.src, key.sport, key.dst, key.dport, val.type)
        out.append((order, CtEntry.decode(key, val, now)))
    out.sort(key=lambda kv: kv[0])
    return [entry for _, entry in out]


def _matches(
    key: CtKey,
    val: CtValue,
    proto: int | None,
    addr: int | None,
    port: int | None,
    kind: CtType | None,
) -> bool:
    if proto is not None and key.proto != proto:
        return False
    if kind is not None and val.type != kind:
        return False
    if addr is not None and addr not in (key.src, key.dst, val.nat_addr, val.nat_saddr):
        return False
    return port is None or port in (key.sport, key.dport, val.nat_port, val.nat_sport)

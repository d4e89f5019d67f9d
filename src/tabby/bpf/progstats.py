"""How long a node's programs ran, and how often (BPF_ENABLE_STATS run_time_ns / run_cnt).

The programs are found by the links a node's agent pinned: tcx links under ``<pin root>/links``
and the connect-time LB's cgroup links under ``<pin root>/ctlb``; a program attached to many
interfaces (to-workload on every pod's veth) is one program, counted once. The kernel counts
only while someone holds BPF_ENABLE_STATS (``RunTimeStats``), at the price of two clock reads
per run: a benchmark measures with it in a cell of its own, not in the cells it compares.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

from tabby.bpf import libbpf

# a node's pinned links, under its pin root: the tc/tcx attachments (dataplane/attach.py) and
# the cgroup hooks of connect-time LB (dataplane/ctlb.py); named once, here
TC_LINKS_DIR = "links"
CTLB_LINKS_DIR = "ctlb"
LINK_DIRS = (TC_LINKS_DIR, CTLB_LINKS_DIR)


@dataclass(frozen=True)
class ProgRun:
    """One program's totals since it was loaded (counted only while stats were on)."""

    name: str
    run_time_ns: int
    run_cnt: int


def pinned_program_ids(pin_roots: Iterable[str]) -> set[int]:
    """Ids of the programs behind the links pinned under these pin roots."""
    ids: set[int] = set()
    for root in pin_roots:
        for sub in LINK_DIRS:
            d = os.path.join(root, sub)
            if not os.path.isdir(d):
                continue
            for entry in sorted(os.listdir(d)):
                path = os.path.join(d, entry)
                if not os.path.isfile(path):
                    continue
                with contextlib.suppress(OSError):  # a link unpinned meanwhile
                    fd = libbpf.obj_get(path)
                    try:
                        ids.add(libbpf.link_prog_id(fd))
                    finally:
                        os.close(fd)
    return ids


def sample(prog_ids: Iterable[int]) -> dict[int, ProgRun]:
    """Each program's totals now; a program unloaded meanwhile is left out."""
    out: dict[int, ProgRun] = {}
    for pid in prog_ids:
        try:
            fd = libbpf.prog_get_fd_by_id(pid)
        except OSError:
            continue
        try:
            out[pid] = ProgRun(*libbpf.prog_run_stats(fd))
        finally:
            os.close(fd)
    return out


def delta_by_name(before: dict[int, ProgRun], after: dict[int, ProgRun]) -> dict[str, ProgRun]:
    """What ran between two samples, summed per program name (one per node and entry point)."""
    out: dict[str, ProgRun] = {}
    for pid, a in after.items():
        b = before.get(pid, ProgRun(a.name, 0, 0))
        prev = out.get(a.name, ProgRun(a.name, 0, 0))
        out[a.name] = ProgRun(
            a.name,
            prev.run_time_ns + a.run_time_ns - b.run_time_ns,
            prev.run_cnt + a.run_cnt - b.run_cnt,
        )
    return {k: v for k, v in out.items() if v.run_cnt}


class RunTimeStats:
    """Holds BPF_ENABLE_STATS(BPF_STATS_RUN_TIME) while open."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def __enter__(self) -> RunTimeStats:
        self.fd = libbpf.enable_run_time_stats()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

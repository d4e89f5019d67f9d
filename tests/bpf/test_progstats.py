"""BPF run-time stats (bpf/progstats.py): counted while RunTimeStats is held, read per program
and summed per name; the bench's profile cell reads them this way."""

from __future__ import annotations

import packets as P

from tabby.bpf import libbpf, progstats
from tabby.bpf.objects import DatapathObjects

RUNS = 50


def _stats_enabled_by_sysctl() -> bool:
    with open("/proc/sys/kernel/bpf_stats_enabled") as f:
        return f.read().strip() != "0"


def test_runs_are_counted_while_stats_are_held(datapath: DatapathObjects) -> None:
    fd = datapath.prog_fd("tby_from_wl")
    prog_id, name = libbpf.prog_info(fd)
    frame = P.tcp()
    with progstats.RunTimeStats():
        before = progstats.sample([prog_id])
        libbpf.test_run(fd, frame, repeat=RUNS)
        after = progstats.sample([prog_id])
    runs = progstats.delta_by_name(before, after)
    assert list(runs) == [name] == ["tby_from_wl"]
    assert runs[name].run_cnt == RUNS
    assert runs[name].run_time_ns > 0
    if not _stats_enabled_by_sysctl():  # nobody else holds them: the counting stopped
        libbpf.test_run(fd, frame, repeat=RUNS)
        assert progstats.sample([prog_id])[prog_id] == after[prog_id]


def test_a_program_unloaded_meanwhile_is_left_out(datapath: DatapathObjects) -> None:
    prog_id, _ = libbpf.prog_info(datapath.prog_fd("tby_from_wl"))
    gone = max(prog_id, 1) + 10_000_000  # ids are never reused this far ahead
    assert set(progstats.sample([prog_id, gone])) == {prog_id}


def test_no_pinned_links_no_programs(pin_root: str) -> None:
    assert progstats.pinned_program_ids([pin_root, "/nonexistent/pin/root"]) == set()

"""The agent's conntrack sweep schedule: every CT_SWEEP_S, and at once after backends left.

The dataplane is a stand-in (the sweep itself is tested under BPF_PROG_TEST_RUN in
tests/bpf/test_ct_gc.py); what is checked here is when the worker sweeps and what it exports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import generate_latest

from tabby import agent
from tabby.dataplane.conntrack import GcStats


@dataclass
class _Nat:
    udp_backends_removed: bool = False


@dataclass
class _Dataplane:
    last_nat: _Nat = field(default_factory=_Nat)
    sweeps: int = 0

    def sweep_conntrack(self) -> GcStats:
        self.sweeps += 1
        return GcStats(
            scanned=12, kept=8, expired=2, stale_udp=2, orphans=0, wall_s=0.002, cpu_s=0.002
        )


def _worker(dp: Any) -> agent.DataplaneWorker:
    status = agent.Status(node="n1")
    w = agent.DataplaneWorker("n1", None, "/nonexistent", None, 0, status, agent.Metrics(status))
    w.dataplane = dp
    w.apply_tried = dp is not None  # a worker sweeps only once it has applied a state
    return w


def test_sweeps_on_period_and_after_backend_removal(monkeypatch: Any) -> None:
    now = [1000.0]
    monkeypatch.setattr(agent.time, "monotonic", lambda: now[0])
    dp = _Dataplane()
    w = _worker(dp)
    w._sweep_conntrack()
    assert dp.sweeps == 1  # first one at once
    now[0] += agent.CT_SWEEP_S / 2
    w._sweep_conntrack()
    assert dp.sweeps == 1
    assert w._until_sweep() == agent.CT_SWEEP_S / 2
    dp.last_nat = _Nat(udp_backends_removed=True)  # an apply took backends out of a UDP port
    w._sweep_conntrack()
    w._sweep_conntrack()  # the same apply result does not trigger twice
    assert dp.sweeps == 2
    now[0] += agent.CT_SWEEP_S
    w._sweep_conntrack()
    assert dp.sweeps == 3


def test_no_sweep_and_no_timeout_before_the_dataplane_exists() -> None:
    w = _worker(None)
    w._sweep_conntrack()
    assert w._until_sweep() is None


def test_a_prepared_worker_does_not_sweep_before_its_first_apply() -> None:
    """The datapath is loaded while the first state is computed: nothing to sweep yet."""
    dp = _Dataplane()
    w = _worker(dp)
    w.apply_tried = False
    w._sweep_conntrack()
    assert dp.sweeps == 0


def test_sweep_metrics() -> None:
    w = _worker(_Dataplane())
    w._sweep_conntrack()
    w.next_sweep = 0.0  # due again
    w._sweep_conntrack()
    text = generate_latest(w.metrics.registry).decode()
    assert "tabby_conntrack_entries 8.0" in text
    assert 'tabby_conntrack_cleaned_total{reason="expired"} 4.0' in text
    assert 'tabby_conntrack_cleaned_total{reason="stale_udp"} 4.0' in text
    assert "tabby_conntrack_sweep_seconds_count 2.0" in text

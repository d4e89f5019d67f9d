"""The dataplane worker's apply errors in the log: when they change, then once a minute while
they stay (a refused bpfMapSize* is retried every second), and once when they clear."""

from __future__ import annotations

import logging

import pytest

from tabby.agent import ApplyErrorLog

REFUSED = "bpfMapSizeConntrack: 16,384 is fewer than the entries tby_ct holds"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name == "tabby.agent"]
    caplog.clear()
    return lines


def test_the_same_errors_retried_every_second_log_once_a_minute(caplog):
    caplog.set_level(logging.INFO, logger="tabby.agent")
    clock = Clock()
    errors = ApplyErrorLog(repeat_s=60.0, clock=clock)
    errors.failed([REFUSED])
    first = _lines(caplog)
    assert len(first) == 1 and REFUSED in first[0] and "retrying every 1 s" in first[0]
    for _ in range(59):  # one retry a second for a minute: nothing more
        clock.now += 1.0
        errors.failed([REFUSED])
    assert _lines(caplog) == []
    clock.now += 1.0
    errors.failed([REFUSED])
    again = _lines(caplog)
    assert len(again) == 1 and "after 60 retries" in again[0] and REFUSED in again[0]


def test_other_errors_are_logged_at_once_and_a_recovery_once(caplog):
    caplog.set_level(logging.INFO, logger="tabby.agent")
    clock = Clock()
    errors = ApplyErrorLog(repeat_s=60.0, clock=clock)
    errors.failed([REFUSED])
    clock.now += 1.0
    errors.failed([REFUSED, "routes: no such device"])
    assert len(_lines(caplog)) == 2
    clock.now += 1.0
    errors.succeeded()
    assert _lines(caplog) == ["apply: the errors are gone after 0 retries"]
    errors.succeeded()
    assert _lines(caplog) == [], "a clean apply after a clean apply says nothing"
    errors.failed([REFUSED])
    assert len(_lines(caplog)) == 1, "the same error coming back is news again"

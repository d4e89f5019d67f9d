"""Test policy: under CI=true a root-only test with a capability missing fails, never skips."""

from __future__ import annotations

import os

import pytest


def require_root_capabilities() -> None:
    from tabby.preflight import PreflightError, require

    problem = None
    if os.geteuid() != 0:
        problem = "needs root"
    else:
        try:
            require(mount=True)
        except PreflightError as e:
            problem = str(e)
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"capability missing under CI: {problem}")
        pytest.skip(problem)


@pytest.fixture(scope="session")
def root_caps() -> None:
    require_root_capabilities()

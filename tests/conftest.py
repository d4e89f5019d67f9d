"""Shared test policy and fixtures.

A test marked ``root`` needs root, bpffs (mounted by pre-flight if missing) and the capabilities
pre-flight checks: without them it fails under CI=true and skips elsewhere, never silently passes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tabby.bpf.objects import ENTRY_OBJECTS, default_bpf_dir

REPO = Path(__file__).resolve().parents[1]
BPFFS = "/sys/fs/bpf"


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


@pytest.fixture(autouse=True)
def _root_marker(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("root") is not None:
        require_root_capabilities()


@pytest.fixture(scope="session")
def bpf_dir() -> Path:
    """build/bpf with every entry object; runs `make bpf` once if some are missing."""
    path = default_bpf_dir()
    missing = [n for n in ENTRY_OBJECTS if not (path / n).is_file()]
    if missing and "TABBY_BPF_DIR" not in os.environ:
        done = subprocess.run(["make", "-s", "bpf"], cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"`make bpf` failed; run it by hand:\n{done.stdout}{done.stderr}")
        missing = [n for n in ENTRY_OBJECTS if not (path / n).is_file()]
    if missing:
        pytest.fail(f"BPF objects missing in {path}: {missing}; run `make bpf`")
    return path


@pytest.fixture
def pin_root() -> Iterator[str]:
    """A unique pin directory, removed with everything in it after the test."""
    path = f"{BPFFS}/tabby-test-{uuid.uuid4().hex[:12]}"
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def scratch_netns() -> Iterator[str]:
    """A throw-away network namespace with loopback up, removed even on failure."""
    name = f"tabby-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="session")
def etcd_binary() -> str:
    """Debian's etcd-server (make setup installs it): without it, tests that start an etcd fail
    under CI=true and skip elsewhere."""
    path = shutil.which("etcd")
    if path is None:
        problem = "etcd is not installed (apt-get install etcd-server, or make setup)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"missing under CI: {problem}")
        pytest.skip(problem)
    return path

"""Fixtures of the BPF_PROG_TEST_RUN suite: built objects loaded on a throw-away pin root."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from packets import Runner

from tabby.bpf.objects import ENTRY_OBJECTS, DatapathConfig, DatapathObjects, default_bpf_dir

REPO = Path(__file__).resolve().parents[2]
BPFFS = "/sys/fs/bpf"


def _need(reason: str) -> None:
    """A missing capability fails under CI=true and skips elsewhere."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


def _bpffs_ready() -> bool:
    if not os.path.isdir(BPFFS):
        return False
    with open("/proc/mounts") as mounts:
        if any(line.split()[1] == BPFFS and line.split()[2] == "bpf" for line in mounts):
            return True
    return subprocess.run(["mount", "-t", "bpf", "bpf", BPFFS], capture_output=True).returncode == 0


@pytest.fixture(autouse=True)
def _root_capability(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("root") is None:
        return
    if os.geteuid() != 0:
        _need("this test needs root (BPF load, bpffs)")
    if not _bpffs_ready():
        _need(f"bpffs is not mounted at {BPFFS} and cannot be mounted")


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


VNI = 4242
NODE_IP = "172.20.32.10"


@pytest.fixture
def datapath(bpf_dir: Path, pin_root: str) -> Iterator[DatapathObjects]:
    """Every entry object of one fake node, loaded with VNI 4242 and empty maps."""
    dp = DatapathObjects(pin_root, DatapathConfig.build(vni=VNI, host_ip=NODE_IP), bpf_dir)
    with dp:
        yield dp


@pytest.fixture
def runner(datapath: DatapathObjects) -> Runner:
    return Runner(datapath)

"""Fixtures of the BPF_PROG_TEST_RUN suite: built objects loaded on a throw-away pin root."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from packets import Runner

from tabby.bpf.objects import DatapathConfig, DatapathObjects

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

"""Lab up/down as a user meets them: a failed `up` leaves nothing, `down` works with state lost."""

from __future__ import annotations

import glob
import os
import shutil
import uuid

import pytest

from tabby.lab import cgroups, fabric, processes, state
from tabby.lab.cluster import Lab

pytestmark = [pytest.mark.root, pytest.mark.lab]


def leftovers(name: str) -> list[str]:
    found = fabric.lab_netns(f"{name}-")
    found += glob.glob(f"/sys/fs/bpf/tabby/{name}-*")
    if os.path.exists(cgroups.root(name)):
        found.append(cgroups.root(name))
    if os.path.exists(state.lab_dir(name)):
        found.append(state.lab_dir(name))
    return found


def test_down_after_a_crash_that_lost_the_lab_state(root_caps):
    name = "t" + uuid.uuid4().hex[:7]
    try:
        lab = Lab.up(name, 2, progress=lambda _m: None)
        lab.add_pod("p", "node2")
        saved = state.read(name)
        procs = saved["procs"] + saved["pods"]["default/p"]["procs"]
        assert len(procs) == 5 and all(processes.alive(p) for p in procs)  # controller, kubelet
        assert leftovers(name)
        shutil.rmtree(state.lab_dir(name))  # the crash: nothing recorded survives
        Lab.down(name, progress=lambda _m: None)
        assert leftovers(name) == []
        assert not any(processes.alive(p) for p in procs), "agents/pods outlived down"
    finally:
        Lab.down(name, progress=lambda _m: None)


def test_a_failed_up_removes_what_it_created(root_caps, monkeypatch):
    name = "t" + uuid.uuid4().hex[:7]
    real = fabric.build_node

    def fail_on_node2(plan, node):
        if node.name == "node2":
            raise RuntimeError("injected failure building node2")
        real(plan, node)

    monkeypatch.setattr(fabric, "build_node", fail_on_node2)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            Lab.up(name, 3, progress=lambda _m: None)
        assert leftovers(name) == []
    finally:
        Lab.down(name, progress=lambda _m: None)

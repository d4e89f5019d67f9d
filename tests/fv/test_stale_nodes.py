"""Stale nodes (seed 004's troubleshooting): a deleted Node's IPAM block and routes are released
within a minute, and the machine re-registered under a new name claims the freed block.

node3 "dies" (its agent stopped, its Node object deleted, as a cloud controller does for a
terminated instance). The lab's controller (calico-kube-controllers' node controller) must delete
node3's pods, IPAM handles and block; node1 and node2 then route the block nowhere (neither the BPF
route map nor the kernel route) and warn about nothing. node3's machine then comes back as
"node3b": its agent claims the freed CIDR, and node1 routes it to the machine again.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tabby.bpf.maps.routes import ROUTES_SPEC, RoutesMap
from tabby.dataplane.node import remove_pins
from tabby.lab import processes, traffic
from tabby.lab.cluster import Lab, pin_root
from tabby.lab.topology import NodePlan

pytestmark = [pytest.mark.root, pytest.mark.lab]

RELEASE_S = 60.0  # the bound


@pytest.fixture(scope="module")
def lab(root_caps: None) -> Iterator[Lab]:
    name = "s" + uuid.uuid4().hex[:7]
    try:
        yield Lab.up(name, 3, progress=lambda _m: None)
    finally:
        Lab.down(name, progress=lambda _m: None)


def _block_of(lab: Lab, node: str) -> str | None:
    for block in lab.datastore().list("IPAMBlock")[0]:
        if block["spec"].get("affinity") == f"host:{node}":
            return str(block["spec"]["cidr"])
    return None


def _bpf_routes(lab: Lab, node: str) -> dict[str, Any]:
    m = ROUTES_SPEC.open_pinned(pin_root(lab.name, node))
    try:
        return RoutesMap(m).dump()
    finally:
        m.close()


def _kernel_routes(lab: Lab, node: str) -> str:
    netns = lab.plan.node(node).netns
    done = subprocess.run(
        ["ip", "-n", netns, "route", "show"], capture_output=True, text=True, check=True
    )
    return done.stdout


def _wait_ready(lab: Lab, plans: list[NodePlan], timeout_s: float = 60.0) -> None:
    """Every agent in ``plans`` ready at the store's current revision (lab.wait_ready waits on
    every planned node, and node3's agent is gone)."""
    target = lab.datastore().revision()
    deadline = time.monotonic() + timeout_s
    pending = {p.name: p for p in plans}
    while pending:
        for name, plan in list(pending.items()):
            r = lab.readyz(plan)
            if r.get("ready") and int(r.get("revision", 0)) >= target:
                del pending[name]
        if pending:
            assert time.monotonic() < deadline, {n: lab.readyz(p) for n, p in pending.items()}
            time.sleep(0.1)


def test_deleted_node_releases_block_and_routes_and_a_new_name_reuses_it(lab: Lab) -> None:
    lab.add_pod("client", "node1", wait=False)
    ip_c = lab.add_pod("web-c", "node3")
    block = _block_of(lab, "node3")
    assert block is not None
    for node in ("node1", "node2"):
        assert block in _bpf_routes(lab, node), node
        assert block in _kernel_routes(lab, node), node
    client = lab.pod("client")
    assert traffic.http_get(client["netns"], ip_c, 8080, "/hostname") == "web-c"

    # node3 dies: its agent stops, its Node object is deleted
    processes.stop(lab.agent_proc("node3"))
    ds = lab.datastore()
    old_node = ds.get("Node", "node3")
    assert old_node is not None
    ds.delete("Node", "node3")
    deadline = time.monotonic() + RELEASE_S
    while _block_of(lab, "node3") is not None:
        assert time.monotonic() < deadline, "node3's block was not released within a minute"
        time.sleep(0.2)
    alive = [lab.plan.node("node1"), lab.plan.node("node2")]
    _wait_ready(lab, alive)
    assert not [p for p in ds.list("Pod")[0] if p["spec"].get("nodeName") == "node3"]
    assert not [h for h in ds.list("IPAMHandle")[0] if h["spec"]["node"] == "node3"]
    for plan in alive:
        assert block not in _bpf_routes(lab, plan.name), plan.name
        assert block not in _kernel_routes(lab, plan.name), plan.name
        assert lab.readyz(plan)["warnings"] == [], plan.name

    # the machine comes back under a new name (fresh: the old agent's pins are gone with it)
    remove_pins(pin_root(lab.name, "node3"))
    new = dict(old_node)
    new["metadata"] = {
        k: v
        for k, v in old_node["metadata"].items()
        if k not in ("resourceVersion", "uid", "creationTimestamp")
    }
    new["metadata"]["name"] = "node3b"
    ds.apply([new])
    node3b = dataclasses.replace(lab.plan.node("node3"), name="node3b")
    lab.start_agent(node3b)
    _wait_ready(lab, [*alive, node3b])
    assert _block_of(lab, "node3b") == block  # the freed CIDR, claimed again
    routes = _bpf_routes(lab, "node1")
    assert block in routes and routes[block].next_hop_ip == node3b.ip
    assert block in _kernel_routes(lab, "node1")

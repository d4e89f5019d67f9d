"""The node controller (calico-kube-controllers' part): a deleted Node's pods, handles and blocks
are released after a grace, nothing of a live node is touched, and the CIDR is claimed again."""

from __future__ import annotations

import ipaddress
import threading
import time
from pathlib import Path

import pytest

from tabby.calc import names
from tabby.cni.ipam import BlockIPAM
from tabby.controller import nodes
from tabby.datastore import open_datastore
from tabby.datastore.api import Datastore

POOL = {
    "apiVersion": "projectcalico.org/v3",
    "kind": "IPPool",
    "metadata": {"name": "p"},
    "spec": {"cidr": "100.96.0.0/24", "blockSize": 26},
}


def node(name: str, ip: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    }


def pod(name: str, node_name: str, ip: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": node_name, "containers": [{"name": "c"}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}], "phase": "Running"},
    }


@pytest.fixture
def ds(tmp_path: Path) -> Datastore:
    store = open_datastore(f"sqlite:///{tmp_path}/store.db")
    store.apply([POOL, node("n1", "10.0.0.1"), node("n2", "10.0.0.2")])
    ipam = BlockIPAM(store)
    for n in ("n1", "n2"):
        ipam.assign(n, names.tunnel_handle(n))
        for i in range(2):
            ip = ipam.assign(n, f"{n}-c{i}")
            store.apply([pod(f"{n}-p{i}", n, ip)])
    return store


def _held(ds: Datastore) -> dict[str, set[str]]:
    blocks, _ = ds.list("IPAMBlock")
    handles, _ = ds.list("IPAMHandle")
    pods, _ = ds.list("Pod")
    return {
        "blocks": {b["spec"]["affinity"] for b in blocks},
        "handles": {h["spec"]["node"] for h in handles},
        "pods": {p["spec"]["nodeName"] for p in pods},
    }


def test_stale_names_pure():
    blocks = [{"spec": {"affinity": "host:gone"}}, {"spec": {"affinity": "host:n1"}}]
    handles = [{"spec": {"node": "other-gone"}}]
    pods = [{"spec": {"nodeName": "n1"}}, {"spec": {}}]
    live = [{"metadata": {"name": "n1"}}]
    assert nodes.stale_names(live, blocks, handles, pods) == {"gone", "other-gone"}


def test_a_deleted_node_is_released_after_the_grace_and_only_it(ds):
    ctl = nodes.NodeController(ds, grace_s=5.0)
    assert not ctl.sync(now=100.0)  # nothing stale
    n2_block = next(
        b["spec"]["cidr"] for b in ds.list("IPAMBlock")[0] if b["spec"]["affinity"] == "host:n2"
    )
    ds.delete("Node", "n2")
    assert not ctl.sync(now=101.0)  # seen stale: the grace starts
    assert _held(ds)["blocks"] == {"host:n1", "host:n2"}
    assert ctl.next_due() == 106.0
    released = ctl.sync(now=106.0)
    assert released.blocks == [n2_block]
    assert sorted(released.pods) == ["default/n2-p0", "default/n2-p1"]
    assert len(released.addresses) == 3  # two pods and the tunnel address
    assert all(
        ipaddress.ip_address(a) in ipaddress.ip_network(n2_block) for a in released.addresses
    )
    assert _held(ds) == {"blocks": {"host:n1"}, "handles": {"n1"}, "pods": {"n1"}}
    assert not ctl.sync(now=200.0) and ctl.next_due() is None

    # the machine comes back under a new name: it claims the freed CIDR
    ds.apply([node("n2-new", "10.0.0.2")])
    ip = BlockIPAM(ds).assign("n2-new", names.tunnel_handle("n2-new"))
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(n2_block)


def test_a_node_that_comes_back_within_the_grace_keeps_everything(ds):
    ctl = nodes.NodeController(ds, grace_s=5.0)
    saved = ds.get("Node", "n2")
    ds.delete("Node", "n2")
    ctl.sync(now=10.0)
    saved["metadata"].pop("resourceVersion", None)
    ds.apply([saved])
    assert not ctl.sync(now=20.0)
    assert _held(ds)["blocks"] == {"host:n1", "host:n2"}


def test_run_releases_within_seconds_of_the_deletion(ds):
    stop = threading.Event()
    t = threading.Thread(target=nodes.run, args=(ds, stop), kwargs={"grace_s": 0.5, "resync_s": 60})
    t.start()
    try:
        time.sleep(0.3)
        started = time.monotonic()
        ds.delete("Node", "n1")
        # bounded well below the 60 s resync: only the deletion event can have triggered it
        while "host:n1" in _held(ds)["blocks"] and time.monotonic() - started < 20:
            time.sleep(0.05)
        assert _held(ds) == {"blocks": {"host:n2"}, "handles": {"n2"}, "pods": {"n2"}}
    finally:
        stop.set()
        t.join(5)

"""The agent over the Kubernetes API datastore (tests/fakeapi), without BPF: its list + watch
feed calc, and the NodeState it hands to the dataplane follows creates and deletes, including
a delete made while its watches were cut and the history compacted (410 -> relist and diff).

The dataplane worker is a stand-in that records what it is given (as test_agent_ct_sweep.py
fakes the dataplane); preflight is skipped (it checks the host, not the datastore).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fakeapi import FakeApiServer

from tabby import agent as agent_mod
from tabby.calc import names
from tabby.calc.nodestate import NodeState
from tabby.datastore import open_datastore


class RecordingWorker:
    """Takes the agent's states like DataplaneWorker.submit, applies nothing."""

    def __init__(self) -> None:
        self.started_ok = threading.Event()
        self.failed: BaseException | None = None
        self.cv = threading.Condition()
        self.latest: tuple[NodeState, int] | None = None

    def start(self) -> None:
        self.started_ok.set()

    def prepare(self, base: NodeState) -> None:
        pass  # no datapath to load

    def submit(self, state: NodeState, revision: int) -> None:
        with self.cv:
            self.latest = (state, revision)
            self.cv.notify_all()

    def wait_for(self, pred: Callable[[NodeState], bool], timeout_s: float = 10.0) -> NodeState:
        deadline = time.monotonic() + timeout_s
        with self.cv:
            while self.latest is None or not pred(self.latest[0]):
                left = deadline - time.monotonic()
                assert left > 0, f"state never matched; last: {self.latest}"
                self.cv.wait(left)
            return self.latest[0]


def node(name: str, ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "annotations": {"projectcalico.org/IPv4Address": f"{ip}/19"}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    }


def block(cidr: str, owner: str) -> dict[str, Any]:
    return {
        "apiVersion": "tabby.dev/v1",
        "kind": "IPAMBlock",
        "metadata": {"name": names.block_name(cidr)},
        "spec": {"cidr": cidr, "affinity": f"host:{owner}", "allocations": {}},
    }


POOL = {
    "apiVersion": "projectcalico.org/v3",
    "kind": "IPPool",
    "metadata": {"name": "pods"},
    "spec": {"cidr": "100.96.0.0/11", "blockSize": 26, "vxlanMode": "Always"},
}


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer(bookmark_interval_s=0.2).start()
    try:
        yield server
    finally:
        server.stop()


def test_agent_state_follows_the_kubernetes_api(api, tmp_path: Path, monkeypatch):
    url = f"kubernetes://{api.kubeconfig(tmp_path / 'kubeconfig')}"
    ds = open_datastore(url)
    ds.apply([POOL, node("n1", "172.20.32.11"), node("n2", "172.20.64.12")])
    monkeypatch.setattr(agent_mod.preflight, "require", lambda: None)
    agent = agent_mod.Agent("n1", url, netns=None, pin_root=str(tmp_path / "pins"))
    worker = RecordingWorker()
    agent.worker = worker  # type: ignore[assignment]
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        # At start the agent claims its tunnel address from IPAM: IPAMBlock/IPAMHandle CRDs.
        state = worker.wait_for(lambda s: s.tunnel_ip is not None)
        assert state.tunnel_ip.startswith("100.96.")
        handles = [name for (r, _, name) in api.objects if r.kind == "IPAMHandle"]
        assert len(handles) == 1
        # n2's block appears: a route to it over VXLAN.
        ds.apply([block("100.96.1.0/26", "n2")])
        worker.wait_for(lambda s: "100.96.1.0/26" in s.routes)
        # A Service with one ready endpoint becomes a NAT entry; deleting it removes it.
        svc = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"ports": [{"port": 80, "targetPort": 8080}]},
        }
        ds.apply([svc])
        worker.wait_for(lambda s: any("web" in key for key in s.services))
        ds.delete("service", "web")
        worker.wait_for(lambda s: not any("web" in key for key in s.services))
        # The block is deleted while the agent's watches are cut and the history compacted:
        # the informers relist after the 410 and the route goes.
        time.sleep(api.bookmark_interval_s * 3)  # every informer past its seed
        with api.cv:
            api.drop_watches()
            api.delete_object("IPAMBlock", names.block_name("100.96.1.0/26"))
            api.compact()
        state = worker.wait_for(lambda s: "100.96.1.0/26" not in s.routes)
        assert api.gone_sent >= 1
        # And it keeps following afterwards.
        ds.apply([block("100.96.2.0/26", "n2")])
        worker.wait_for(lambda s: "100.96.2.0/26" in s.routes)
    finally:
        agent.stop.set()
        ds.close()

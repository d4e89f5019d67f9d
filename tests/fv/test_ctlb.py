"""Connect-time load balancing in the lab: a process *inside a pod* (its netns and its cgroup, a
child of the node's group the agent hooks) talks to a ClusterIP. Every check also reads the
client node's CTLB counters, so a silent fall-back to per-packet NAT cannot pass.

The client pod is on node1, the backends on node2 and node3.
"""

from __future__ import annotations

import errno
import time
from typing import Any

import pytest

from tabby.bpf.maps.counters import Reason
from tabby.lab.cluster import Lab
from tabby.lab.sockclient import SocketClient

from .service_lab import counter_delta, counters

pytestmark = [pytest.mark.root, pytest.mark.lab]

VIP = "100.64.0.20"
BACKENDS = {"ctlb-a": "node2", "ctlb-b": "node3"}


def pod_client(lab: Lab, pod: str) -> SocketClient:
    """A client process inside the pod: its netns and its cgroup."""
    netns, cgroup = lab.exec_argv(pod, [])
    return SocketClient(netns, cgroup)


def set_mode(lab: Lab, mode: str) -> None:
    rev = lab.datastore().patch(
        "FelixConfiguration", "default", None, {"spec": {"bpfConnectTimeLoadBalancing": mode}}
    )
    lab.wait_ready(int(rev["metadata"]["resourceVersion"]))


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> dict[str, Any]:
    lab.add_pod("cl", "node1", wait=False)
    for name, node in BACKENDS.items():
        lab.add_pod(name, node, labels={"app": "ctlb"}, wait=False)
    lab.datastore().apply(
        [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "ctlb", "namespace": "default"},
                "spec": {
                    "clusterIP": VIP,
                    "selector": {"app": "ctlb"},
                    "ports": [
                        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                        {"name": "dns", "port": 53, "targetPort": "udp", "protocol": "UDP"},
                    ],
                },
            }
        ]
    )
    deadline = time.monotonic() + 30
    while True:  # the controller's slices, then every agent programmed at that revision
        slices, _ = lab.datastore().list("EndpointSlice", "default")
        ready = [
            e
            for s in slices
            if s["metadata"].get("labels", {}).get("kubernetes.io/service-name") == "ctlb"
            for e in s["endpoints"]
            if e.get("conditions", {}).get("ready", True)
        ]
        if len(ready) == len(BACKENDS):
            break
        assert time.monotonic() < deadline, "the ctlb service never got its endpoints"
        time.sleep(0.1)
    lab.wait_ready()
    return {"client": lab.pod("cl")}


def test_pod_tcp_to_clusterip_is_balanced_at_connect(lab: Lab, cluster: dict[str, Any]) -> None:
    before = counters(lab, "node1")
    with pod_client(lab, "cl") as c:
        answers = [c("tcp", ip=VIP, port=80, path="/hostname") for _ in range(16)]
        clientip = c("tcp", ip=VIP, port=80, path="/clientip")
    after = counters(lab, "node1")
    assert all(a.get("peer") == [VIP, 80] for a in answers), answers  # getpeername: the VIP
    assert {a["body"] for a in answers} == set(BACKENDS)
    assert clientip["body"].split(":")[0] == cluster["client"]["ip"]
    assert counter_delta(before, after, Reason.CTLB_CONNECT) == 17, (
        "translated per packet, not at connect"
    )


def test_udp_is_per_packet_in_tcp_mode_and_at_send_when_enabled(
    lab: Lab, cluster: dict[str, Any]
) -> None:
    before = counters(lab, "node1")
    with pod_client(lab, "cl") as c:
        got = c("sendto", ip=VIP, port=53, payload="hostname")
    assert got.get("src") == [VIP, 53] and got["reply"] in BACKENDS, got
    assert (
        counter_delta(before, counters(lab, "node1"), Reason.CTLB_SENDMSG) == 0
    )  # default mode TCP
    set_mode(lab, "Enabled")
    before = counters(lab, "node1")
    with pod_client(lab, "cl") as c:
        got = c("sendto", ip=VIP, port=53, payload="hostname")
    after = counters(lab, "node1")
    assert got.get("src") == [VIP, 53] and got["reply"] in BACKENDS, got
    assert counter_delta(before, after, Reason.CTLB_SENDMSG) == 1
    assert counter_delta(before, after, Reason.CTLB_RECVMSG) == 1


def test_connected_udp_moves_on_when_its_backend_goes(lab: Lab, cluster: dict[str, Any]) -> None:
    """Last in the module: it deletes a backend pod."""
    set_mode(lab, "Enabled")
    with pod_client(lab, "cl") as c:
        assert c("udp_connect", ip=VIP, port=53) == {"peer": [VIP, 53]}
        first = c("udp_send", payload="hostname")
        assert first.get("src") == [VIP, 53] and first["reply"] in BACKENDS, first
        lab.del_pod(first["reply"])
        deadline = time.monotonic() + 20
        while (got := c("udp_recv"))["errno"] != errno.ECONNABORTED:  # timeouts until reaped
            assert got.get("errno") == -1, f"unexpected: {got}"
            assert time.monotonic() < deadline, "the stale connected UDP socket was never reaped"
        assert c("udp_connect", ip=VIP, port=53) == {"peer": [VIP, 53]}
        again = c("udp_send", payload="hostname")
    assert again.get("src") == [VIP, 53]
    assert again["reply"] == (set(BACKENDS) - {first["reply"]}).pop()

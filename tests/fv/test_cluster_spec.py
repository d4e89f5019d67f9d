"""A lab from the kOps example spec (`tabbyctl lab up --cluster-spec`), on a 9001-byte fabric.

The example is VXLAN CrossSubnet with its two nodes (master + node) in its one subnet
172.20.32.0/19: pod traffic between them is routed unencapsulated, pods get 9001 - 50 = 8951.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tabby.lab import capture, traffic
from tabby.lab.cluster import Lab

pytestmark = [pytest.mark.root, pytest.mark.lab]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "kops-demo-cluster.yaml"
TABBYCTL = str(Path(sys.executable).with_name("tabbyctl"))


@pytest.fixture(scope="module")
def spec_lab(root_caps: None) -> Iterator[tuple[Lab, str]]:
    name = "k" + uuid.uuid4().hex[:7]
    try:
        up = subprocess.run(
            [TABBYCTL, "lab", "up", "--name", name, "--cluster-spec", str(EXAMPLE)]
            + ["--fabric-mtu", "9001"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert up.returncode == 0, up.stdout + up.stderr
        yield Lab(name), up.stdout + up.stderr
    finally:
        Lab.down(name, progress=lambda _m: None)


@pytest.fixture(scope="module")
def lab(spec_lab: tuple[Lab, str]) -> Lab:
    return spec_lab[0]


@pytest.fixture(scope="module")
def pods(lab: Lab) -> dict[str, dict]:
    """a1, a2 on node1; b on node2 (same subnet)."""
    for name, node in (("a1", "node1"), ("a2", "node1"), ("b", "node2")):
        lab.add_pod(name, node, wait=False)
    lab.wait_ready()
    return {n: lab.pod(n) for n in ("a1", "a2", "b")}


def test_lab_follows_the_spec(spec_lab):
    lab, output = spec_lab
    assert [(n.name, n.subnet) for n in lab.plan.nodes] == [
        ("node1", "172.20.32.0/19"),
        ("node2", "172.20.32.0/19"),
    ]
    assert "no effect off AWS" in output and "disruptive" in output  # the spec's warnings
    ds = lab.datastore()
    felix = ds.get("FelixConfiguration", "default")
    pool = ds.get("IPPool", "default-ipv4-ippool")
    assert felix is not None and pool is not None
    assert felix["spec"]["bpfExternalServiceMode"] == "DSR"
    assert pool["spec"]["vxlanMode"] == "CrossSubnet" and pool["spec"]["cidr"] == "100.96.0.0/11"


@pytest.mark.parametrize("src,dst", [("a1", "a2"), ("a1", "b"), ("b", "a2")])
def test_pods_reach_each_other_tcp_udp_with_their_own_source(pods, src, dst):
    s, d = pods[src], pods[dst]
    assert traffic.http_get(s["netns"], d["ip"], 8080, "/hostname") == dst
    assert traffic.http_get(s["netns"], d["ip"], 8080, "/clientip").split(":")[0] == s["ip"]
    assert traffic.udp_request(s["netns"], d["ip"], 8081, b"clientip").split(":")[0] == s["ip"]


def test_same_subnet_pod_traffic_is_not_encapsulated(lab, pods):
    a1, b = pods["a1"], pods["b"]
    with capture.capture(lab.plan.fabric_netns, "node1") as cap:
        traffic.http_get(a1["netns"], b["ip"], 8080, "/hostname")
        traffic.udp_request(a1["netns"], b["ip"], 8081, b"x")
    assert len(cap.plain_between(a1["ip"], b["ip"])) >= 4, "expected plain a1<->b packets"
    assert cap.vxlan() == [], "same-subnet traffic was VXLAN-encapsulated"


def test_pods_get_8951_on_a_9001_fabric(lab, pods):
    node1 = lab.plan.node("node1").netns
    assert traffic.link_mtu(node1, "eth0") == 9001
    assert traffic.link_mtu(pods["a1"]["netns"], "eth0") == 8951
    assert traffic.link_mtu(node1, "tby.vxlan") == 8951
    big = b"j" * (8951 - 28)  # a datagram filling the pod MTU crosses whole
    assert traffic.udp_request(pods["a1"]["netns"], pods["b"]["ip"], 8081, big) == big.decode()


def test_wireguard_enabled_is_refused_with_one_line_and_nothing_breaks(lab, pods):
    ds = lab.datastore()
    ds.patch("FelixConfiguration", "default", None, {"spec": {"wireguardEnabled": True}})
    try:
        lab.wait_ready()
        for node in lab.plan.nodes:
            r = lab.readyz(node)
            lines = [w for w in r["warnings"] if w.startswith("wireguardEnabled")]
            assert r["ready"] and len(lines) == 1, r
            assert "NOT encrypted" in lines[0]
        assert traffic.http_get(pods["a1"]["netns"], pods["b"]["ip"], 8080, "/hostname") == "b"
    finally:
        ds.patch("FelixConfiguration", "default", None, {"spec": {"wireguardEnabled": False}})
    lab.wait_ready()
    deadline = time.monotonic() + 5
    while any("wireguard" in json.dumps(lab.readyz(n)) for n in lab.plan.nodes):
        assert time.monotonic() < deadline, "the WireGuard line stayed after disabling it"
        time.sleep(0.1)

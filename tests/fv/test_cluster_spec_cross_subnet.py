"""CrossSubnet live, from a kOps spec over two subnets: node1 and node3 share us-east-1a, node2 is
in us-east-1b across the fabric's router. Same-subnet pod traffic crosses the fabric plain,
cross-subnet pod traffic in VXLAN; both directions, TCP and UDP, and a datagram filling the pod
MTU each way (9001-byte fabric).

The spec keeps the example's encapsulationMode vxlan (mode left at kOps' default, CrossSubnet);
IP-in-IP CrossSubnet (kOps' default encapsulation) is tests/fv/test_ipip.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tabby.lab import capture, traffic
from tabby.lab.cluster import Lab

from . import spec_lab as spec_labs

pytestmark = [pytest.mark.root, pytest.mark.lab]


@pytest.fixture(scope="module")
def spec_lab(root_caps: None) -> Iterator[tuple[Lab, list[str]]]:
    yield from spec_labs.spec_lab("x", spec_labs.two_subnet_spec("vxlan"), 9001)


@pytest.fixture(scope="module")
def lab(spec_lab: tuple[Lab, list[str]]) -> Lab:
    return spec_lab[0]


@pytest.fixture(scope="module")
def pods(lab: Lab) -> dict[str, dict]:
    for name, node in (("p1", "node1"), ("p2", "node2"), ("p3", "node3")):
        lab.add_pod(name, node, wait=False)
    lab.wait_ready()
    return {n: lab.pod(n) for n in ("p1", "p2", "p3")}


def test_vxlan_spec_runs_vxlan_cross_subnet(spec_lab):
    lab, _said = spec_lab
    pool = lab.datastore().get("IPPool", "default-ipv4-ippool")
    assert pool is not None
    assert (pool["spec"]["ipipMode"], pool["spec"]["vxlanMode"]) == ("Never", "CrossSubnet")
    assert [n.subnet for n in lab.plan.nodes] == [
        "172.20.32.0/19",
        "172.20.64.0/19",
        "172.20.32.0/19",
    ]


def test_same_subnet_plain_and_cross_subnet_in_vxlan(lab, pods):
    p1, p2, p3 = pods["p1"], pods["p2"], pods["p3"]
    with capture.capture(lab.plan.fabric_netns, "node1") as cap:
        for dst in (p2, p3):  # TCP and UDP, each answered (so both directions)
            assert traffic.http_get(p1["netns"], dst["ip"], 8080, "/clientip").startswith(p1["ip"])
            assert traffic.udp_request(p1["netns"], dst["ip"], 8081, b"clientip").startswith(
                p1["ip"]
            )
        assert traffic.http_get(p2["netns"], p1["ip"], 8080, "/hostname") == "p1"
    # node1 <-> node3 (same subnet): the pods' own headers on the wire, no VXLAN
    plain = cap.plain_between(p1["ip"], p3["ip"])
    assert len(plain) >= 6 and cap.inner_between(p1["ip"], p3["ip"]) == []
    assert {p["IP"].src for p in plain} == {p1["ip"], p3["ip"]}, "both directions, unencapsulated"
    # node1 <-> node2 (across the router): VXLAN between the nodes, never plain
    inner = cap.inner_between(p1["ip"], p2["ip"])
    n1, n2 = lab.plan.node("node1").ip, lab.plan.node("node2").ip
    assert len(inner) >= 6 and cap.plain_between(p1["ip"], p2["ip"]) == []
    assert {(p["IP"].src, p["IP"].dst) for p in inner} == {(n1, n2), (n2, n1)}


@pytest.mark.parametrize("dst", ["p2", "p3"])
def test_a_datagram_filling_the_pod_mtu_crosses_either_way(pods, dst):
    big = b"m" * (8951 - 28)
    assert traffic.udp_request(pods["p1"]["netns"], pods[dst]["ip"], 8081, big) == big.decode()

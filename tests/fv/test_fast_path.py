"""The fast path (bpfRedirectToPeer, fwd.h) live, in one lab from the kOps spec over two subnets
(node1 and node3 in 172.20.32.0/19, node2 across the fabric's router; BIRD backend), so the same
pods are reached plainly (BGP routes), in IP-in-IP and in VXLAN by switching the pool.

That packets really skipped the node's IP stack is read from the node's own kernel: its
``Ip: ForwDatagrams`` (/proc/net/snmp of the node netns, what ip_forward counts) does not move
while pods exchange hundreds of packets through it, and tabby's ``fwd_redirect`` counter does;
with the field Disabled the same exchange is counted by the kernel again. A NetworkPolicy that
denies a flow still denies it on the fast path (to-workload's work is done before a packet is
put into its pod's netns).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tabby.lab import traffic
from tabby.lab.cluster import Lab

from . import spec_lab as spec_labs
from .service_lab import counters, tcp_outcome
from .spec_lab import set_pool

pytestmark = [pytest.mark.root, pytest.mark.lab]
ROUNDS = 10


@pytest.fixture(scope="module")
def spec_lab(root_caps: None) -> Iterator[tuple[Lab, list[str]]]:
    yield from spec_labs.spec_lab("f", spec_labs.two_subnet_spec(None), 1500)


@pytest.fixture(scope="module")
def lab(spec_lab: tuple[Lab, list[str]]) -> Lab:
    return spec_lab[0]


@pytest.fixture(scope="module")
def pods(lab: Lab) -> dict[str, dict[str, Any]]:
    return spec_labs.add_pods(
        lab, (("a1", "node1"), ("a2", "node1"), ("b", "node2"), ("c", "node3"))
    )


def set_felix(lab: Lab, redirect: str) -> None:
    cur = lab.datastore().get("FelixConfiguration", "default")
    assert cur is not None
    if cur["spec"].get("bpfRedirectToPeer", "Enabled") != redirect:
        lab.datastore().patch(
            "FelixConfiguration", "default", None, {"spec": {"bpfRedirectToPeer": redirect}}
        )
        lab.wait_ready()


def forwarded(lab: Lab, node: str) -> int:
    """The node kernel's Ip ForwDatagrams: every packet ip_forward handled."""
    netns = lab.plan.node(node).netns
    out = subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns}", "cat", "/proc/net/snmp"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    names, values = [line.split() for line in out if line.startswith("Ip:")][:2]
    return int(values[names.index("ForwDatagrams")])


def exchange(src: dict[str, Any], dst: dict[str, Any], rounds: int = ROUNDS) -> None:
    """TCP (a connection each) and UDP from src to dst, each answered, src's address seen."""
    for _ in range(rounds):
        seen = traffic.http_get(src["netns"], dst["ip"], 8080, "/clientip")
        assert seen.split(":")[0] == src["ip"]
        got = traffic.udp_request(src["netns"], dst["ip"], 8081, b"clientip")
        assert got.startswith(src["ip"])


def measured(
    lab: Lab, nodes: list[str], src: dict[str, Any], dst: dict[str, Any]
) -> dict[str, Any]:
    """Stack-forwarded packets and fast-path redirects per node over one exchange both ways."""
    exchange(src, dst, 1)  # neighbours resolved by the stack, as any first packet
    exchange(dst, src, 1)
    fwd0 = {n: forwarded(lab, n) for n in nodes}
    cnt0 = {n: counters(lab, n) for n in nodes}
    exchange(src, dst)
    exchange(dst, src)
    out: dict[str, Any] = {}
    for n in nodes:
        after = counters(lab, n)
        out[n] = {
            "forwarded": forwarded(lab, n) - fwd0[n],
            # to another device (fwd_redirect) or into a local pod's netns (fwd_peer)
            "redirect": sum(after[k] - cnt0[n][k] for k in ("fwd_redirect", "fwd_peer")),
            "peer": after["fwd_peer"] - cnt0[n]["fwd_peer"],
            "fib_miss": after["fwd_fib_miss"] - cnt0[n]["fwd_fib_miss"],
        }
    return out


# each round: a TCP connection (>= 5 packets each way) and a UDP request and answer
MIN_PACKETS = 2 * ROUNDS * 6


def test_same_node_pod_to_pod_skips_the_node_stack(lab, pods):
    set_felix(lab, "Enabled")
    got = measured(lab, ["node1"], pods["a1"], pods["a2"])["node1"]
    assert got["forwarded"] <= 2, got
    # both directions, on node1 both times, each into the other pod's netns
    assert got["peer"] == got["redirect"] >= 2 * MIN_PACKETS, got


def test_disabled_goes_through_the_stack_again(lab, pods):
    set_felix(lab, "Disabled")
    try:
        got = measured(lab, ["node1"], pods["a1"], pods["a2"])["node1"]
        assert got["redirect"] == 0, got
        assert got["forwarded"] >= 2 * MIN_PACKETS, got
    finally:
        set_felix(lab, "Enabled")


@pytest.mark.parametrize(
    ("ipip", "vxlan", "dst"),
    [
        ("CrossSubnet", "Never", "c"),  # same subnet: plain, BGP-learnt routes
        ("Always", "Never", "b"),  # IP-in-IP across the router
        ("Always", "Never", "c"),
        ("Never", "Always", "b"),  # VXLAN
        ("Never", "Always", "c"),
    ],
)
def test_across_nodes_both_nodes_skip_their_stack(lab, pods, ipip, vxlan, dst):
    set_felix(lab, "Enabled")
    set_pool(lab, ipip, vxlan)
    node = {"b": "node2", "c": "node3"}[dst]
    got = measured(lab, ["node1", node], pods["a1"], pods[dst])
    for n in ("node1", node):
        assert got[n]["forwarded"] <= 2, got  # 0 when run; 2: a neighbour entry aged out
        # one node sends and receives each direction: a redirect each time
        assert got[n]["redirect"] >= 2 * MIN_PACKETS, got
        # what a node receives for its pod goes into the pod's netns
        assert got[n]["peer"] >= MIN_PACKETS, got


@pytest.mark.parametrize("src", ["a1", "b"])
def test_a_denied_flow_stays_denied_on_the_fast_path(lab, pods, src):
    set_felix(lab, "Enabled")
    set_pool(lab, "CrossSubnet")
    deny = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "a2-from-c-only", "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "a2"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "c"}}}]}],
        },
    }
    ds = lab.datastore()
    exchange(pods[src], pods["a2"], 1)
    ds.apply([deny])
    lab.wait_ready()
    try:
        before = counters(lab, "node1")
        assert tcp_outcome(pods[src]["netns"], pods["a2"]["ip"], 8080) == "timeout"
        after = counters(lab, "node1")
        assert after["drop_pol_in"] > before["drop_pol_in"]
        exchange(pods["c"], pods["a2"], 2)  # the allowed peer, on the fast path too
        assert counters(lab, "node1")["fwd_peer"] > after["fwd_peer"]
    finally:
        ds.delete("NetworkPolicy", "a2-from-c-only", "default")
        lab.wait_ready()
    exchange(pods[src], pods["a2"], 1)

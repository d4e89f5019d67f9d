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

from tabby.bpf.maps.routes import WL_DEVS_SPEC, WlDevValue
from tabby.lab import traffic
from tabby.lab.cluster import Lab, pin_root

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


def _link(netns: str, dev: str) -> tuple[int, str, int]:
    """(ifindex, MAC, MTU) of a device, as `ip` reports it."""
    out = subprocess.run(
        ["ip", "-n", netns, "-o", "link", "show", "dev", dev],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return int(out[0].rstrip(":")), out[out.index("link/ether") + 1], int(out[out.index("mtu") + 1])


def _host_veth(netns: str, ip: str) -> str:
    """The device of the node's route to a pod: its host-side veth."""
    out = subprocess.run(
        ["ip", "-n", netns, "-o", "route", "get", ip], check=True, capture_output=True, text=True
    ).stdout.split()
    return out[out.index("dev") + 1]


def test_each_local_pod_is_described_for_the_fast_path(lab, pods):
    """The agent wrote each local pod's veth in tby_wl_devs: the MAC of the pod's interface
    (read in the pod's netns), the host side's, and the MTU of the pair."""
    node_ns = lab.plan.node("node1").netns
    devs = WL_DEVS_SPEC.open_pinned(pin_root(lab.name, "node1"))
    try:
        rows = {int(k.value): v.describe(int(k.value)) for k, v in devs.items()}
    finally:
        devs.close()
    for name in ("a1", "a2"):
        index, host_mac, mtu = _link(node_ns, _host_veth(node_ns, pods[name]["ip"]))
        _, pod_mac, _ = _link(pods[name]["netns"], "eth0")
        assert rows.get(index) == WlDevValue.make(pod_mac, host_mac, mtu).describe(index), name


def test_a_pods_frames_carry_its_own_mac_whatever_the_node_neighbour_table_says(lab, pods):
    """Local delivery takes the pod's MACs from tby_wl_devs, not from the FIB and the node's
    neighbour table: with a wrong permanent entry there for a2, a1's datagrams still reach a2
    addressed to a2's interface, from its gateway's (the host veth's) MAC."""
    set_felix(lab, "Enabled")
    node_ns = lab.plan.node("node1").netns
    a1, a2 = pods["a1"], pods["a2"]
    veth = _host_veth(node_ns, a2["ip"])
    _, host_mac, _ = _link(node_ns, veth)
    _, pod_mac, _ = _link(a2["netns"], "eth0")
    neigh, entry = ["ip", "-n", node_ns, "neigh"], [a2["ip"], "dev", veth]
    wrong = ["lladdr", "02:00:00:00:0b:ad", "nud", "permanent"]
    subprocess.run([*neigh, "replace", *entry, *wrong], check=True)
    capture = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            a2["netns"],
            "timeout",
            "20",
            "tcpdump",
            "-l",
            "-e",
            "-nn",
            "-c",
            "3",
            "-i",
            "eth0",
            f"udp and src host {a1['ip']}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert capture.stderr is not None
        capture.stderr.readline()  # "listening on eth0": capturing from here on
        before = counters(lab, "node1")
        for _ in range(3):
            assert traffic.udp_request(a1["netns"], a2["ip"], 8081, b"clientip").startswith(
                a1["ip"]
            )
        out, _ = capture.communicate(timeout=20)
        after = counters(lab, "node1")
    finally:
        if capture.poll() is None:
            capture.kill()
            capture.wait()
        subprocess.run([*neigh, "del", *entry], check=False)
    frames = [line.split()[1:4] for line in out.splitlines()]
    assert len(frames) == 3, out
    assert all(f == [host_mac, ">", pod_mac + ","] for f in frames), out
    assert after["fwd_peer"] - before["fwd_peer"] >= 6, "both ways into the pods' netns"
    assert after["fwd_fib_miss"] == before["fwd_fib_miss"]

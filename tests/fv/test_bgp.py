"""BGP (Calico's BIRD backend) live, in one lab from a kOps spec with ``ipipMode: Never``:
node1 and node3 share 172.20.32.0/19, node2 is across the fabric's router. Every node runs
BIRD (configured by its agent), the router runs its own; pods are routed with plain routes
learnt over BGP, no encapsulation.

Shown: sessions (mesh + router) as `tabbyctl node status` reports them; learnt routes in the
kernel (proto bird) and in tby_routes (next hop: the owning node, also behind the router);
TCP and UDP both ways in the subnet and across the router, captured unencapsulated on the
fabric; a 20 MB transfer; an agent restart (BIRD keeps running, nothing is withdrawn); a BIRD
crash (peers keep the routes by graceful restart, the agent starts BIRD again); a dead node
(hold timer) and a deleted node withdrawn within about 10 s with traffic no longer sent there;
route reflectors instead of the mesh, switched live and back; a deleted node's peer dropped from
the other nodes' bird.conf and `tabbyctl node status`, and the machine peered again under a new
name (stale nodes, issue 9).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tabby.bpf.maps.routes import ROUTES_SPEC, RouteFlags, RoutesMap
from tabby.dataplane.bird import Session, sessions
from tabby.dataplane.node import remove_pins
from tabby.lab import bgp, capture, processes, state, traffic
from tabby.lab.cluster import Lab, pin_root

from . import spec_lab as spec_labs
from .service_lab import counters

pytestmark = [pytest.mark.root, pytest.mark.lab]
BIG = 20 << 20
WITHDRAW_BOUND_S = 12.0  # hold time 9 s + the agent's 1 s route sync + slack for a busy CPU
RELEASE_S = 60.0  # issue 9: a deleted or renamed node's BGP peers go within a minute


@pytest.fixture(scope="module")
def spec_lab(root_caps: None) -> Iterator[tuple[Lab, list[str]]]:
    spec = spec_labs.two_subnet_spec(None, ipipMode="Never")
    yield from spec_labs.spec_lab("b", spec, 1500)


@pytest.fixture(scope="module")
def lab(spec_lab: tuple[Lab, list[str]]) -> Lab:
    return spec_lab[0]


@pytest.fixture(scope="module")
def pods(lab: Lab) -> dict[str, dict[str, Any]]:
    out = spec_labs.add_pods(lab, spec_labs.FOUR_PODS)
    for name, node in (("p2", "node2"), ("p3", "node3")):  # learnt over BGP before any test
        wait_until(lambda n=node, p=name: learned(lab, "node1").get(block_of(out[p])) == ip(lab, n))
    return out


# --- helpers ----------------------------------------------------------------------------------


def ip(lab: Lab, node: str) -> str:
    return lab.plan.node(node).ip


def block_of(pod: dict[str, Any]) -> str:
    a, b, c, d = (int(x) for x in pod["ip"].split("."))
    return f"{a}.{b}.{c}.{d & ~63}/26"


def wait_until(ok: Callable[[], object], timeout_s: float = 20.0, what: str = "") -> float:
    """Seconds until ``ok()`` holds (polled every 0.1 s); fails the test after ``timeout_s``."""
    start = time.monotonic()
    while not ok():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"not within {timeout_s:.0f} s: {what or ok}")
        time.sleep(0.1)
    return time.monotonic() - start


def learned(lab: Lab, node: str) -> dict[str, str]:
    """tby_routes' remote-workload entries on ``node``: {cidr: next hop}."""
    m = ROUTES_SPEC.open_pinned(pin_root(lab.name, node))
    try:
        return {
            cidr: str(v.next_hop_ip)
            for cidr, v in RoutesMap(m).dump().items()
            if v.route_flags & RouteFlags.REMOTE_WL
        }
    finally:
        m.close()


def kernel_routes(netns: str) -> dict[str, dict[str, Any]]:
    out = subprocess.run(
        ["ip", "-n", netns, "-j", "route", "show"], capture_output=True, text=True, check=True
    ).stdout
    return {r["dst"]: r for r in json.loads(out)}


def bird_pid(lab: Lab, node: str) -> int:
    with open(os.path.join(os.path.dirname(lab.bird_socket(node)), "bird.pid")) as f:
        return int(f.read())


def peers(lab: Lab, node: str) -> dict[str, Session]:
    netns = lab.plan.fabric_netns if node == "fabric" else lab.plan.node(node).netns
    return {s.peer: s for s in sessions(lab.bird_socket(node), netns=netns)}


def bird_conf(lab: Lab, node: str) -> str:
    """The bird.conf a node's agent wrote."""
    with open(os.path.join(os.path.dirname(lab.bird_socket(node)), "bird.conf")) as f:
        return f.read()


def cli_sessions(lab: Lab, node: str) -> dict[str, str]:
    """`tabbyctl node status -o json` of a lab node: {peer address: state}."""
    out = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "tabbyctl"), "node", "status",
         "--name", lab.name, "--node", node, "-o", "json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return {row["peer"]: row["info"] for row in json.loads(out)}


def established(lab: Lab, node: str) -> set[str]:
    return {p for p, s in peers(lab, node).items() if s.info.startswith("Established")}


def exchange(src: dict[str, Any], dst: dict[str, Any]) -> None:
    """TCP and UDP from src to dst, each answered, with src's own address seen (no SNAT)."""
    seen = traffic.http_get(src["netns"], dst["ip"], 8080, "/clientip")
    assert seen.split(":")[0] == src["ip"]
    assert traffic.udp_request(src["netns"], dst["ip"], 8081, b"clientip").startswith(src["ip"])


def tcp_outcome(netns: str, ip: str, port: int, timeout_s: float = 2.0) -> str:
    """ "connected", or why not: "timeout" (dropped), "unreachable" (an ICMP error came back)."""
    import socket

    def go() -> str:
        try:
            socket.create_connection((ip, port), timeout=timeout_s).close()
        except TimeoutError:
            return "timeout"
        except OSError as e:
            return "refused" if isinstance(e, ConnectionRefusedError) else "unreachable"
        return "connected"

    return traffic.in_netns(netns, go)


def fabric_port(lab: Lab, node: str) -> str:
    return lab.plan.node(node).fabric_port


# --- tests ------------------------------------------------------------------------------------


def test_the_spec_runs_bird_with_a_plain_pool(spec_lab, pods):
    lab, said = spec_lab
    assert lab.backend == "bird"
    pool = lab.datastore().get("IPPool", "default-ipv4-ippool")
    assert pool is not None
    assert (pool["spec"]["ipipMode"], pool["spec"]["vxlanMode"]) == ("Never", "Never")
    assert any("fabric router: BIRD" in m for m in said)
    assert traffic.link_mtu(pods["p1"]["netns"]) == 1500, "no encapsulation: the full MTU"


def test_sessions_full_mesh_and_the_router(lab, pods):
    router = lab.plan.subnets[0].gateway
    nodes = {n.name: n.ip for n in lab.plan.nodes}
    for name in nodes:
        rows = peers(lab, name)
        want = {a for n, a in nodes.items() if n != name} | {router}
        assert set(rows) == want, name
        assert established(lab, name) == want, {p: s.info for p, s in rows.items()}
        assert {rows[a].type for a in want - {router}} == {"node-to-node mesh"}
        assert rows[router].type == "global"
        assert rows[router].exported == 1 and rows[router].imported == 0, "own block only"
    assert established(lab, "fabric") == set(nodes.values())
    # the CLI shows the same, as `calicoctl node status` does
    out = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "tabbyctl"), "node", "status",
         "--name", lab.name, "--node", "node2"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "IPv4 BGP status" in out and out.count("Established") == 3
    assert "node-to-node mesh" in out and nodes["node1"] in out


def test_learnt_routes_reach_the_kernel_and_the_route_map(lab, pods):
    b2, b3 = block_of(pods["p2"]), block_of(pods["p3"])
    n1 = lab.plan.node("node1")
    routes = kernel_routes(n1.netns)
    # across the router: the kernel's next hop is the router (recursive), in the subnet: node3
    assert (routes[b2]["gateway"], routes[b2]["protocol"]) == (n1.gateway, "bird")
    assert (routes[b3]["gateway"], routes[b3]["protocol"]) == (ip(lab, "node3"), "bird")
    assert kernel_routes(n1.netns)[block_of(pods["p1"])]["type"] == "blackhole"
    # the route map knows the owning node, whatever the kernel's next hop
    got = learned(lab, "node1")
    assert (got[b2], got[b3]) == (ip(lab, "node2"), ip(lab, "node3"))
    fabric = kernel_routes(lab.plan.fabric_netns)
    for pod, node in (("p1", "node1"), ("p2", "node2"), ("p3", "node3")):
        assert fabric[block_of(pods[pod])]["gateway"] == ip(lab, node), "the router learnt it"


def test_tcp_and_udp_plain_in_the_subnet_and_across_the_router(lab, pods):
    p1, p2, p3 = pods["p1"], pods["p2"], pods["p3"]
    with capture.capture(lab.plan.fabric_netns, fabric_port(lab, "node1")) as cap:
        for a, b in ((p1, p2), (p2, p1), (p1, p3), (p3, p1)):
            exchange(a, b)
    for other in (p2, p3):
        plain = cap.plain_between(p1["ip"], other["ip"])
        assert len(plain) >= 6, other["name"] if "name" in other else other["ip"]
        assert {p["IP"].src for p in plain} == {p1["ip"], other["ip"]}, "both ways"
        assert cap.ipip_between(p1["ip"], other["ip"]) == []
        assert cap.inner_between(p1["ip"], other["ip"]) == []
    assert cap.vxlan() == [] and not [
        p for p in cap.packets if p.haslayer("IP") and p["IP"].proto == 4
    ]


def test_a_large_transfer_across_the_router_and_the_figures(lab, pods, capsys):
    """20 MB p2 -> p1 across the router; then throughput and connections/s across nodes as
    ratios to the same node (p1 <- q1), in this run (figures, not assertions)."""
    before = {n: counters(lab, n) for n in ("node1", "node2")}
    across = _download(pods["p1"], pods["p2"])
    for n in ("node1", "node2"):
        after = counters(lab, n)
        dropped = {r: after[r] - before[n][r] for r in after if r.startswith("drop_")}
        assert not any(dropped.values()), f"{n}: tabby dropped packets: {dropped}"
    same = _download(pods["p1"], pods["q1"])
    in_subnet = _download(pods["p1"], pods["p3"])
    rates = {k: traffic.conn_rate(pods["p1"]["netns"], pods[k]["ip"]) for k in ("q1", "p3", "p2")}
    with capsys.disabled():
        print(
            f"\nNever+BGP, 20 MB download: same node {same:.0f} Mbit/s, other node in the subnet "
            f"{in_subnet:.0f} ({in_subnet / same:.2f}x), across the router {across:.0f} "
            f"({across / same:.2f}x); connections/s: same node {rates['q1']:.0f}, in the subnet "
            f"{rates['p3']:.0f} ({rates['p3'] / rates['q1']:.2f}x), across the router "
            f"{rates['p2']:.0f} ({rates['p2'] / rates['q1']:.2f}x)"
        )


def test_an_agent_restart_keeps_bird_and_every_route(lab, pods):
    node = lab.plan.node("node1")
    pid, routes = bird_pid(lab, "node1"), learned(lab, "node1")
    processes.stop(lab.agent_proc("node1"), signal.SIGKILL)
    try:
        time.sleep(2)  # a few keepalives: nothing is withdrawn, nobody notices
        assert bird_pid(lab, "node1") == pid and os.path.exists(f"/proc/{pid}")
        assert learned(lab, "node1") == routes
        exchange(pods["p1"], pods["p2"])
        assert ip(lab, "node1") in established(lab, "node2")
    finally:
        lab.start_agent(node)
    lab.wait_ready()
    assert bird_pid(lab, "node1") == pid, "the new agent adopted BIRD"
    assert learned(lab, "node1") == routes
    exchange(pods["p1"], pods["p2"])


def test_a_bird_crash_keeps_routes_on_the_peers_and_bird_comes_back(lab, pods):
    b2 = block_of(pods["p2"])
    pid = bird_pid(lab, "node2")
    os.kill(pid, signal.SIGKILL)
    # graceful restart: node1 keeps node2's block (kernel and route map) while it restarts
    exchange(pods["p1"], pods["p2"])
    assert b2 in kernel_routes(lab.plan.node("node1").netns) and b2 in learned(lab, "node1")
    wait_until(lambda: _pid_or_none(lab, "node2") not in (None, pid), what="BIRD restarted")
    # every session back, the router's too (until then it holds node2's routes as stale)
    everyone = {n.ip for n in lab.plan.nodes if n.name != "node2"} | {lab.plan.subnets[0].gateway}
    wait_until(lambda: established(lab, "node2") == everyone, what="node2's sessions back")
    wait_until(lambda: ip(lab, "node2") in established(lab, "fabric"), what="router's back")
    assert learned(lab, "node1")[b2] == ip(lab, "node2")
    exchange(pods["p1"], pods["p2"])


def test_a_dead_node_is_withdrawn_within_10_s(lab, pods, capsys):
    """node2 stops answering (its BIRD frozen, as a hung machine): its peers' hold timers (9 s)
    expire, its block is withdrawn everywhere and traffic is no longer sent to node2."""
    b2, p1, p2 = block_of(pods["p2"]), pods["p1"], pods["p2"]
    n1 = lab.plan.node("node1")
    pid = bird_pid(lab, "node2")
    os.kill(pid, signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        took = wait_until(
            lambda: b2 not in learned(lab, "node1") and b2 not in kernel_routes(n1.netns),
            timeout_s=WITHDRAW_BOUND_S,
            what="node2's block withdrawn on node1",
        )
        wait_until(
            lambda: b2 not in kernel_routes(lab.plan.fabric_netns),
            timeout_s=WITHDRAW_BOUND_S - (time.monotonic() - frozen),
            what="the router withdrew node2's block too",
        )
        with capture.capture(lab.plan.fabric_netns, fabric_port(lab, "node2")) as cap:
            # node1 has no route: the router has none either and says so (ICMP unreachable)
            assert tcp_outcome(p1["netns"], p2["ip"], 8080) == "unreachable"
        assert [p for p in cap.packets if p.haslayer("IP") and p["IP"].dst == p2["ip"]] == []
        with capsys.disabled():
            print(f"\ndead node: its block withdrawn on node1 {took:.1f} s after it froze")
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: learned(lab, "node1").get(b2) == ip(lab, "node2"), what="block back")
    wait_until(lambda: b2 in kernel_routes(lab.plan.fabric_netns), what="router has it again")
    exchange(p1, p2)


def test_route_reflectors_instead_of_the_mesh(lab, pods):
    """Calico's recipe: nodeToNodeMeshEnabled false, node1 a route reflector (cluster ID
    annotation, label), a BGPPeer from every node to the reflectors; switched back after."""
    ds = lab.datastore()
    node1 = ds.get("Node", "node1")
    assert node1 is not None
    meta = {k: v for k, v in node1["metadata"].items() if k in ("name", "labels", "annotations")}
    rr = {
        **node1,
        "metadata": {
            **meta,
            "labels": {**meta.get("labels", {}), "route-reflector": "true"},
            "annotations": {
                **meta.get("annotations", {}),
                "projectcalico.org/RouteReflectorClusterID": "244.0.0.1",
            },
        },
    }
    peer = {
        "apiVersion": "projectcalico.org/v3",
        "kind": "BGPPeer",
        "metadata": {"name": "peer-with-route-reflectors"},
        "spec": {
            "nodeSelector": "all()",
            "peerSelector": "route-reflector == 'true'",
            "keepaliveTime": "3s",
            "maxRestartTime": "30s",
        },
    }
    router = lab.plan.subnets[0].gateway
    n1, n2, n3 = (ip(lab, n) for n in ("node1", "node2", "node3"))
    b3 = block_of(pods["p3"])
    try:
        ds.apply([rr, peer])
        ds.patch("BGPConfiguration", "default", None, {"spec": {"nodeToNodeMeshEnabled": False}})
        lab.wait_ready()
        wait_until(lambda: established(lab, "node2") == {router, n1}, what="node2: RR + router")
        wait_until(lambda: established(lab, "node1") == {router, n2, n3}, what="RR: clients")
        assert set(peers(lab, "node2")) == {router, n1}, "no mesh session left"
        assert peers(lab, "node2")[n1].type == "node specific"
        # node3's block reaches node2 through the reflector, its next hop still node3
        wait_until(lambda: learned(lab, "node2").get(b3) == n3, what="reflected route")
        exchange(pods["p2"], pods["p3"])
    finally:
        ds.patch("BGPConfiguration", "default", None, {"spec": {"nodeToNodeMeshEnabled": True}})
        ds.delete("BGPPeer", "peer-with-route-reflectors")
        ds.apply([{**node1, "metadata": meta}])
    lab.wait_ready()
    wait_until(lambda: established(lab, "node2") == {router, n1, n3}, what="mesh back")


# --- measurement helpers ------------------------------------------------------------------------


def _pid_or_none(lab: Lab, node: str) -> int | None:
    try:
        return bird_pid(lab, node)
    except (OSError, ValueError):
        return None


def _download(client: dict[str, Any], server: dict[str, Any]) -> float:
    """Mbit/s of GET /bytes?n=BIG from ``server`` (netexec) into ``client``."""
    start = time.monotonic()
    got = traffic.http_download_len(client["netns"], server["ip"], 8080, BIG)
    took = time.monotonic() - start
    assert got == BIG
    return BIG * 8 / took / 1e6


def test_switching_the_pool_live_hands_routes_between_bird_and_tabby(lab, pods):
    """Never -> CrossSubnet (IP-in-IP across the router): BIRD stops programming the pool (its
    kernel filter), tabby's route managers take it from the IPAM blocks; and back."""
    b2, b3 = block_of(pods["p2"]), block_of(pods["p3"])
    n1 = lab.plan.node("node1")
    ds = lab.datastore()
    try:
        ds.patch("IPPool", "default-ipv4-ippool", None, {"spec": {"ipipMode": "CrossSubnet"}})
        lab.wait_ready()
        wait_until(
            lambda: (
                {kernel_routes(n1.netns).get(b, {}).get("protocol") for b in (b2, b3)} == {"88"}
            ),
            what="tabby's routes (proto 88) replace BIRD's",
        )
        bird_left = [d for d, r in kernel_routes(n1.netns).items() if r.get("protocol") == "bird"]
        assert bird_left == [], "BIRD programs no encapsulated pool (not even the blackhole)"
        with capture.capture(lab.plan.fabric_netns, fabric_port(lab, "node1")) as cap:
            exchange(pods["p1"], pods["p2"])
            exchange(pods["p1"], pods["p3"])
        assert cap.ipip_between(pods["p1"]["ip"], pods["p2"]["ip"]), "across: IP-in-IP"
        assert cap.plain_between(pods["p1"]["ip"], pods["p3"]["ip"]), "in the subnet: plain"
    finally:
        ds.patch("IPPool", "default-ipv4-ippool", None, {"spec": {"ipipMode": "Never"}})
    lab.wait_ready()
    wait_until(
        lambda: {kernel_routes(n1.netns).get(b, {}).get("protocol") for b in (b2, b3)} == {"bird"},
        what="BIRD's routes back",
    )
    exchange(pods["p1"], pods["p2"])


def test_a_deleted_node_is_withdrawn_within_10_s(lab, pods):
    """node3 leaves the cluster (its Node deleted, the machine gone: its link cut): node1 drops
    the mesh session at once (config), the router on its hold timer. Last in the module: the
    lab's node controller releases a deleted node's blocks and pods (test_stale_nodes.py), so
    node3 comes back empty, and only its BGP session is checked afterwards."""
    b3, p1, p3 = block_of(pods["p3"]), pods["p1"], pods["p3"]
    n1 = lab.plan.node("node1")
    ds = lab.datastore()
    saved = ds.get("Node", "node3")
    assert saved is not None
    port = fabric_port(lab, "node3")
    subprocess.run(["ip", "-n", lab.plan.fabric_netns, "link", "set", port, "down"], check=True)
    try:
        ds.delete("Node", "node3")
        deleted_at = time.monotonic()
        wait_until(
            lambda: b3 not in learned(lab, "node1") and b3 not in kernel_routes(n1.netns),
            timeout_s=WITHDRAW_BOUND_S,
            what="node3's block withdrawn on node1",
        )
        assert ip(lab, "node3") not in peers(lab, "node1"), "the mesh session is gone"
        ip3 = ip(lab, "node3")
        wait_until(
            lambda: all(
                f"neighbor {ip3} " not in bird_conf(lab, n) and ip3 not in cli_sessions(lab, n)
                for n in ("node1", "node2")
            ),
            timeout_s=RELEASE_S,
            what="node3's peer dropped from the other nodes' bird.conf and node status",
        )
        released_s = time.monotonic() - deleted_at
        print(
            f"\nnode3's BGP peers released on node1 and node2 {released_s:.1f} s after its delete"
        )
        wait_until(
            lambda: b3 not in kernel_routes(lab.plan.fabric_netns),
            timeout_s=WITHDRAW_BOUND_S,
            what="the router withdrew node3's block",
        )
        assert tcp_outcome(p1["netns"], p3["ip"], 8080) == "unreachable"
    finally:
        subprocess.run(["ip", "-n", lab.plan.fabric_netns, "link", "set", port, "up"], check=True)
        meta = {
            k: v for k, v in saved["metadata"].items() if k in ("name", "labels", "annotations")
        }
        ds.apply([{**saved, "metadata": meta}])
    wait_until(lambda: ip(lab, "node3") in peers(lab, "node1"), what="node3 peers again")


def test_a_node_replaced_under_a_new_name_peers_under_it(lab, pods):
    """node3's machine comes back as "node3b" (a replaced instance registering under a new
    name; node3's Node deleted, its agent and BIRD gone): no peer of the old name is left, and
    the other nodes peer with the machine again under the new one."""
    ip3 = ip(lab, "node3")
    ds = lab.datastore()
    saved = ds.get("Node", "node3")
    assert saved is not None
    processes.stop(lab.agent_proc("node3"))
    old_bird = bird_pid(lab, "node3")
    os.kill(old_bird, signal.SIGTERM)  # the machine's BIRD goes with it (started by its agent)
    wait_until(lambda: not os.path.exists(f"/proc/{old_bird}"), what="node3's BIRD stopped")
    ds.delete("Node", "node3")
    wait_until(
        lambda: all(f"neighbor {ip3} " not in bird_conf(lab, n) for n in ("node1", "node2")),
        timeout_s=RELEASE_S,
        what="node3's peer released",
    )
    remove_pins(pin_root(lab.name, "node3"))  # a fresh machine: the old agent's pins are gone
    meta = {k: v for k, v in saved["metadata"].items() if k in ("labels", "annotations")}
    ds.apply([{**saved, "metadata": {**meta, "name": "node3b"}}])
    lab.start_agent(dataclasses.replace(lab.plan.node("node3"), name="node3b"))
    took_s = wait_until(
        lambda: all(
            cli_sessions(lab, n).get(ip3, "").startswith("Established") for n in ("node1", "node2")
        ),
        timeout_s=RELEASE_S,
        what="node1 and node2 peered with node3b",
    )
    print(f"\nnode3b peered with node1 and node2 {took_s:.1f} s after its agent started")
    for n in ("node1", "node2"):
        assert bird_conf(lab, n).count(f"neighbor {ip3} ") == 1, n
    with open(os.path.join(bgp.node_bird_dir(state.lab_dir(lab.name), "node3b"), "bird.pid")) as f:
        new_bird = int(f.read())
    assert new_bird != old_bird and os.path.exists(f"/proc/{new_bird}"), "node3b runs its own BIRD"

"""Pod networking in the lab, on real packets: same node, across nodes, across subnets, VXLAN."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading

import pytest

from tabby.lab import capture, traffic
from tabby.lab.cluster import Lab, LabError, pin_root
from tabby.lab.pods import run_cni

pytestmark = [pytest.mark.root, pytest.mark.lab]


@pytest.fixture(scope="module")
def pods(lab: Lab) -> dict[str, dict]:
    """a1, a2 on node1 (subnet A); b on node2 (subnet B); c on node3 (subnet A)."""
    for name, node in (("a1", "node1"), ("a2", "node1"), ("b", "node2"), ("c", "node3")):
        lab.add_pod(name, node, wait=False)
    lab.wait_ready()
    return {n: lab.pod(n) for n in ("a1", "a2", "b", "c")}


@pytest.mark.parametrize(
    "src,dst", [("a1", "a2"), ("a1", "b"), ("b", "a1"), ("a1", "c"), ("c", "b")]
)
def test_pods_reach_each_other_tcp_udp_with_their_own_source(pods, src, dst):
    s, d = pods[src], pods[dst]
    assert traffic.http_get(s["netns"], d["ip"], 8080, "/hostname") == dst
    seen = traffic.http_get(s["netns"], d["ip"], 8080, "/clientip").split(":")[0]
    assert seen == s["ip"], "no SNAT between pods"
    assert traffic.udp_request(s["netns"], d["ip"], 8081, b"clientip").split(":")[0] == s["ip"]


def test_cross_node_is_vxlan_on_the_wire_and_same_node_never_leaves(lab, pods):
    a1, a2, b = pods["a1"], pods["a2"], pods["b"]
    with capture.capture(lab.plan.fabric_netns, "node1") as cap:
        traffic.http_get(a1["netns"], b["ip"], 8080, "/hostname")
        traffic.udp_request(a1["netns"], b["ip"], 8081, b"x")
        traffic.http_get(a1["netns"], a2["ip"], 8080, "/hostname")
    inner = cap.inner_between(a1["ip"], b["ip"])
    assert len(inner) >= 4, f"expected VXLAN-encapsulated a1<->b packets, saw {len(cap.packets)}"
    outer = {(p["IP"].src, p["IP"].dst) for p in inner}
    assert outer <= {
        (lab.plan.node("node1").ip, lab.plan.node("node2").ip),
        (lab.plan.node("node2").ip, lab.plan.node("node1").ip),
    }
    assert all(p["UDP"].payload.vni == 4096 for p in inner)
    assert cap.plain_between(a1["ip"], b["ip"]) == [], (
        "pod traffic crossed the fabric unencapsulated"
    )
    assert cap.plain_between(a1["ip"], a2["ip"]) == []
    assert cap.inner_between(a1["ip"], a2["ip"]) == [], "same-node traffic left the node"


def test_pod_mtu_is_data_mtu_minus_vxlan_overhead(lab, pods):
    node1 = lab.plan.node("node1").netns
    data = traffic.link_mtu(node1, "eth0")
    assert traffic.link_mtu(pods["a1"]["netns"], "eth0") == data - 50
    assert traffic.link_mtu(node1, "tby.vxlan") == data - 50
    # a datagram filling the pod MTU crosses nodes whole
    big = b"y" * (data - 50 - 28)
    assert traffic.udp_request(pods["a1"]["netns"], pods["b"]["ip"], 8081, big) == big.decode()


def test_node_reaches_its_pods_and_remote_pods_and_pods_reach_their_node(lab, pods):
    node1 = lab.plan.node("node1")
    # node -> local pod
    assert traffic.http_get(node1.netns, pods["a1"]["ip"], 8080, "/hostname") == "a1"
    # node -> remote pod: sourced from node1's tunnel address, replies come back through VXLAN
    seen = traffic.http_get(node1.netns, pods["b"]["ip"], 8080, "/clientip").split(":")[0]
    assert seen.startswith("100."), f"node1 -> remote pod should use its tunnel address, saw {seen}"
    # pod -> its node: a listener on the node's address
    ready, got = threading.Event(), {}

    def serve():
        def inner():
            with socket.create_server((node1.ip, 7070)) as srv:
                ready.set()
                srv.settimeout(5)
                conn, peer = srv.accept()
                got["peer"] = peer[0]
                conn.sendall(b"node1")
                conn.close()

        traffic.in_netns(node1.netns, inner)

    t = threading.Thread(target=serve)
    t.start()
    ready.wait(5)

    def connect():
        with socket.create_connection((node1.ip, 7070), timeout=3) as s:
            return s.recv(16)

    assert traffic.in_netns(pods["a1"]["netns"], connect) == b"node1"
    t.join()
    assert got["peer"] == pods["a1"]["ip"]


def test_bpf_route_map_holds_pods_blocks_and_nodes(lab, pods):
    from tabby.bpf.maps.routes import ROUTES_SPEC, RouteFlags, RoutesMap

    routes = RoutesMap(ROUTES_SPEC.open_pinned(pin_root(lab.name, "node1"))).dump()
    # the lab's pool has natOutgoing (kOps' default): its pods leave the cluster SNATed; the
    # pod's netns id rides along (nat.h: port clashes with the pod's own sockets)
    pod = routes[f"{pods['a1']['ip']}/32"]
    want = RouteFlags.LOCAL_WL | RouteFlags.NAT_OUT | RouteFlags.NETNS
    assert pod.route_flags == want
    ids = subprocess.run(
        ["ip", "-n", lab.plan.node("node1").netns, "netns", "list-id"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout  # "nsid 1 (iproute2 netns name: <pod netns>)"
    assert re.search(rf"^nsid {pod.netnsid} .*{pods['a1']['netns']}\)", ids, re.M), ids
    remote = [c for c, v in routes.items() if RouteFlags.REMOTE_WL in v.route_flags]
    assert any(c.endswith("/26") for c in remote)
    assert f"{lab.plan.node('node2').ip}/32" in routes


def test_spoofed_source_is_dropped_and_counted(lab, pods):
    from scapy.all import IP, UDP

    def metric(node):
        def get():
            import urllib.request

            with urllib.request.urlopen("http://127.0.0.1:9099/metrics", timeout=2) as r:
                return r.read().decode()

        text = traffic.in_netns(lab.plan.node(node).netns, get)
        for line in text.splitlines():
            if line.startswith('tabby_bpf_packets_total{reason="drop_spoof"}'):
                return float(line.split()[-1])
        return 0.0

    before = metric("node1")
    ready, got = threading.Event(), []

    def listen():
        def inner():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("0.0.0.0", 9911))
                s.settimeout(1.5)
                ready.set()
                try:
                    got.append(s.recvfrom(100))
                except TimeoutError:
                    pass

        traffic.in_netns(pods["b"]["netns"], inner)

    t = threading.Thread(target=listen)
    t.start()
    ready.wait(5)

    def spoof():
        # a raw IP socket: the pod's kernel routes it and resolves the gateway's MAC
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw_sock:
            for _ in range(3):
                pkt = IP(src="100.96.99.99", dst=pods["b"]["ip"]) / UDP(sport=1, dport=9911)
                raw_sock.sendto(bytes(pkt / b"evil"), (pods["b"]["ip"], 0))
            # a legitimate datagram through the same socket proves the path is open
            pkt = IP(src=pods["a1"]["ip"], dst=pods["b"]["ip"]) / UDP(sport=2, dport=9911)
            raw_sock.sendto(bytes(pkt / b"fine"), (pods["b"]["ip"], 0))

    traffic.in_netns(pods["a1"]["netns"], spoof)
    t.join()
    assert [d for d, _ in got] == [b"fine"]
    assert metric("node1") == before + 3


def test_second_lab_up_with_the_same_name_is_refused(lab):
    before = sorted(os.listdir("/run/netns"))
    with pytest.raises(LabError, match="already exists"):
        Lab.up(lab.name, 3, progress=lambda _m: None)
    assert sorted(os.listdir("/run/netns")) == before


def test_cni_add_without_netns_is_a_clean_error(lab, pods):
    blocks_before = lab.datastore().list("IPAMBlock")[0]
    with pytest.raises(Exception, match="CNI_NETNS is required"):
        run_cni(lab.plan, "node1", "ADD", "cid-x", "default", "ghost", None)
    assert lab.datastore().list("IPAMBlock")[0] == blocks_before


def _bpf_counter(lab: Lab, node: str, reason: str) -> float:
    import urllib.request

    def get() -> str:
        with urllib.request.urlopen("http://127.0.0.1:9099/metrics", timeout=2) as r:
            return r.read().decode()

    for line in traffic.in_netns(lab.plan.node(node).netns, get).splitlines():
        if line.startswith(f'tabby_bpf_packets_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_vxlan_from_an_unknown_vtep_is_dropped_and_from_a_node_accepted(lab, pods):
    """Anyone who can reach UDP 4789 must not be able to inject packets into pods."""
    from scapy.all import IP, UDP, VXLAN, Ether

    a1, node1 = pods["a1"], lab.plan.node("node1")
    inner = (
        Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01")
        / IP(src=pods["b"]["ip"], dst=a1["ip"])
        / UDP(sport=5, dport=9912)
    )

    def inject(netns: str, payload: bytes) -> None:
        def go() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(bytes(VXLAN(flags=0x08, vni=4096) / inner / payload), (node1.ip, 4789))

        traffic.in_netns(netns, go)

    got: list[bytes] = []
    ready = threading.Event()

    def listen() -> None:
        def inner_listen() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("0.0.0.0", 9912))
                s.settimeout(1.5)
                ready.set()
                while True:
                    try:
                        got.append(s.recv(100))
                    except TimeoutError:
                        return

        traffic.in_netns(a1["netns"], inner_listen)

    before = _bpf_counter(lab, "node1", "drop_unknown_vtep")
    t = threading.Thread(target=listen)
    t.start()
    ready.wait(5)
    inject(lab.plan.external_netns, b"from-outside")  # 203.0.113.10: not a node
    inject(lab.plan.node("node2").netns, b"from-node2")  # a known VTEP
    t.join()
    assert got == [b"from-node2"]
    assert _bpf_counter(lab, "node1", "drop_unknown_vtep") == before + 1


def test_the_tunnel_device_carries_no_ipv6_of_its_own(lab, pods):
    """tby.vxlan is IPv4 only: with IPv6 on, the kernel sends MLD reports out of it (at link up,
    and each time IPv6 forwarding is switched), which tby_tun_egress drops as drop_no_route."""
    node1 = lab.plan.node("node1").netns
    out = subprocess.run(
        ["ip", "-n", node1, "-6", "addr", "show", "dev", "tby.vxlan"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "inet6" not in out, out

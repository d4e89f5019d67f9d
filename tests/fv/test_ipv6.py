"""IPv6, live, in one lab from examples/kops-ipv6-cluster.yaml (nonMasqueradeCIDR ::/0, an IPv6
pool fd7a:b1e:96::/48 with /122 blocks, no encapsulation): a dual-stack lab. node1 and node3 share
the first subnet (172.20.32.0/19 + fd7a:b1e:20:1::/64), node2 is across the fabric's router.

Shown: pods get an IPv4 and an IPv6 address (IPAM /122 blocks), their IPv6 gateway is the
link-local fe80::ecee:eeff:feee:eeee answered by the node (neighbor discovery through tabby's
programs); BIRD on every node and on the router peers over IPv6 too and announces the IPv6
blocks, which land in the kernels (next hop: the node in the subnet, the router across it);
TCP and UDP over IPv6 pod to pod on one node, in the subnet and across the router, captured on
the fabric as plain IPv6 (next header TCP / UDP, nothing encapsulated); a 20 MB transfer.
Services: an IPv6 ClusterIP (ipFamilies [IPv6], from the lab's IPv6 service CIDR) reached from a
pod over TCP and UDP, balanced at connect() over backends on the other nodes, the client's
address kept, the reply's source the ClusterIP; a PreferDualStack Service gets both families;
an IPv6 NodePort reached from outside the cluster (the fabric's router), translated per packet:
the local backend sees the client, the remote one the node (SNAT); TCP, UDP, 40 MB through it.
A pod's forged IPv6 source is dropped (anti-spoofing, tby_wl6). NetworkPolicy over IPv6
(policy6.h): default deny, podSelector and /128 ipBlock peers, egress deny with replies passing,
a held connection surviving a policy change, neighbor discovery through an isolated pod.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6

from tabby.bpf.maps.counters import Reason
from tabby.bpf.maps.ctlb import CTLB_SOCKETS6_SPEC
from tabby.calc.names import POD_GATEWAY6
from tabby.dataplane.bird import sessions
from tabby.lab import capture, traffic
from tabby.lab.cluster import Lab, pin_root
from tabby.lab.sockclient import SocketClient
from tabby.model import kops

from . import spec_lab as spec_labs
from .service_lab import counter_delta, counters

pytestmark = [pytest.mark.root, pytest.mark.lab]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "kops-ipv6-cluster.yaml"
POOL6 = ipaddress.ip_network("fd7a:b1e:96::/48")
SERVICE6 = ipaddress.ip_network("fd7a:b1e:64::/108")  # the example's serviceClusterIPRange
BIG = 20 << 20
NETPOL_CASES = Path(__file__).parent / "netpol" / "cases.json"


@pytest.fixture(scope="module")
def spec_lab(root_caps: None) -> Iterator[tuple[Lab, list[str]]]:
    result = kops.parse(list(yaml.safe_load_all(EXAMPLE.read_text())))
    assert result.ok and result.cluster is not None, [str(e) for e in result.errors]
    yield from spec_labs.spec_lab("v", result.cluster, 1500)


@pytest.fixture(scope="module")
def lab(spec_lab: tuple[Lab, list[str]]) -> Lab:
    return spec_lab[0]


@pytest.fixture(scope="module")
def pods(lab: Lab) -> dict[str, dict[str, Any]]:
    out = spec_labs.add_pods(lab, spec_labs.FOUR_PODS)
    n1 = lab.plan.node("node1").netns
    for name in ("p2", "p3"):  # learnt over BGP before any test
        wait_until(lambda p=name: block6_of(out[p]) in kernel_routes6(n1), f"{name}'s block")
    return out


# --- helpers ----------------------------------------------------------------------------------


def wait_until(ok: Any, what: str, timeout_s: float = 20.0) -> None:
    start = time.monotonic()
    while not ok():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.1)


def block6_of(pod: dict[str, Any]) -> str:
    return str(ipaddress.ip_network(f"{pod['ip6']}/122", strict=False))


def kernel_routes6(netns: str) -> dict[str, dict[str, Any]]:
    out = subprocess.run(
        ["ip", "-6", "-n", netns, "-j", "route", "show"], capture_output=True, text=True, check=True
    ).stdout
    return {r["dst"]: r for r in json.loads(out)}


def established(lab: Lab, node: str) -> set[str]:
    netns = lab.plan.fabric_netns if node == "fabric" else lab.plan.node(node).netns
    rows = sessions(lab.bird_socket(node), netns=netns)
    return {s.peer for s in rows if s.info.startswith("Established")}


def exchange6(src: dict[str, Any], dst: dict[str, Any]) -> None:
    """TCP and UDP over IPv6 from src to dst, each answered, src's own IPv6 address seen."""
    seen = traffic.http_get(src["netns"], dst["ip6"], 8080, "/clientip")
    assert seen.rsplit(":", 1)[0] == src["ip6"]
    reply = traffic.udp_request(src["netns"], dst["ip6"], 8081, b"clientip")
    assert reply.rsplit(":", 1)[0] == src["ip6"]


def drops(lab: Lab, nodes: tuple[str, ...]) -> dict[str, int]:
    return {
        f"{n}:{reason}": value
        for n in nodes
        for reason, value in counters(lab, n).items()
        if reason.startswith("drop_")
    }


# --- tests ------------------------------------------------------------------------------------


def test_the_ipv6_spec_builds_a_dual_stack_lab(spec_lab, pods):
    lab, said = spec_lab
    assert lab.backend == "bird" and lab.plan.ipv6
    assert any("dual-stack" in m for m in said)
    ds = lab.datastore()
    pool = ds.get("IPPool", "default-ipv6-ippool")
    assert pool is not None and ipaddress.ip_network(pool["spec"]["cidr"]) == POOL6
    assert (pool["spec"]["blockSize"], pool["spec"]["vxlanMode"]) == (122, "Never")
    for name, rec in pods.items():
        obj = ds.get("Pod", name, "default")
        assert obj is not None
        assert [e["ip"] for e in obj["status"]["podIPs"]] == [rec["ip"], rec["ip6"]]
        assert ipaddress.ip_address(rec["ip6"]) in POOL6
    blocks = {b["spec"]["cidr"]: b["spec"]["affinity"] for b in ds.list("IPAMBlock")[0]}
    assert blocks[block6_of(pods["p2"])] == "host:node2"
    assert traffic.link_mtu(pods["p1"]["netns"]) == 1500, "no encapsulation: the full MTU"


def test_ipv6_sessions_and_learnt_blocks_in_every_kernel(lab, pods):
    nodes = {n.name: n for n in lab.plan.nodes}
    router6 = lab.plan.subnets[0].gateway6
    for name in nodes:
        want6 = {n.ip6 for other, n in nodes.items() if other != name} | {router6}
        wait_until(lambda n=name, w=want6: w <= established(lab, n), f"{name}'s IPv6 sessions")
    assert {n.ip6 for n in nodes.values()} <= established(lab, "fabric")
    n1 = nodes["node1"]
    routes = kernel_routes6(n1.netns)
    b2, b3 = block6_of(pods["p2"]), block6_of(pods["p3"])
    assert (routes[b2]["gateway"], routes[b2]["protocol"]) == (n1.gateway6, "bird")
    assert (routes[b3]["gateway"], routes[b3]["protocol"]) == (nodes["node3"].ip6, "bird")
    assert routes[block6_of(pods["p1"])]["type"] == "blackhole", "own block: the blackhole"
    fabric = kernel_routes6(lab.plan.fabric_netns)
    for pod, node in (("p1", "node1"), ("p2", "node2"), ("p3", "node3")):
        assert fabric[block6_of(pods[pod])]["gateway"] == nodes[node].ip6, "the router learnt it"
    out = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "tabbyctl"), "node", "status",
         "--name", lab.name, "--node", "node2"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    v4, _, v6 = out.partition("IPv6 BGP status")
    assert v4.count("Established") == 3 and v6.count("Established") == 3


def test_tcp_and_udp_over_ipv6_are_plain_on_the_fabric(lab, pods):
    p1, q1, p2, p3 = pods["p1"], pods["q1"], pods["p2"], pods["p3"]
    before = drops(lab, ("node1", "node2", "node3"))
    port = lab.plan.node("node1").fabric_port
    with capture.capture(lab.plan.fabric_netns, port) as cap:
        for a, b in ((p1, q1), (p1, p2), (p2, p1), (p1, p3), (p3, p1)):
            exchange6(a, b)
    for other in (p2, p3):
        plain = cap.plain6_between(p1["ip6"], other["ip6"])
        assert {p[IPv6].src for p in plain} == {p1["ip6"], other["ip6"]}, "both ways"
        headers = {p[IPv6].nh for p in plain}
        assert headers == {6, 17}, f"next header TCP and UDP only, got {headers}"
    assert not cap.plain6_between(p1["ip6"], q1["ip6"]), "same node: never on the fabric"
    assert not [p for p in cap.packets if IP in p and IPv6 in p], "nothing IPv6-in-IPv4"
    assert cap.vxlan() == []
    assert drops(lab, ("node1", "node2", "node3")) == before, "tabby dropped nothing"


def test_the_pods_ipv6_gateway_is_the_nodes_link_local_by_neighbor_discovery(lab, pods):
    p1 = pods["p1"]
    exchange6(p1, pods["p2"])
    neigh = json.loads(
        subprocess.run(
            ["ip", "-6", "-n", p1["netns"], "-j", "neigh", "show", "dev", "eth0"],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    gw = [n for n in neigh if n["dst"] == POD_GATEWAY6]
    assert gw and "lladdr" in gw[0] and "FAILED" not in gw[0].get("state", [])
    node_ns = lab.plan.node("node1").netns
    links = json.loads(
        subprocess.run(
            ["ip", "-n", node_ns, "-j", "link", "show"], capture_output=True, text=True, check=True
        ).stdout
    )
    macs = {link["ifname"]: link.get("address") for link in links}
    host_side = [name for name, mac in macs.items() if mac == gw[0]["lladdr"]]
    assert host_side and host_side[0].startswith("tby"), "the node's veth answered"


def test_a_large_ipv6_transfer_across_the_router_and_the_figures(lab, pods, capsys):
    """20 MB p2 -> p1 over IPv6 across the router; the same node, the subnet and the IPv4 path
    alongside, and connections/s (figures, not assertions: ratios within this run)."""
    before = drops(lab, ("node1", "node2"))
    across6 = _download(pods["p1"], pods["p2"], "ip6")
    assert drops(lab, ("node1", "node2")) == before, "tabby dropped nothing"
    across4 = _download(pods["p1"], pods["p2"], "ip")
    same6 = _download(pods["p1"], pods["q1"], "ip6")
    subnet6 = _download(pods["p1"], pods["p3"], "ip6")
    rates = {k: traffic.conn_rate(pods["p1"]["netns"], pods[k]["ip6"]) for k in ("q1", "p3", "p2")}
    with capsys.disabled():
        print(
            f"\nIPv6 20 MB download: same node {same6:.0f} Mbit/s, other node in the subnet "
            f"{subnet6:.0f} ({subnet6 / same6:.2f}x), across the router {across6:.0f} "
            f"({across6 / same6:.2f}x); IPv4 across the router {across4:.0f} (IPv6/IPv4 "
            f"{across6 / across4:.2f}x); IPv6 connections/s: same node {rates['q1']:.0f}, in the "
            f"subnet {rates['p3']:.0f} ({rates['p3'] / rates['q1']:.2f}x), across the router "
            f"{rates['p2']:.0f} ({rates['p2'] / rates['q1']:.2f}x)"
        )


def _download(client: dict[str, Any], server: dict[str, Any], family: str) -> float:
    start = time.monotonic()
    got = traffic.http_download_len(client["netns"], server[family], 8080, BIG)
    took = time.monotonic() - start
    assert got == BIG
    return BIG * 8 / took / 1e6


# --- services over IPv6 -------------------------------------------------------------------------


def service(name: str, selector: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "selector": {"app": selector},
            "ports": [
                {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                {"name": "udp", "port": 53, "targetPort": 8081, "protocol": "UDP"},
            ],
            **spec,
        },
    }


@pytest.fixture(scope="module")
def web6(lab: Lab, pods: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Service web6 (IPv6 only) over w2 (node2) and w3 (node3)."""
    for name, node in (("w2", "node2"), ("w3", "node3")):
        lab.add_pod(name, node, labels={"app": "web6"}, wait=False)
    ds = lab.datastore()
    ds.apply([service("web6", "web6", ipFamilies=["IPv6"], ipFamilyPolicy="SingleStack")])
    lab.wait_ready()
    svc = ds.get("Service", "web6", "default")
    assert svc is not None
    return svc


def pod_client(lab: Lab, pod: str) -> SocketClient:
    """A client process in the pod's netns and cgroup: the socket hooks follow the cgroup."""
    netns, cgroup = lab.exec_argv(pod, [])
    return SocketClient(netns, cgroup)


def test_an_ipv6_cluster_ip_balances_tcp_and_udp_across_nodes_at_connect(lab, pods, web6):
    vip = web6["spec"]["clusterIP"]
    assert web6["spec"]["clusterIPs"] == [vip] and ipaddress.ip_address(vip) in SERVICE6
    p1 = pods["p1"]
    before = counters(lab, "node1")
    with pod_client(lab, "p1") as c:
        tcp = [c("tcp", ip=vip, port=80, path="/hostname") for _ in range(12)]
        client = c("tcp", ip=vip, port=80, path="/clientip")
        udp = [c("sendto", ip=vip, port=53, payload="hostname") for _ in range(12)]
    assert {a.get("body") for a in tcp} == {"w2", "w3"}, tcp  # both backends, other nodes
    assert all(a["peer"][:2] == [vip, 80] for a in tcp), "getpeername6 shows the ClusterIP"
    assert client["body"].rsplit(":", 1)[0] == p1["ip6"], "the pod's own address: no SNAT"
    assert {a.get("reply") for a in udp} == {"w2", "w3"}, udp
    assert all(a["src"][:2] == [vip, 53] for a in udp), "recvmsg6 shows the ClusterIP"
    dump = json.loads(
        subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "tabbyctl"), "bpf", "nat", "dump",
             "--lab", lab.name, "--node", "node1", "-o", "json"],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    rows = {(r["addr"], r["port"], r["protocol"]): r for r in dump}
    backends = {lab.pod("w2")["ip6"], lab.pod("w3")["ip6"]}
    assert {b["addr"] for b in rows[(vip, 80, "TCP")]["backends"]} == backends
    assert {b["port"] for b in rows[(vip, 53, "UDP")]["backends"]} == {8081}
    after = counters(lab, "node1")
    assert counter_delta(before, after, Reason.CTLB_CONNECT) >= 13
    assert counter_delta(before, after, Reason.CTLB_SENDMSG) >= 12
    # the connections' translations lived in their sockets (tby_ctlb_conns6): the LRU holds
    # the unconnected datagrams' only
    lru = CTLB_SOCKETS6_SPEC.open_pinned(pin_root(lab.name, "node1"))
    try:
        assert {v.port for _, v in lru.items()} == {53}
    finally:
        lru.close()


def test_an_ipv6_cluster_ip_without_endpoints_refuses_and_dual_stack_gets_both(lab, pods, web6):
    ds = lab.datastore()
    ds.apply([
        service("empty6", "nobody", ipFamilies=["IPv6"]),
        service("dual", "web6", ipFamilyPolicy="PreferDualStack"),
    ])  # fmt: skip
    lab.wait_ready()
    empty = ds.get("Service", "empty6", "default")
    dual = ds.get("Service", "dual", "default")
    assert empty is not None and dual is not None
    v4, v6 = dual["spec"]["clusterIPs"]
    assert ipaddress.ip_address(v4).version == 4 and ipaddress.ip_address(v6) in SERVICE6
    with pod_client(lab, "p1") as c:
        for ip in (v4, v6):  # IPv4 (tabby's IPv4 NAT) and IPv6 (connect6) frontends of one Service
            assert c("tcp", ip=ip, port=80, path="/hostname").get("body") in {"w2", "w3"}
        refused = c("tcp", ip=empty["spec"]["clusterIP"], port=80, path="/hostname")
    assert refused.get("errno") == errno.EPERM, refused
    ds.delete("Service", "empty6", "default")
    ds.delete("Service", "dual", "default")


def test_an_ipv6_nodeport_per_packet_local_backend_keeps_the_client_remote_is_snated(
    lab, pods, web6
):
    """From the fabric's router (an IPv6 client outside the cluster) to node2's IPv6 address:
    w2 (on node2) sees the client, w3 (node3) sees node2 (SNAT, as kube-proxy); TCP and UDP."""
    ds = lab.datastore()
    ds.apply([service("np6", "web6", type="NodePort", ipFamilies=["IPv6"])])
    lab.wait_ready()
    np6 = ds.get("Service", "np6", "default")
    assert np6 is not None
    tcp_port, udp_port = (p["nodePort"] for p in np6["spec"]["ports"])
    node2 = lab.plan.node("node2")
    client = lab.plan.subnets[1].gateway6  # the router's address on node2's subnet
    fabric = lab.plan.fabric_netns
    before = counters(lab, "node2")
    try:
        seen: dict[str, set[str]] = {}
        for _ in range(16):
            name = traffic.http_get(fabric, node2.ip6, tcp_port, "/hostname")
            source = traffic.http_get(fabric, node2.ip6, tcp_port, "/clientip")
            seen.setdefault(name, set()).add(source.rsplit(":", 1)[0])
        udp = {traffic.udp_request(fabric, node2.ip6, udp_port, b"hostname") for _ in range(12)}
        for _ in range(2):  # large (GSO) segments through the rewritten checksums
            assert traffic.http_download_len(fabric, node2.ip6, tcp_port, BIG) == BIG
    finally:
        ds.delete("Service", "np6", "default")
    assert set(seen) == {"w2", "w3"} and udp == {"w2", "w3"}, (seen, udp)
    # a connection may land on the other backend than the /hostname one before it: the two
    # sources seen are the client's (local backend) and node2's (remote backend, SNAT)
    assert set().union(*seen.values()) == {client, node2.ip6}, seen
    after = counters(lab, "node2")
    assert counter_delta(before, after, Reason.NAT6_NEW) >= 16 * 2 + 12 + 2
    assert counter_delta(before, after, Reason.DROP_NAT_FAIL) == 0


def test_a_pod_cannot_send_ipv6_from_an_address_not_its_own(lab, pods):
    """tby_from_wl's IPv6 anti-spoofing (tby_wl6): a forged source (q1's address, from p1's
    veth) is dropped and counted; the pod's own address and link-local (ND) still pass."""
    import socket

    from scapy.layers.inet import UDP
    from scapy.layers.l2 import Ether

    p1, q1, p2 = pods["p1"], pods["q1"], pods["p2"]

    def send(src: str) -> None:
        frame = (
            Ether(src="02:00:00:00:00:01", dst="ee:ee:ee:ee:ee:ee")
            / IPv6(src=src, dst=p2["ip6"])
            / UDP(sport=40000, dport=8081)
            / b"x"
        )
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:  # the pod's own eth0
            raw.bind(("eth0", 0))
            for _ in range(3):
                raw.send(bytes(frame))

    before = counters(lab, "node1")
    traffic.in_netns(p1["netns"], lambda: send(q1["ip6"]))
    traffic.in_netns(p1["netns"], lambda: send("fd7a:b1e:96:ffff::1"))  # nobody's
    after = counters(lab, "node1")
    assert counter_delta(before, after, Reason.DROP_SPOOF) == 6
    exchange6(p1, p2)  # its own address: fine
    assert counter_delta(after, counters(lab, "node1"), Reason.DROP_SPOOF) == 0


# --- NetworkPolicy over IPv6 (policy6.h) -------------------------------------------------------


def netpol(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


def tcp_ok(src: dict[str, Any], ip: str) -> bool:
    """A new TCP connection from src to ip:8080 gets its HTTP answer (1 s: a drop is a timeout)."""
    return traffic.reachable(lambda: traffic.http_get(src["netns"], ip, 8080, "/hostname", 1.0))[0]


def udp_ok(src: dict[str, Any], ip: str) -> bool:
    return traffic.reachable(
        lambda: traffic.udp_request(src["netns"], ip, 8081, b"hostname", timeout_s=0.9)
    )[0]


def keepalive_get(s: Any) -> str:
    s.sendall(b"GET /hostname HTTP/1.1\r\nHost: p1\r\n\r\n")
    status, body = traffic.read_http_response(s)
    assert " 200 " in status
    return str(body.decode())


def test_network_policy_over_ipv6_default_deny_allow_ip_block_egress_and_replies(lab, pods):
    """p1 (node1) isolated for ingress: IPv6 TCP and UDP from p2 (across the router) and p3 are
    dropped; allowed from p2 by podSelector, p2 reaches it over IPv6 and IPv4 while p3 stays
    out; an ipBlock /128 of p3's IPv6 address lets p3 in over IPv6 only. An egress deny on p1
    leaves the replies of admitted connections alone (stateful) but stops p1's own flows; a
    connection admitted before the allowing policy goes away keeps going, a new one is refused.
    ND keeps working throughout (p1 answers through its gateway); node1's own stack (kubelet)
    reaches p1 over IPv6 while a pod of node1 cannot."""
    import socket

    from typer.testing import CliRunner

    from tabby.cli.main import app as tabbyctl

    p1, p2, p3 = pods["p1"], pods["p2"], pods["p3"]
    ds = lab.datastore()
    names = ("p1-deny", "p1-from-p2", "p1-from-p3-v6", "p1-no-egress")
    deny = netpol("p1-deny", podSelector={"matchLabels": {"app": "p1"}}, policyTypes=["Ingress"])
    from_p2 = netpol(
        "p1-from-p2",
        podSelector={"matchLabels": {"app": "p1"}},
        ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "p2"}}}]}],
    )
    from_p3_v6 = netpol(
        "p1-from-p3-v6",
        podSelector={"matchLabels": {"app": "p1"}},
        ingress=[
            {
                "from": [{"ipBlock": {"cidr": f"{p3['ip6']}/128"}}],
                "ports": [{"protocol": "TCP", "port": 8080}, {"protocol": "UDP", "port": 8081}],
            }
        ],
    )
    no_egress = netpol(
        "p1-no-egress", podSelector={"matchLabels": {"app": "p1"}}, policyTypes=["Egress"]
    )
    assert tcp_ok(p2, p1["ip6"]) and udp_ok(p2, p1["ip6"]), "open before any policy"
    before = counters(lab, "node1")
    held = None
    try:
        ds.apply([deny])
        lab.wait_ready()
        assert not tcp_ok(p2, p1["ip6"]) and not udp_ok(p2, p1["ip6"])
        assert not tcp_ok(p2, p1["ip"]), "IPv4 denied too"
        node1 = {"netns": lab.plan.node("node1").netns}  # its own stack: kubelet's probes
        assert tcp_ok(node1, p1["ip6"]) and udp_ok(node1, p1["ip6"]), "the node reaches its pod"
        assert not tcp_ok(pods["q1"], p1["ip6"]), "a pod of the same node does not"
        mid = counters(lab, "node1")
        assert counter_delta(before, mid, Reason.DROP_POL6_IN) >= 2

        ds.apply([from_p2])
        lab.wait_ready()
        assert tcp_ok(p2, p1["ip6"]) and udp_ok(p2, p1["ip6"]) and tcp_ok(p2, p1["ip"])
        assert not tcp_ok(p3, p1["ip6"]), "p3 is not selected"
        run = CliRunner().invoke(tabbyctl, ["bpf", "policy", "dump", "p1", "--lab", lab.name])
        assert run.exit_code == 0, run.output
        assert f"({p1['ip']}, {p1['ip6']})" in run.output and ": programmed" in run.output
        assert f"pod default/p2 ({p2['ip6']})" in run.output, "the IPv6 peer, named"
        # a connection admitted now, held open across the next policy changes
        held = traffic.in_netns(
            p2["netns"], lambda: socket.create_connection((p1["ip6"], 8080), timeout=2.0)
        )
        assert keepalive_get(held) == "p1"

        ds.apply([from_p3_v6])
        lab.wait_ready()
        assert tcp_ok(p3, p1["ip6"]) and udp_ok(p3, p1["ip6"]), "the /128 ipBlock"
        assert not tcp_ok(p3, p1["ip"]), "an IPv6 block admits no IPv4"

        ds.apply([no_egress])
        lab.wait_ready()
        # p1 forgets its gateway: its replies need neighbor discovery through both directions
        nd = counters(lab, "node1")
        subprocess.run(["ip", "-n", p1["netns"], "-6", "neigh", "flush", "all"], check=True)
        assert tcp_ok(p2, p1["ip6"]) and udp_ok(p2, p1["ip6"]), "replies pass an egress deny"
        assert counter_delta(nd, counters(lab, "node1"), Reason.PASS_ND) >= 2, "NS out, NA in"
        assert not tcp_ok(p1, p2["ip6"]) and not udp_ok(p1, p2["ip6"]), "p1's own flows"
        assert counter_delta(mid, counters(lab, "node1"), Reason.DROP_POL6_OUT) >= 2

        ds.delete("NetworkPolicy", "p1-from-p2", "default")
        lab.wait_ready()
        assert keepalive_get(held) == "p1", "admitted before the change: keeps going"
        assert not tcp_ok(p2, p1["ip6"]), "a new connection meets today's policy"
    finally:
        if held is not None:
            held.close()
        for name in names:
            if ds.get("NetworkPolicy", name, "default") is not None:
                ds.delete("NetworkPolicy", name, "default")
        lab.wait_ready()
    assert tcp_ok(p2, p1["ip6"]) and tcp_ok(p1, p2["ip6"]), "open again"


MATRIX_CASES6 = (
    "deny-all-ingress-x",
    "ingress-from-pod-b-any-ns",
    "ingress-named-udp",
    "egress-to-namespace-y",
    "replies-pass-reverse-denied",
    "ingress-ipblock-except",
    "egress-ipblock-one-pod",
    "update-policy",
)


def test_netpol_matrix_cases_over_ipv6_pod_addresses(lab, pods):
    """A handful of the 49 reachability cases (tests/fv/netpol/cases.json) probed on the x/y/z
    pods' IPv6 addresses (the harness's --via pod6; ipBlock templates become IPv6 prefixes)."""
    from tabby.lab import netpol

    cases = [c for c in netpol.load_cases(str(NETPOL_CASES)) if c["id"] in MATRIX_CASES6]
    assert len(cases) == len(MATRIX_CASES6)
    h = netpol.Harness(lab, "pod6", progress=lambda _m: None)
    h.setup()
    try:
        assert all(p["ip6"] for p in h.pods.values()), "dual-stack model pods"
        results = netpol.run_cases(h, cases, lambda _line: None)
    finally:
        h.teardown()
    failed = [r for r in results if r.status != "passed"]
    assert not failed, "\n".join(netpol.render(r) for r in failed)

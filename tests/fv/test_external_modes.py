"""bpfExternalServiceMode in the lab, on real packets from the external client (203.0.113.10):
a NodePort on node1 whose only backend lives on node2 (across the fabric's router).

Tunnel (the default): node1 DNATs and forwards the flow to node2 in the ext tunnel (VXLAN, VNI
TBY_EXT_VNI, built in BPF) without SNAT, so the backend sees the client's address; replies go back
to node1 the same way. DSR: the same forward half, but node2 sends the replies straight to the
client with node1's address and the NodePort as their source. Captures on the fabric show which
node's link carries what; the mode is switched live with a FelixConfiguration patch, and an open
connection keeps the path it started on.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.vxlan import VXLAN

from tabby.bpf import libbpf
from tabby.bpf.maps.counters import Reason
from tabby.bpf.objects import DatapathConfig, default_bpf_dir
from tabby.dataplane.conntrack import ConntrackGC
from tabby.lab import capture, fabric, traffic
from tabby.lab.cluster import Lab, pin_root
from tabby.lab.topology import EXTERNAL_CLIENT_IP

from .service_lab import counter_delta, counters, service, tcp_outcome, wait_for_endpoints

pytestmark = [pytest.mark.root, pytest.mark.lab]

VIP, NODEPORT, UDP_NODEPORT = "100.64.0.90", 30090, 30091
EXT_VNI = 0x7AB1E  # exttun.h TBY_EXT_VNI
SECOND_CLIENT_IP = "203.0.113.11"
BIG = 20 << 20
# <linux/in.h>; Python 3.11's socket module lacks them
IP_MTU_DISCOVER, IP_PMTUDISC_DO, IP_MTU = 10, 2, 14


@pytest.fixture(scope="module")
def web(lab: Lab) -> Iterator[dict[str, Any]]:
    lab.add_pod("extweb", "node2", labels={"app": "extweb"})
    lab.datastore().apply(
        [
            service(
                "extweb",
                {"app": "extweb"},
                [
                    {"name": "http", "port": 80, "targetPort": 8080, "nodePort": NODEPORT},
                    {
                        "name": "echo",
                        "port": 81,
                        "targetPort": 8081,
                        "protocol": "UDP",
                        "nodePort": UDP_NODEPORT,
                    },
                ],
                clusterIP=VIP,
                type="NodePort",
            )
        ]
    )
    wait_for_endpoints(lab, "extweb", 1)
    yield lab.pod("extweb")
    set_mode(lab, "Tunnel")


def set_mode(lab: Lab, mode: str) -> None:
    lab.datastore().patch(
        "FelixConfiguration", "default", None, {"spec": {"bpfExternalServiceMode": mode}}
    )
    lab.wait_ready()


def ext_tunnel(cap: capture.Capture, src: str, dst: str) -> list[Any]:
    """Ext tunnel packets (our VNI) whose outer header is src -> dst."""
    return [
        p
        for p in cap.vxlan()
        if VXLAN in p and p[VXLAN].vni == EXT_VNI and (p[IP].src, p[IP].dst) == (src, dst)
    ]


def plain_replies(cap: capture.Capture, frontend: str) -> list[Any]:
    """Unencapsulated packets from the NodePort frontend to the external client."""
    return [
        p
        for p in cap.packets
        if IP in p
        and TCP in p
        and (p[IP].src, p[IP].dst, p[TCP].sport) == (frontend, EXTERNAL_CLIENT_IP, NODEPORT)
    ]


def test_tunnel_keeps_the_client_address_and_replies_return_through_the_ingress_node(lab, web):
    set_mode(lab, "Tunnel")
    n1, n2 = lab.plan.node("node1").ip, lab.plan.node("node2").ip
    before1, before2 = counters(lab, "node1"), counters(lab, "node2")
    with capture.capture(lab.plan.fabric_netns, "node2") as cap:
        seen = traffic.http_get(lab.plan.external_netns, n1, NODEPORT, "/clientip")
    assert seen.split(":")[0] == EXTERNAL_CLIENT_IP, "the backend sees the real client"
    forward, back = ext_tunnel(cap, n1, n2), ext_tunnel(cap, n2, n1)
    assert forward and back, "both halves cross between node1 and node2 in the ext tunnel"
    inner = {(p[VXLAN].payload[IP].src, p[VXLAN].payload[IP].dst) for p in forward}
    assert inner == {(EXTERNAL_CLIENT_IP, web["ip"])}, "DNATed at node1, source kept"
    assert plain_replies(cap, n1) == [], "no reply leaves node2 by itself"
    after1, after2 = counters(lab, "node1"), counters(lab, "node2")
    assert counter_delta(before1, after1, Reason.EXT_FWD) >= 3
    # node1 sends the wrapped packets by its FIB's next hop (fib.h), not redirect_neigh
    assert counter_delta(before1, after1, Reason.FWD_REDIRECT) >= 3
    assert counter_delta(before2, after2, Reason.EXT_REPLY_TUN) >= 3
    assert counter_delta(before2, after2, Reason.EXT_REPLY_DSR) == 0


def test_dsr_replies_leave_the_backends_node_straight_to_the_client(lab, web):
    set_mode(lab, "DSR")
    n1, n2 = lab.plan.node("node1").ip, lab.plan.node("node2").ip
    before1, before2 = counters(lab, "node1"), counters(lab, "node2")
    with (
        capture.capture(lab.plan.fabric_netns, "node1") as at_ingress,
        capture.capture(lab.plan.fabric_netns, "node2") as at_backend,
    ):
        seen = traffic.http_get(lab.plan.external_netns, n1, NODEPORT, "/clientip")
        echoed = traffic.udp_request(lab.plan.external_netns, n1, UDP_NODEPORT, b"clientip")
    assert seen.split(":")[0] == EXTERNAL_CLIENT_IP
    assert echoed.split(":")[0] == EXTERNAL_CLIENT_IP, "UDP too"
    # the hop difference: replies appear on node2's link, never on node1's
    assert plain_replies(at_backend, n1), "node2 answers as node1:NodePort"
    assert plain_replies(at_ingress, n1) == []
    assert ext_tunnel(at_backend, n1, n2) and ext_tunnel(at_backend, n2, n1) == []
    after1, after2 = counters(lab, "node1"), counters(lab, "node2")
    assert counter_delta(before2, after2, Reason.EXT_REPLY_DSR) >= 3
    # node1 wraps and sends by its FIB's next hop (fib.h), the stack skipped
    assert counter_delta(before1, after1, Reason.FWD_REDIRECT) >= 3
    # node2's stack is skipped both ways (fwd.h): unwrapped -> into the pod, reply -> the fabric
    assert counter_delta(before2, after2, Reason.FWD_PEER) >= 3
    assert counter_delta(before2, after2, Reason.FWD_REDIRECT) >= 3


def test_dsr_needs_a_network_that_does_not_check_sources(lab, web):
    """With a strict reverse-path check at the router (as a cloud's source/destination check),
    node2's DSR replies, carrying node1's address from node2's subnet, are dropped: the agent says
    so beforehand, Tunnel keeps working, and DSR works again once the check is off."""
    set_mode(lab, "DSR")
    warned = lab.readyz(lab.plan.node("node2")).get("warnings", [])
    assert any("DSR" in w and "awsSrcDstCheck" in w for w in warned), warned
    ext, n1 = lab.plan.external_netns, lab.plan.node("node1").ip
    fabric.set_router_rp_filter(lab.plan, strict=True)
    try:
        assert tcp_outcome(ext, n1, NODEPORT, timeout_s=2) == "timeout"
        set_mode(lab, "Tunnel")
        assert not any("DSR" in w for w in lab.readyz(lab.plan.node("node2")).get("warnings", []))
        assert tcp_outcome(ext, n1, NODEPORT) == "connected"
    finally:
        fabric.set_router_rp_filter(lab.plan, strict=False)
    set_mode(lab, "DSR")
    assert tcp_outcome(ext, n1, NODEPORT) == "connected"


def test_a_mode_switch_applies_to_new_connections_and_open_ones_finish(lab, web):
    """A keep-alive connection opened in Tunnel mode keeps working after the switch to DSR and
    keeps its path (the mode is on its conntrack entries); a new one uses DSR. Both are read
    back with `tabbyctl bpf conntrack dump --type EXT` on the backend's node."""
    set_mode(lab, "Tunnel")
    n1 = lab.plan.node("node1").ip
    opened, switched, results, ports = threading.Event(), threading.Event(), [], []

    def keep_alive() -> None:
        with socket.create_connection((n1, NODEPORT), timeout=5) as s:
            ports.append(s.getsockname()[1])
            for i in range(2):
                s.sendall(b"GET /clientip HTTP/1.1\r\nHost: x\r\n\r\n")
                results.append(_read_response(s))
                if i == 0:
                    opened.set()
                    assert switched.wait(30)

    thread = threading.Thread(
        target=traffic.in_netns, args=(lab.plan.external_netns, keep_alive), daemon=True
    )
    thread.start()
    assert opened.wait(10)
    set_mode(lab, "DSR")
    switched.set()
    thread.join(15)
    assert len(results) == 2 and all(r.startswith(EXTERNAL_CLIENT_IP) for r in results), results
    assert _ext_path(lab, ports[0]) == f"from ingress {n1} (Tunnel)"

    def new_connection() -> int:
        with socket.create_connection((n1, NODEPORT), timeout=5) as s:
            s.sendall(b"GET /clientip HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(s).startswith(EXTERNAL_CLIENT_IP)
            return int(s.getsockname()[1])

    port = traffic.in_netns(lab.plan.external_netns, new_connection)
    assert _ext_path(lab, port) == f"from ingress {n1} (DSR)"


def _ct_rows(lab: Lab, node: str, kind: str, client_port: int) -> list[dict[str, Any]]:
    """The external client's conntrack rows of ``kind`` for this client port on ``node``, as
    `tabbyctl bpf conntrack dump` gives them."""
    out = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "tabbyctl"),
            *("bpf", "conntrack", "dump", "--lab", lab.name, "--node", node),
            *("--type", kind, "--port", str(client_port), "-o", "json"),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return [r for r in json.loads(out) if r["src"] == EXTERNAL_CLIENT_IP]


def _ext_path(lab: Lab, client_port: int) -> str:
    """The path of the forwarded flow from this client port, as node2's conntrack dump says."""
    rows = _ct_rows(lab, "node2", "EXT", client_port)
    assert len(rows) == 1, rows
    return str(rows[0]["path"])


def _sweep(lab: Lab, node: str, advance_s: int) -> None:
    """One conntrack sweep on the node's pinned maps, judged ``advance_s`` seconds from now
    (ct_gc.o loaded beside the agent's on the same pins, as the agent runs it)."""
    obj = libbpf.Object(str(default_bpf_dir() / "ct_gc.o"), pin_root=pin_root(lab.name, node))
    try:
        obj.set_rodata(DatapathConfig.build())
        obj.load()
        ConntrackGC.of_object(obj).sweep(advance_s)
    finally:
        obj.close()


def test_a_closed_dsr_flow_leaves_the_ingress_node_as_a_closed_one(lab, web):
    """A DSR ingress node never sees a reply, so its pair never sees the server's FIN: the
    client's FIN is the close (as Calico's cleanup judges it), and the pair goes after the FIN
    timeout (30 s) instead of the established one (an hour: at 150 new connections/s the 512k
    LRU would then be full, evicting live flows). An open connection's pair stays."""
    set_mode(lab, "DSR")
    n1 = lab.plan.node("node1").ip
    request = b"GET /clientip HTTP/1.1\r\nHost: x\r\n\r\n"

    def one_closed_and_one_open() -> tuple[int, int]:
        with socket.create_connection((n1, NODEPORT), timeout=5) as open_s:
            open_s.sendall(request)
            assert _read_response(open_s).startswith(EXTERNAL_CLIENT_IP)
            with socket.create_connection((n1, NODEPORT), timeout=5) as s:
                s.sendall(request)
                assert _read_response(s).startswith(EXTERNAL_CLIENT_IP)
                closed = int(s.getsockname()[1])
                s.shutdown(socket.SHUT_WR)  # the client's FIN
                assert s.recv(1) == b""  # the server's, which node1 never sees
            fwd = _ct_rows(lab, "node1", "FWD", closed)
            assert len(fwd) == 1 and fwd[0]["path"].endswith("(DSR)"), fwd
            assert "FIN_FWD" in fwd[0]["tcp_flags"] and "FIN_REV" not in fwd[0]["tcp_flags"]
            _sweep(lab, "node1", 31)
            return closed, int(open_s.getsockname()[1])

    closed, still_open = traffic.in_netns(lab.plan.external_netns, one_closed_and_one_open)
    assert _ct_rows(lab, "node1", "FWD", closed) == [], "the closed flow's pair is gone"
    assert _ct_rows(lab, "node1", "REV", closed) == []
    assert len(_ct_rows(lab, "node1", "FWD", still_open)) == 1, "the open one stays"


@pytest.mark.parametrize("mode", ["Tunnel", "DSR"])
def test_a_large_download_through_a_remote_nodeport(lab, web, mode):
    set_mode(lab, mode)
    before = {n: counters(lab, n) for n in ("node1", "node2")}
    n1 = lab.plan.node("node1").ip
    assert traffic.http_download_len(lab.plan.external_netns, n1, NODEPORT, BIG) == BIG
    for n in ("node1", "node2"):
        after = counters(lab, n)
        dropped = {r: after[r] - before[n][r] for r in after if r.startswith("drop_")}
        assert not any(dropped.values()), f"{n}: {dropped}"


def test_a_datagram_too_big_for_the_tunnel_gets_fragmentation_needed(lab, web):
    """1500 bytes with DF from the client no longer fit once wrapped (50 bytes): node1 answers
    with ICMP fragmentation needed (MTU 1450) from the address the client sent to, so the
    client's socket learns the path MTU, and a datagram that fits then crosses."""
    set_mode(lab, "Tunnel")
    n1 = lab.plan.node("node1").ip
    before = counters(lab, "node1")

    def probe() -> tuple[int, str]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
            s.settimeout(2)
            s.connect((n1, UDP_NODEPORT))
            s.send(b"x" * (1500 - 28))
            try:
                s.recv(2000)
            except OSError:
                pass  # EMSGSIZE: the ICMP error reached the socket
            mtu = s.getsockopt(socket.IPPROTO_IP, IP_MTU)
            s.send(b"clientip")
            return mtu, s.recv(2000).decode()

    mtu, answer = traffic.in_netns(lab.plan.external_netns, probe)
    assert mtu == 1500 - 50
    assert answer.startswith(EXTERNAL_CLIENT_IP)
    assert counter_delta(before, counters(lab, "node1"), Reason.EXT_FRAG_NEEDED) >= 1


@contextlib.contextmanager
def second_client(lab: Lab) -> Iterator[None]:
    """A second external client address (203.0.113.11) on the external namespace's link."""
    ext = lab.plan.external_netns
    subprocess.run(
        ["ip", "-n", ext, "addr", "add", f"{SECOND_CLIENT_IP}/24", "dev", "eth0"], check=True
    )
    try:
        yield
    finally:
        subprocess.run(["ip", "-n", ext, "addr", "del", f"{SECOND_CLIENT_IP}/24", "dev", "eth0"])


def connect_from(lab: Lab, client: str, port: int = 0, timeout_s: float = 3) -> str:
    """GET /clientip through node1's NodePort from one external address: the address the backend
    saw, or "timeout"."""
    n1 = lab.plan.node("node1").ip

    def go() -> str:
        try:
            with socket.create_connection((n1, NODEPORT), timeout_s, (client, port)) as s:
                s.sendall(b"GET /clientip HTTP/1.1\r\nHost: x\r\n\r\n")
                return _read_response(s).split(":")[0]
        except TimeoutError:
            return "timeout"

    return traffic.in_netns(lab.plan.external_netns, go)


def test_two_clients_with_the_same_source_port_both_work(lab, web):
    set_mode(lab, "Tunnel")
    with second_client(lab):
        seen = [connect_from(lab, c, 41000) for c in (EXTERNAL_CLIENT_IP, SECOND_CLIENT_IP)]
    assert seen == [EXTERNAL_CLIENT_IP, SECOND_CLIENT_IP]


@pytest.mark.parametrize("mode", ["Tunnel", "DSR"])
def test_an_ipblock_of_the_client_admits_it_through_a_remote_ingress_node(lab, web, mode):
    """The point of keeping the source: a NetworkPolicy admitting only the external client's /32
    lets its NodePort traffic reach the pod through node1, while another external source is
    denied, in both modes."""
    set_mode(lab, mode)
    lab.datastore().apply(
        [
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": "only-the-client", "namespace": "default"},
                "spec": {
                    "podSelector": {"matchLabels": {"app": "extweb"}},
                    "ingress": [
                        {
                            "from": [{"ipBlock": {"cidr": f"{EXTERNAL_CLIENT_IP}/32"}}],
                            "ports": [{"port": 8080}],
                        }
                    ],
                },
            }
        ]
    )
    lab.wait_ready()
    try:
        with second_client(lab):
            assert connect_from(lab, EXTERNAL_CLIENT_IP) == EXTERNAL_CLIENT_IP
            assert connect_from(lab, SECOND_CLIENT_IP, timeout_s=1.5) == "timeout"
    finally:
        lab.datastore().delete("NetworkPolicy", "only-the-client", "default")
        lab.wait_ready()
    with second_client(lab):
        assert connect_from(lab, SECOND_CLIENT_IP) == SECOND_CLIENT_IP, "no policy: admitted"


def _read_response(s: socket.socket) -> str:
    """One HTTP/1.1 response's body."""
    return traffic.read_http_response(s)[1].decode()


def test_one_client_port_through_two_ingress_nodes_to_one_backend_is_refused(lab, web):
    """The documented collision: a client port already talking to the backend through node1's
    NodePort opens a second connection through node3's. The backend's node cannot keep both (one
    backend tuple) and refuses the second with ICMP port unreachable from node3's NodePort: the
    client gets ECONNREFUSED at once, never a hang, and the first connection keeps working."""
    set_mode(lab, "Tunnel")
    n1, n3 = lab.plan.node("node1").ip, lab.plan.node("node3").ip
    before = counters(lab, "node2")

    def go() -> tuple[str, str, str]:
        def bound() -> socket.socket:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.settimeout(3)
            s.bind((EXTERNAL_CLIENT_IP, 41500))
            return s

        with bound() as first, bound() as second:
            first.connect((n1, NODEPORT))
            first.sendall(b"GET /clientip HTTP/1.1\r\nHost: x\r\n\r\n")
            seen = _read_response(first)
            try:
                second.connect((n3, NODEPORT))
                outcome = "connected"
            except ConnectionRefusedError:
                outcome = "refused"
            except TimeoutError:
                outcome = "timeout"
            first.sendall(b"GET /clientip HTTP/1.1\r\nHost: x\r\n\r\n")
            return seen, outcome, _read_response(first)

    seen, outcome, again = traffic.in_netns(lab.plan.external_netns, go)
    assert outcome == "refused"
    assert seen.startswith(EXTERNAL_CLIENT_IP) and again.startswith(EXTERNAL_CLIENT_IP)
    assert counter_delta(before, counters(lab, "node2"), Reason.EXT_REFUSED) >= 1

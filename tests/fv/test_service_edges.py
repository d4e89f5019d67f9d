"""Services at their edges, on real packets: endpoints that are node addresses (an API-server
stand-in), clients in a node's own namespace (hostNetwork, connect-time LB), UDP larger than
the MTU, endpoint churn under load, and bad input that must leave the NAT maps alone.

Backends of ``edge`` (netexec): edge-a on node2, edge-b on node3. Clients: cl1 on node1, cl2 on
node2, node1's own namespace (inside node1's cgroup, where the agent attached the CTLB hooks),
and the external client 203.0.113.10.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tabby.bpf.maps.counters import Reason
from tabby.lab import cgroups, traffic
from tabby.lab.cluster import Lab
from tabby.lab.processes import enter

from .service_lab import (
    DNS,
    HTTP,
    counter_delta,
    counters,
    http,
    ready_endpoints,
    service,
    wait_for_endpoints,
)

pytestmark = [pytest.mark.root, pytest.mark.lab]

EDGE_VIP = "100.64.0.50"
EDGE_NODEPORT = 30050
EDGE_UDP_NODEPORT = 30053
KUBERNETES_VIP = "100.64.0.1"  # the first service address, as kube-apiserver gives it
APISERVER_VIP = "100.64.0.51"
APISERVER_NODEPORT = 30443
APISERVER_PORT = 6443
CHURN_VIP = "100.64.0.52"
REUSE_VIP = "100.64.0.53"
REUSE_PORT = 40123
TABBYCTL = os.path.join(os.path.dirname(sys.executable), "tabbyctl")

# The API-server stand-in: plain HTTP on 6443 in node2's namespace; it names who it saw.
STANDIN = r"""
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def do_GET(self):
        body = f"apiserver-standin saw {self.client_address[0]}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
ThreadingHTTPServer(("0.0.0.0", 6443), H).serve_forever()
"""

# One request from a node's namespace; prints one JSON line.
HOST_CLIENT = r"""
import json, socket, sys
op, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    if op == "http":
        with socket.create_connection((ip, port), timeout=3) as s:
            peer = s.getpeername()
            s.sendall(b"GET /hostname HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        print(json.dumps({"peer": list(peer), "body": data.partition(b"\r\n\r\n")[2].decode()}))
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(1)
            for _ in range(3):
                s.sendto(b"hostname", (ip, port))
                try:
                    data, src = s.recvfrom(512)
                    break
                except TimeoutError:
                    continue
            else:
                raise TimeoutError("no UDP reply in 3 x 1 s")
        print(json.dumps({"src": list(src), "body": data.decode()}))
except OSError as e:
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
"""


def slice_for(service_name: str, slice_name: str, addr: str, node: str | None) -> dict[str, Any]:
    endpoint: dict[str, Any] = {"addresses": [addr], "conditions": {"ready": True}}
    if node:
        endpoint["nodeName"] = node
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name,
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "endpoints": [endpoint],
        "ports": [{"name": "https", "port": APISERVER_PORT, "protocol": "TCP"}],
    }


@contextlib.contextmanager
def standin_server(lab: Lab, node: str) -> Iterator[None]:
    """The stand-in in ``node``'s namespace (and cgroup, so `lab down` would get it too)."""
    netns = lab.plan.node(node).netns
    group = cgroups.group(lab.name, node)
    proc = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-c", STANDIN],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: enter(None, group),
    )
    try:
        deadline = time.monotonic() + 10

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", APISERVER_PORT), timeout=1).close()
                return True
            except OSError:
                return False

        while not traffic.in_netns(netns, listening):
            assert proc.poll() is None, "the API-server stand-in exited"
            assert time.monotonic() < deadline, "the API-server stand-in never listened"
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()  # ours, by its pid
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def host_request(lab: Lab, node: str, op: str, ip: str, port: int) -> dict[str, Any]:
    """One request by a process in ``node``'s namespace and cgroup (a hostNetwork pod's view)."""
    netns = f"/run/netns/{lab.plan.node(node).netns}"
    group = cgroups.group(lab.name, node)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOST_CLIENT, op, ip, str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: enter(netns, group),
    )
    try:
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()  # ours, by its pid
            proc.wait()
    return json.loads(out)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> Iterator[dict[str, Any]]:
    lab.add_pod("cl1", "node1", wait=False)
    lab.add_pod("cl2", "node2", wait=False)
    lab.add_pod("edge-a", "node2", labels={"app": "edge"}, wait=False)
    lab.add_pod("edge-b", "node3", labels={"app": "edge"}, wait=False)
    node2_ip = lab.plan.node("node2").ip
    https = {"name": "https", "port": 443, "targetPort": APISERVER_PORT, "protocol": "TCP"}
    kubernetes = service("kubernetes", None, [https], clusterIP=KUBERNETES_VIP)
    kubernetes["metadata"]["labels"] = {"component": "apiserver", "provider": "kubernetes"}
    edge = service("edge", {"app": "edge"}, [HTTP, DNS], clusterIP=EDGE_VIP, type="NodePort")
    edge["spec"]["ports"][0]["nodePort"] = EDGE_NODEPORT
    edge["spec"]["ports"][1]["nodePort"] = EDGE_UDP_NODEPORT
    apiserver = service(
        "apiserver", None, [{**https, "nodePort": APISERVER_NODEPORT}], type="NodePort"
    )
    apiserver["spec"]["clusterIP"] = APISERVER_VIP
    lab.datastore().apply(
        [
            kubernetes,
            slice_for("kubernetes", "kubernetes", node2_ip, None),  # the real one has no nodeName
            apiserver,
            slice_for("apiserver", "apiserver-node2", node2_ip, "node2"),
            edge,
        ]
    )
    wait_for_endpoints(lab, "edge", 2)
    with standin_server(lab, "node2"):
        yield {n: lab.pod(n) for n in ("cl1", "cl2", "edge-a", "edge-b")}


# --- endpoints that are node addresses -----------------------------------------------------------


def test_service_with_node_ip_endpoints_from_pods(lab: Lab, cluster: dict[str, Any]) -> None:
    results = {}
    for client in ("cl1", "cl2"):  # remote (node1) and local (node2) to the endpoint
        for vip in (KUBERNETES_VIP, APISERVER_VIP):
            results[(client, vip)] = _try_http(cluster[client]["netns"], vip, 443)
    print(f"node-IP endpoint through ClusterIPs: {results}")
    bad = {k: v for k, v in results.items() if not v.startswith("apiserver-standin")}
    assert not bad, bad


def test_service_with_node_ip_endpoints_through_nodeports(
    lab: Lab, cluster: dict[str, Any]
) -> None:
    ext = lab.plan.external_netns
    results = {
        node: _try_http(ext, lab.plan.node(node).ip, APISERVER_NODEPORT)
        for node in ("node1", "node2")
    }
    print(f"node-IP endpoint through NodePorts: {results}")
    bad = {k: v for k, v in results.items() if not v.startswith("apiserver-standin")}
    assert not bad, bad


def _try_http(netns: str, ip: str, port: int) -> str:
    try:
        code, body = http(netns, ip, port, "/")
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return body if code == 200 else f"HTTP {code}"


# --- the node's own namespace (hostNetwork) -------------------------------------------------------


def test_host_netns_tcp_to_clusterip_and_to_another_nodes_nodeport(
    lab: Lab, cluster: dict[str, Any]
) -> None:
    before = counters(lab, "node1")
    to_vip = [host_request(lab, "node1", "http", EDGE_VIP, 80) for _ in range(6)]
    after = counters(lab, "node1")
    node2 = lab.plan.node("node2").ip
    to_nodeport = host_request(lab, "node1", "http", node2, EDGE_NODEPORT)
    print(f"node1 host -> ClusterIP: {to_vip}; -> node2 NodePort: {to_nodeport}")
    assert all(r.get("body") in ("edge-a", "edge-b") for r in to_vip), to_vip
    assert all(r["peer"] == [EDGE_VIP, 80] for r in to_vip), to_vip
    assert counter_delta(before, after, Reason.CTLB_CONNECT) == 6
    assert to_nodeport.get("body") in ("edge-a", "edge-b"), to_nodeport


def test_host_netns_udp_to_clusterip(lab: Lab, cluster: dict[str, Any]) -> None:
    """In the default CTLB mode (TCP) UDP from the node itself needs the per-packet path."""
    got = host_request(lab, "node1", "udp", EDGE_VIP, 53)
    print(f"node1 host -> ClusterIP UDP: {got}")
    assert got.get("body") in ("edge-a", "edge-b"), got
    assert got["src"] == [EDGE_VIP, 53], got


# --- UDP larger than the MTU ------------------------------------------------------------------


def _udp_echo(netns: str, ip: str, port: int, payload: bytes) -> bytes:
    def go() -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(1)
            for _ in range(3):
                s.sendto(payload, (ip, port))
                try:
                    return s.recv(65535)
                except TimeoutError:
                    continue
        raise TimeoutError(f"no UDP reply from {ip}:{port}")

    return traffic.in_netns(netns, go)


PAYLOAD = bytes(i % 251 for i in range(4000))  # > the pod MTU (1450): fragments both ways


def test_large_udp_through_clusterip_is_echoed_whole(lab: Lab, cluster: dict[str, Any]) -> None:
    before = counters(lab, "node1")
    replies = [_udp_echo(cluster["cl1"]["netns"], EDGE_VIP, 53, PAYLOAD) for _ in range(4)]
    after = counters(lab, "node1")
    assert all(r == PAYLOAD for r in replies), [len(r) for r in replies]
    assert counter_delta(before, after, Reason.NAT_FRAG) > 0, "no fragment was translated"


def test_large_udp_through_nodeport_from_outside(lab: Lab, cluster: dict[str, Any]) -> None:
    ext = lab.plan.external_netns
    for node in lab.plan.nodes:
        reply = _udp_echo(ext, node.ip, EDGE_UDP_NODEPORT, PAYLOAD)
        assert reply == PAYLOAD, (node.name, len(reply))


# --- endpoint churn under load -----------------------------------------------------------------


class Prober:
    """Sequential GETs to a ClusterIP from a pod, tagged with the phase they started in."""

    def __init__(self, netns: str, ip: str) -> None:
        self.netns, self.ip = netns, ip
        self.phase = "3"
        self.seen: dict[str, Counter[str]] = {}
        self.failures: list[tuple[str, str]] = []
        self.log: list[tuple[str, int, str]] = []  # (phase, client port, backend) per connection
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: traffic.in_netns(netns, self._run))

    def _run(self) -> None:
        deadline = time.monotonic() + 30  # a hard bound, whatever the test does
        while not self.stop.is_set() and time.monotonic() < deadline:
            phase = self.phase
            try:
                with socket.create_connection((self.ip, 80), timeout=3) as s:
                    sport = s.getsockname()[1]
                    s.sendall(b"GET /hostname HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    data = b""
                    while chunk := s.recv(65536):
                        data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                if b" 200 " not in head.split(b"\r\n")[0]:
                    raise OSError(f"bad reply {head[:40]!r}")
                self.seen.setdefault(phase, Counter())[body.decode()] += 1
                self.log.append((phase, sport, body.decode()))
            except OSError as e:
                self.failures.append((phase, f"{type(e).__name__}: {e}"))

    def port_reuse(self, phase: str, gone: set[str]) -> str:
        """How many of ``phase``'s connections to ``gone`` backends reused a client port that
        an earlier connection to that very backend had used (a stale conntrack pair hit)."""
        earlier: dict[int, str] = {}
        hits = reused = 0
        for p, sport, backend in self.log:
            if p == phase and backend in gone:
                hits += 1
                reused += earlier.get(sport) == backend
            earlier[sport] = backend
        return f"{phase}: {hits} to {sorted(gone)}, {reused} of them on a reused client port"

    def count(self, phase: str) -> int:
        return sum(self.seen.get(phase, Counter()).values())

    def run_phase(self, phase: str, at_least: int, min_s: float = 1.5, max_s: float = 10) -> None:
        """Probe in ``phase`` for at least ``min_s`` and ``at_least`` connections."""
        self.phase = phase
        started = time.monotonic()
        while time.monotonic() - started < max_s and (
            self.count(phase) < at_least or time.monotonic() - started < min_s
        ):
            time.sleep(0.05)


def test_endpoint_churn_under_load_loses_no_connection(lab: Lab, cluster: dict[str, Any]) -> None:
    member = {"app": "churn", "member": "yes"}
    for i, node in ((1, "node2"), (2, "node3"), (3, "node2")):
        lab.add_pod(f"churn-{i}", node, labels=member, wait=False)
    lab.datastore().apply([service("churn", member, clusterIP=CHURN_VIP)])
    wait_for_endpoints(lab, "churn", 3)
    prober = Prober(cluster["cl1"]["netns"], CHURN_VIP)
    prober.thread.start()
    started = time.monotonic()
    try:
        prober.run_phase("3", at_least=30)
        prober.phase = "3->1"
        for name in ("churn-2", "churn-3"):  # out of the selector; they keep serving
            lab.datastore().patch(
                "Pod", name, "default", {"metadata": {"labels": {"member": "no"}}}
            )
        wait_for_endpoints(lab, "churn", 1)
        prober.run_phase("1", at_least=30)
        prober.phase = "1->5"
        for i, node in ((4, "node3"), (5, "node2"), (6, "node3"), (7, "node2")):
            lab.add_pod(f"churn-{i}", node, labels=member, wait=False)
        wait_for_endpoints(lab, "churn", 5)
        prober.run_phase("5", at_least=80)
    finally:
        prober.stop.set()
        prober.thread.join()
    elapsed = time.monotonic() - started
    counts = {p: dict(sorted(c.items())) for p, c in prober.seen.items()}
    total = sum(prober.count(p) for p in prober.seen)
    print(f"churn: {total} connections in {elapsed:.1f}s, {len(prober.failures)} failed: {counts}")
    print(prober.port_reuse("1", {"churn-2", "churn-3"}))
    print(prober.port_reuse("5", {"churn-2", "churn-3"}))
    assert not prober.failures, prober.failures[:5]
    assert set(prober.seen["3"]) == {"churn-1", "churn-2", "churn-3"}, counts
    assert set(prober.seen["1"]) == {"churn-1"}, counts
    assert set(prober.seen["5"]) == {"churn-1", "churn-4", "churn-5", "churn-6", "churn-7"}, counts


def _get_from_port(netns: str, ip: str, sport: int) -> str:
    """/hostname over a connection from a fixed client port (as a busy client reuses ports)."""

    def go() -> str:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.settimeout(3)
            s.bind(("0.0.0.0", sport))
            s.connect((ip, 80))
            s.sendall(b"GET /hostname HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data.partition(b"\r\n\r\n")[2].decode()

    return traffic.in_netns(netns, go)


def test_reused_client_port_reaches_a_current_backend(lab: Lab, cluster: dict[str, Any]) -> None:
    """A closed connection's conntrack pair must not steer a new one (same 4-tuple) to a backend
    that has left the service: nf_conntrack re-decides on a SYN that reopens a closed flow."""
    selector = {"app": "reuse", "member": "yes"}
    lab.add_pod("reuse-1", "node2", labels=selector, wait=False)
    lab.datastore().apply([service("reuse", selector, clusterIP=REUSE_VIP)])
    wait_for_endpoints(lab, "reuse", 1)
    netns = cluster["cl1"]["netns"]
    assert _get_from_port(netns, REUSE_VIP, REUSE_PORT) == "reuse-1"
    lab.datastore().patch("Pod", "reuse-1", "default", {"metadata": {"labels": {"member": "no"}}})
    lab.add_pod("reuse-2", "node3", labels=selector, wait=False)
    wait_for_endpoints(lab, "reuse", 1)
    assert [e["targetRef"]["name"] for e in ready_endpoints(lab, "reuse")] == ["reuse-2"]
    again = _get_from_port(netns, REUSE_VIP, REUSE_PORT)
    fresh = _get_from_port(netns, REUSE_VIP, REUSE_PORT + 1)
    print(f"reused port {REUSE_PORT}: {again}; fresh port {REUSE_PORT + 1}: {fresh}")
    assert fresh == "reuse-2"
    assert again == "reuse-2", "the new connection followed the closed one's conntrack pair"


# --- bad input -----------------------------------------------------------------------------------


def _nat_dump(lab: Lab, node: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [TABBYCTL, "bpf", "nat", "dump", "-o", "json", "--lab", lab.name, "--node", node],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


BAD_INPUT = {
    "service port out of range": (
        service("bad-port", {"app": "edge"}, [{"name": "http", "port": 70000}]),
        "spec.ports[0].port",
    ),
    "node port held by another service": (
        service(
            "np-clash", {"app": "edge"}, [{"port": 80, "nodePort": EDGE_NODEPORT}], type="NodePort"
        ),
        "spec.ports[0].nodePort",
    ),
    "malformed endpoint address": (
        {
            **slice_for("edge", "edge-bad", "10.0.0.300", "node2"),
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        },
        "endpoints[0].addresses[0]",
    ),
}


def test_bad_input_is_refused_by_field_and_leaves_nat_maps_alone(
    lab: Lab, cluster: dict[str, Any], tmp_path: Path
) -> None:
    nat_before = {n.name: _nat_dump(lab, n.name) for n in lab.plan.nodes}
    revision = lab.datastore().revision()
    errors = {}
    for what, (obj, field) in BAD_INPUT.items():
        manifest = tmp_path / f"{obj['metadata']['name']}.json"
        manifest.write_text(json.dumps(obj))
        run = subprocess.run(
            [TABBYCTL, "apply", "-f", str(manifest), "--datastore", lab.url],
            capture_output=True,
            text=True,
            timeout=30,
        )
        errors[what] = run.stderr.strip()
        assert run.returncode == 1, (what, run.stdout, run.stderr)
        assert field in run.stderr, (what, field, run.stderr)
    print("errors:\n" + "\n".join(f"  {k}: {v}" for k, v in errors.items()))
    assert lab.datastore().revision() == revision, "a refused apply wrote something"
    lab.wait_ready()
    assert {n.name: _nat_dump(lab, n.name) for n in lab.plan.nodes} == nat_before

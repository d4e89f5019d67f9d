"""kube-proxy replacement in the lab, on real packets: ClusterIP, NodePort, no endpoints, hairpin,
endpoint changes. Backends live on node2 and node3; clients on node1 and outside the cluster, so
every path crosses nodes (and subnets)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections import Counter
from typing import Any

import pytest

from tabby.bpf.maps.counters import Reason
from tabby.lab import processes, traffic
from tabby.lab.cluster import Lab
from tabby.lab.topology import EXTERNAL_CLIENT_IP

from .service_lab import counter_delta, counters

pytestmark = [pytest.mark.root, pytest.mark.lab]

VIP = "100.64.0.10"
EMPTY_VIP = "100.64.0.11"
SELF_VIP = "100.64.0.12"
NODEPORT = 30080


def service(name: str, vip: str, selector: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "clusterIP": vip,
            "selector": selector,
            "ports": [
                {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                {"name": "dns", "port": 53, "targetPort": "udp", "protocol": "UDP"},
            ],
            **spec,
        },
    }


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> dict[str, Any]:
    lab.add_pod("client", "node1", wait=False)
    lab.add_pod("web-a", "node2", labels={"app": "web", "pod": "web-a"}, wait=False)
    # node3 in the 3-node lab; the last node in a smaller one (test_etcd_lab.py runs on 2)
    last = lab.plan.nodes[-1].name
    lab.add_pod("web-b", last, labels={"app": "web", "pod": "web-b"}, wait=False)
    web = service("web", VIP, {"app": "web"}, type="NodePort")
    web["spec"]["ports"][0]["nodePort"] = NODEPORT
    lab.datastore().apply(
        [
            web,
            service("empty", EMPTY_VIP, {"app": "nothing"}),
            service("self", SELF_VIP, {"pod": "web-a"}),
        ]
    )
    wait_for_backends(lab, "web", 2)
    return {n: lab.pod(n) for n in ("client", "web-a", "web-b")}


def wait_for_backends(lab: Lab, service_name: str, count: int, timeout_s: float = 20) -> None:
    """Until the controller's slices list ``count`` ready endpoints and every agent has them."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        slices, _ = lab.datastore().list("EndpointSlice", "default")
        ready = sum(
            1
            for s in slices
            if s["metadata"]["labels"].get("kubernetes.io/service-name") == service_name
            for e in s["endpoints"]
            if e.get("conditions", {}).get("ready", True)
        )
        if ready == count:
            lab.wait_ready()
            return
        time.sleep(0.1)
    raise AssertionError(f"{service_name}: never got {count} ready endpoints")


def client_and_web(lab: Lab, vip: str) -> dict[str, Any]:
    """Pod client on node1; web-a and web-b (app: web) on node2 behind Service web at ``vip``;
    every agent has both backends. Their lab records by name."""
    lab.add_pod("client", "node1", wait=False)
    lab.add_pod("web-a", "node2", labels={"app": "web"}, wait=False)
    lab.add_pod("web-b", "node2", labels={"app": "web"}, wait=False)
    lab.datastore().apply([service("web", vip, {"app": "web"})])
    wait_for_backends(lab, "web", 2)
    return {n: lab.pod(n) for n in ("client", "web-a", "web-b")}


def test_clusterip_tcp_reaches_every_remote_backend_without_snat(cluster: dict[str, Any]) -> None:
    client = cluster["client"]
    seen = Counter(traffic.http_get(client["netns"], VIP, 80, "/hostname") for _ in range(30))
    assert set(seen) == {"web-a", "web-b"}, seen
    source = traffic.http_get(client["netns"], VIP, 80, "/clientip").split(":")[0]
    assert source == client["ip"], "pod -> ClusterIP -> pod keeps the client's address"


def test_clusterip_udp(cluster: dict[str, Any]) -> None:
    client = cluster["client"]
    names = {traffic.udp_request(client["netns"], VIP, 53, b"hostname") for _ in range(20)}
    assert names == {"web-a", "web-b"}
    seen = traffic.udp_request(client["netns"], VIP, 53, b"clientip").split(":")[0]
    assert seen == client["ip"]


def test_nodeport_from_outside_on_every_node(lab: Lab, cluster: dict[str, Any]) -> None:
    ext = lab.plan.external_netns
    for node in lab.plan.nodes:  # node1 has no backend: forwarded to node2/node3
        assert traffic.http_get(ext, node.ip, NODEPORT, "/hostname") in {"web-a", "web-b"}
    # bpfExternalServiceMode Tunnel (the default): forwarded without SNAT, the backend sees
    # the real client (test_external_modes.py shows the paths)
    seen = traffic.http_get(ext, lab.plan.nodes[0].ip, NODEPORT, "/clientip").split(":")[0]
    assert seen == EXTERNAL_CLIENT_IP


def test_service_without_endpoints_is_refused_not_black_holed(cluster: dict[str, Any]) -> None:
    client = cluster["client"]

    def tcp() -> str:
        started = time.monotonic()
        try:
            socket.create_connection((EMPTY_VIP, 80), timeout=3).close()
        except ConnectionRefusedError:
            return f"refused after {time.monotonic() - started:.3f}s"
        return "connected"

    def udp() -> str:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.connect((EMPTY_VIP, 53))
            s.send(b"hostname")
            try:
                s.recv(100)
            except ConnectionRefusedError:
                return "refused"
        return "answered"

    assert traffic.in_netns(client["netns"], tcp).startswith("refused")
    assert traffic.in_netns(client["netns"], udp) == "refused"


def test_hairpin_pod_reaches_itself_through_its_service(cluster: dict[str, Any]) -> None:
    web_a = cluster["web-a"]
    assert traffic.http_get(web_a["netns"], SELF_VIP, 80, "/hostname") == "web-a"
    assert traffic.udp_request(web_a["netns"], SELF_VIP, 53, b"hostname") == "web-a"


def test_removed_backend_gets_no_new_connections(lab: Lab, cluster: dict[str, Any]) -> None:
    client = cluster["client"]
    lab.del_pod("web-b")
    wait_for_backends(lab, "web", 1)
    seen = {traffic.http_get(client["netns"], VIP, 80, "/hostname") for _ in range(15)}
    assert seen == {"web-a"}
    lab.add_pod("web-b", "node3", labels={"app": "web", "pod": "web-b"})
    wait_for_backends(lab, "web", 2)


def _get(sock: socket.socket, path: str) -> str:
    """One request on a kept-alive HTTP/1.1 connection to netexec."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
                 .split(b":")[1])  # fmt: skip
    while len(body) < length:
        body += sock.recv(4096)
    return body.decode()


def test_agent_restart_keeps_open_service_connections_and_nat(
    lab: Lab, cluster: dict[str, Any]
) -> None:
    client = cluster["client"]
    sock = traffic.in_netns(client["netns"], lambda: socket.create_connection((VIP, 80), 3))
    try:
        first = _get(sock, "/hostname")
        old = lab.agent_proc("node1")
        os.kill(old["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 5
        while processes.alive(old) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(old["pid"], os.WNOHANG)
            time.sleep(0.02)
        assert _get(sock, "/hostname") == first  # no agent at all: the maps keep serving
        lab.start_agent(lab.plan.node("node1"))
        lab.wait_ready()
        assert _get(sock, "/hostname") == first  # the new agent rewrote the sets, not the flow
    finally:
        sock.close()
    seen = {traffic.http_get(client["netns"], VIP, 80, "/hostname") for _ in range(20)}
    assert seen == {"web-a", "web-b"}


def test_udp_flow_moves_on_when_its_backend_is_deleted(lab: Lab, cluster: dict[str, Any]) -> None:
    """The same client socket (same 5-tuple, so the same conntrack entry) reaches the other
    backend once its own is gone: the agent sweeps stale UDP conntrack, as kube-proxy does."""
    client = cluster["client"]
    sock = traffic.in_netns(
        client["netns"], lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    )
    sock.settimeout(1)

    def ask() -> str:
        for _ in range(3):
            sock.sendto(b"hostname", (VIP, 53))
            with contextlib.suppress(TimeoutError):
                return sock.recv(100).decode()
        raise TimeoutError("no UDP answer")

    try:
        first = ask()
        assert ask() == first  # conntrack keeps the flow on its backend
        lab.del_pod(first)
        wait_for_backends(lab, "web", 1)
        other = ask()
        assert other != first and other in {"web-a", "web-b"}
    finally:
        sock.close()
        lab.add_pod(first, "node2" if first == "web-a" else "node3",
                    labels={"app": "web", "pod": first})  # fmt: skip
        wait_for_backends(lab, "web", 2)


def test_nat_outgoing_pods_reach_the_outside_as_their_node(
    lab: Lab, cluster: dict[str, Any]
) -> None:
    """The lab's pool has natOutgoing (kOps' default): the external client sees node1's address
    when the client pod on node1 connects to it, and the reply finds the pod."""
    client = cluster["client"]
    listener = traffic.in_netns(lab.plan.external_netns, lambda: socket.create_server(("", 7070)))
    listener.settimeout(5)
    seen: list[str] = []

    def serve() -> None:
        conn, peer = listener.accept()
        with conn:
            seen.append(peer[0])
            conn.sendall(b"hello from outside")

    server = threading.Thread(target=serve)
    server.start()
    try:

        def fetch() -> bytes:
            with socket.create_connection((EXTERNAL_CLIENT_IP, 7070), timeout=3) as s:
                return s.recv(100)

        assert traffic.in_netns(client["netns"], fetch) == b"hello from outside"
    finally:
        server.join(6)
        listener.close()
    assert seen == [lab.plan.node("node1").ip]


def test_icmp_error_from_a_backend_reaches_the_client_through_the_service(
    lab: Lab, cluster: dict[str, Any]
) -> None:
    """UDP to a service port whose backends do not listen: each backend answers ICMP port
    unreachable from its own address about the translated flow; only if tabby translates the
    error back (source and quote) does the client's socket, connected to the ClusterIP, see it."""
    closed = service("closed", "100.64.0.13", {"app": "web"})
    closed["spec"]["ports"] = [{"name": "dns", "port": 53, "targetPort": 9999, "protocol": "UDP"}]
    lab.datastore().apply([closed])
    lab.wait_ready()

    def ask() -> str:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.connect(("100.64.0.13", 53))
            s.send(b"hostname")
            try:
                s.recv(100)
            except ConnectionRefusedError:
                return "refused"
            except TimeoutError:
                return "timeout"
        return "answered"

    before = counters(lab, "node1")
    assert traffic.in_netns(cluster["client"]["netns"], ask) == "refused"
    assert counter_delta(before, counters(lab, "node1"), Reason.NAT_ICMP_ERR) >= 1


def test_a_service_flow_on_the_port_of_a_direct_one_gets_another_port(
    lab: Lab, cluster: dict[str, Any]
) -> None:
    """Linux gives one local port to connections with different destinations: the client holds
    a direct connection to web-a from port P, then reaches web-a through a Service from the
    same P. Translated, both would be one tuple at web-a (which resets the older connection);
    as nf_nat does, the service flow takes another source port, and both keep working."""
    client, web_a = cluster["client"], cluster["web-a"]
    before = counters(lab, "node1")

    def two_flows() -> tuple[int, str, str, str]:
        direct = socket.socket()
        via_service = socket.socket()
        try:
            for s in (direct, via_service):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.settimeout(5)
            direct.bind(("0.0.0.0", 0))
            port = direct.getsockname()[1]
            direct.connect((web_a["ip"], 8080))
            assert _get(direct, "/hostname") == "web-a"
            via_service.bind(("0.0.0.0", port))
            via_service.connect((SELF_VIP, 80))  # "self": web-a only
            seen_by_web_a = _get(via_service, "/clientip")
            return port, seen_by_web_a, _get(direct, "/clientip"), _get(via_service, "/hostname")
        finally:
            direct.close()
            via_service.close()

    port, via_service_seen, direct_seen, via_service_host = traffic.in_netns(
        client["netns"], two_flows
    )
    assert direct_seen == f"{client['ip']}:{port}", "the direct flow lives on, untouched"
    address, _, other = via_service_seen.rpartition(":")
    assert address == client["ip"], "the client's address is kept"
    assert int(other) != port, "the service flow reached web-a from another port"
    assert via_service_host == "web-a"
    assert counter_delta(before, counters(lab, "node1"), Reason.NAT_PORT_CLASH) == 1


def test_a_direct_udp_flow_on_the_port_of_a_finished_service_flow_is_not_translated(
    lab: Lab, cluster: dict[str, Any]
) -> None:
    """The other order: the client asks web-a through a Service from port P and closes the
    socket; its pair lives on for UDP's 60 s. A new socket on P then asks web-a directly. Its
    replies carry the pair's REV tuple: translated back to the Service's address, the client's
    socket (connected to web-a) would drop them. The direct flow wins; and a service flow that
    then starts on P while the direct socket is open takes another port."""
    client, web_a = cluster["client"], cluster["web-a"]
    before = counters(lab, "node1")

    def ask(s: socket.socket, what: bytes) -> str:
        for _ in range(3):
            s.send(what)
            with contextlib.suppress(TimeoutError):
                return s.recv(100).decode()
        raise TimeoutError(f"no UDP answer to {what!r}")

    def flows() -> tuple[int, str, str, str]:
        first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        first.settimeout(1)
        first.connect((SELF_VIP, 53))  # "self": web-a only
        port = first.getsockname()[1]
        try:
            assert ask(first, b"hostname") == "web-a"
        finally:
            first.close()
        direct = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        later = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for s in (direct, later):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.settimeout(1)
            direct.bind(("0.0.0.0", port))
            direct.connect((web_a["ip"], 8081))
            direct_seen = ask(direct, b"clientip")
            later.bind(("0.0.0.0", port))
            later.connect((SELF_VIP, 53))
            later_seen = ask(later, b"clientip")
            return port, direct_seen, later_seen, ask(direct, b"clientip")
        finally:
            direct.close()
            later.close()

    port, direct_seen, later_seen, direct_again = traffic.in_netns(client["netns"], flows)
    assert direct_seen == f"{client['ip']}:{port}", "the direct flow is answered, untranslated"
    address, _, other = later_seen.rpartition(":")
    assert address == client["ip"] and int(other) != port, "the new service flow moved port"
    assert direct_again == direct_seen, "and the direct flow still works"
    assert counter_delta(before, counters(lab, "node1"), Reason.NAT_PORT_CLASH) == 1


def test_a_direct_connection_on_the_port_of_an_unanswered_service_flow_is_not_translated(
    lab: Lab, cluster: dict[str, Any]
) -> None:
    """A service flow whose SYN went unanswered (policy dropped it at web-a) leaves a pair that
    never closed, kept for the SYN timeout. Linux gives its port again once the socket is gone
    (each destination has its own port sequence, and two sequences cross), here to a direct
    connection to web-a. Its SYN carries the pair's REV tuple; the client pod no longer has
    the service flow's socket, so the pair goes and the direct connection is not translated."""
    client, web_a = cluster["client"], cluster["web-a"]
    deny = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "web-a-closed", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"pod": "web-a"}}, "policyTypes": ["Ingress"]},
    }
    ds = lab.datastore()

    def unanswered() -> int:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.settimeout(0.5)
        try:
            with pytest.raises(TimeoutError):
                s.connect((SELF_VIP, 80))  # "self": web-a only
            return int(s.getsockname()[1])
        finally:
            s.close()

    def direct(port: int) -> tuple[str, int]:
        """What web-a saw, and the SYNs the client had to send again (translated, the first
        SYN-ACK comes back from the Service's address: the client resets it and retries)."""
        before = _syn_retransmits()
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.settimeout(5)
        try:
            s.bind(("0.0.0.0", port))
            s.connect((web_a["ip"], 8080))
            return _get(s, "/clientip"), _syn_retransmits() - before
        finally:
            s.close()

    ds.apply([deny])
    try:
        lab.wait_ready()
        port = traffic.in_netns(client["netns"], unanswered)
    finally:
        ds.delete("NetworkPolicy", "web-a-closed", "default")
        lab.wait_ready()
    seen, retransmits = traffic.in_netns(client["netns"], lambda: direct(port))
    assert seen == f"{client['ip']}:{port}"
    assert retransmits == 0, "the first SYN-ACK reached the socket"


def _syn_retransmits() -> int:
    """TcpExt TCPSynRetrans of the calling thread's netns."""
    with open("/proc/thread-self/net/netstat") as f:
        names, values = [line.split() for line in f if line.startswith("TcpExt:")]
    return int(values[names.index("TCPSynRetrans")])

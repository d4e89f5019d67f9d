"""kube-proxy's health endpoints (dataplane/healthcheck.py), on loopback or in a scratch netns.

The agent binds 0.0.0.0 inside the node's namespace; here the servers bind 127.0.0.1 (root
namespace) or 0.0.0.0 inside a namespace the test creates and deletes.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator

import pytest

from tabby.calc.nodestate import HealthCheck
from tabby.dataplane.healthcheck import HealthServers, go_time

NOW_NS = 1_700_000_000_123_456_789  # 2023-11-14 22:13:20.123456789 UTC


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def get(port: int, path: str = "/", method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def servers() -> Iterator[HealthServers]:
    hs = HealthServers(host="127.0.0.1", clock_ns=lambda: NOW_NS)
    try:
        yield hs
    finally:
        hs.close()


def test_go_time() -> None:
    assert go_time(NOW_NS) == "2023-11-14 22:13:20.123456789 +0000 UTC"
    assert go_time(1_700_000_000_500_000_000) == "2023-11-14 22:13:20.5 +0000 UTC"
    assert go_time(1_700_000_000 * 10**9) == "2023-11-14 22:13:20 +0000 UTC"
    assert go_time(None) == "0001-01-01 00:00:00 +0000 UTC"


def test_service_health_200_503_and_body(servers: HealthServers) -> None:
    up, down = free_ports(2)
    checks = {up: HealthCheck("shop/web", 2), down: HealthCheck("default/empty", 0)}
    assert servers.apply(0, checks, ready=True) == []

    code, headers, body = get(up, "/any/path")
    assert code == 200
    assert headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff"
    assert json.loads(body) == {
        "service": {"namespace": "shop", "name": "web"},
        "localEndpoints": 2,
        "serviceProxyHealthy": True,
    }
    # kube-proxy's own layout: tab-indented
    assert body.startswith(b'{\n\t"service": {\n\t\t"namespace": "shop",')

    code, _, body = get(down)
    assert code == 503
    assert json.loads(body)["localEndpoints"] == 0
    assert get(up, method="HEAD")[0] == 200


def test_counts_and_readiness_update_without_restart(servers: HealthServers) -> None:
    (port,) = free_ports(1)
    assert servers.apply(0, {port: HealthCheck("shop/web", 0)}, ready=True) == []
    listener = servers.listeners[port]
    assert get(port)[0] == 503

    assert servers.apply(0, {port: HealthCheck("shop/web", 3)}, ready=True) == []
    assert servers.listeners[port] is listener
    code, _, body = get(port)
    assert code == 200 and json.loads(body)["localEndpoints"] == 3

    # the proxy not in sync: 503 even with local endpoints, as kube-proxy
    assert servers.apply(0, {port: HealthCheck("shop/web", 3)}, ready=False) == []
    code, _, body = get(port)
    assert code == 503 and json.loads(body)["serviceProxyHealthy"] is False
    assert servers.listeners[port] is listener


def test_removal_closes_the_port(servers: HealthServers) -> None:
    keep, drop = free_ports(2)
    checks = {keep: HealthCheck("a/keep", 1), drop: HealthCheck("a/drop", 1)}
    assert servers.apply(0, checks, ready=True) == []
    assert get(drop)[0] == 200
    assert servers.apply(0, {keep: checks[keep]}, ready=True) == []
    assert refused(drop)
    assert get(keep)[0] == 200
    assert set(servers.listeners) == {keep}
    servers.close()
    assert refused(keep) and not servers.listeners


def test_bind_failure_is_reported_and_retried(servers: HealthServers) -> None:
    (port,) = free_ports(1)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        errors = servers.apply(0, {port: HealthCheck("a/b", 1)}, ready=True)
        assert len(errors) == 1 and f"healthCheckNodePort {port} (a/b)" in errors[0]
        assert port not in servers.listeners
    finally:
        blocker.close()
    assert servers.apply(0, {port: HealthCheck("a/b", 1)}, ready=True) == []
    assert get(port)[0] == 200


def test_kube_proxy_healthz(servers: HealthServers) -> None:
    port, other = free_ports(2)
    assert servers.apply(port, {}, ready=False) == []
    code, headers, body = get(port, "/healthz")
    assert code == 503 and headers["x-content-type-options"] == "nosniff"
    assert json.loads(body) == {
        "lastUpdated": "0001-01-01 00:00:00 +0000 UTC",
        "currentTime": go_time(NOW_NS),
        "nodeEligible": True,
    }
    assert get(port, "/livez")[0] == 503

    assert servers.apply(port, {}, ready=True) == []
    code, headers, body = get(port, "/healthz")
    assert code == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "lastUpdated": go_time(NOW_NS),
        "currentTime": go_time(NOW_NS),
        "nodeEligible": True,
    }
    code, _, body = get(port, "/livez")
    assert code == 200 and set(json.loads(body)) == {"lastUpdated", "currentTime"}
    assert get(port, "/metrics")[0] == 404

    # moving the port closes the old one; 0 turns it off
    assert servers.apply(other, {}, ready=True) == []
    assert refused(port) and get(other, "/healthz")[0] == 200
    assert servers.apply(0, {}, ready=True) == []
    assert refused(other) and servers.healthz_port == 0


# --- inside a network namespace (as the agent's worker thread does) -----------------------------


@pytest.mark.root
def test_listeners_live_in_the_worker_threads_netns(scratch_netns: str) -> None:
    """Bound by a thread that entered the netns: reachable there, not from the root namespace."""
    from tabby.netlink.netns import enter_netns, setns_path

    hc_port, healthz_port = 30999, 10256  # the namespace is ours: any port is free
    servers = HealthServers()  # 0.0.0.0, as in the agent
    result: dict[str, object] = {}
    applied, done = threading.Event(), threading.Event()

    def worker() -> None:  # the agent's dataplane worker: setns for good, then apply
        try:
            setns_path(scratch_netns)
            result["errors"] = servers.apply(
                healthz_port, {hc_port: HealthCheck("ns/svc", 1)}, ready=True
            )
        finally:
            applied.set()
        done.wait(30)
        servers.close()  # the serving threads and sockets stay in the netns until then

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        assert applied.wait(30) and result["errors"] == []
        with enter_netns(scratch_netns):
            assert get(hc_port)[0] == 200
            assert get(healthz_port, "/healthz")[0] == 200
        assert refused(hc_port) or get(hc_port)[0] != 200  # nothing of ours in the root netns
    finally:
        done.set()
        thread.join(30)

"""NetworkPolicy in a 3-node lab: the reachability-matrix cases (tests/fv/netpol/cases.json,
probed through each pod's ClusterIP and its pod IP), then the policy dump, the drop counters,
bad input, and the conntrack-cached verdicts, on the same x/y/z model."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tabby.cli.main import app as tabbyctl
from tabby.lab import netpol, traffic
from tabby.lab.cluster import HEALTH_PORT, Lab
from tabby.lab.sockclient import SocketClient
from tabby.model import ValidationError

from .service_lab import counters

pytestmark = pytest.mark.root

CASES = Path(__file__).parent / "netpol" / "cases.json"


@pytest.fixture(scope="module")
def model(lab: Lab) -> Iterator[netpol.Harness]:
    h = netpol.Harness(lab, "both", progress=lambda _m: None)
    h.setup()
    yield h
    h.teardown()


def policy(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "x"},
        "spec": spec,
    }


def apply(h: netpol.Harness, *objs: dict[str, Any]) -> None:
    h.ds.apply(list(objs))
    h.lab.wait_ready()


def tcp_ok(h: netpol.Harness, client: str, server: str, port: int = 80) -> bool:
    got = h.probe(
        [
            {
                "port": port,
                "protocol": "TCP",
                "expected": {"columns": [server], "rows": {client: "."}},
            }
        ],
        ["pod"],
    )
    return got[(port, "TCP", "pod")][client] == "."


def test_matrix_cases(model: netpol.Harness) -> None:
    lines: list[str] = []
    try:
        results = netpol.run_cases(model, netpol.load_cases(str(CASES)), lines.append)
    finally:
        model.reset({})  # a failed case's policies must not leak into the next tests
    failed = [r for r in results if r.status == "failed"]
    assert not failed, "\n".join(netpol.render(r) for r in failed)
    passed = [r.id for r in results if r.status == "passed"]
    assert len(passed) >= 40 and [r.id for r in results if r.status == "not-run"] == ["sctp-port"]


def test_policy_dump_in_words(model: netpol.Harness) -> None:
    pol = policy(
        "a-from-y",
        podSelector={"matchLabels": {"pod": "a"}},
        ingress=[
            {
                "from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                "ports": [{"port": "serve-80-tcp"}, {"port": 81, "protocol": "SCTP"}],
            }
        ],
    )
    apply(model, pol)
    try:
        run = CliRunner().invoke(
            tabbyctl, ["bpf", "policy", "dump", "x/a", "--lab", model.lab.name]
        )
        assert run.exit_code == 0, run.output
        text = run.output
        assert "x/a" in text and ": programmed, policy set" in text
        assert "ingress: isolated by x/a-from-y" in text
        assert f"pod y/b ({model.pods['y/b']['ip']})" in text and "TCP 80" in text
        assert "SCTP cannot match on this kernel" in text
        assert "egress: not isolated" in text
        run = CliRunner().invoke(
            tabbyctl, ["bpf", "policy", "dump", "x/a", "--lab", model.lab.name, "-o", "json"]
        )
        doc = json.loads(run.output)
        assert doc["programmed"] and doc["ingress"]["policies"] == ["x/a-from-y"]
        assert not doc["egress"]["isolated"]
        node = model.lab.plan.node(model.lab.pod("x/a")["node"])

        def metrics() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{HEALTH_PORT}/metrics", timeout=2) as r:
                return str(r.read().decode())

        text = traffic.in_netns(node.netns, metrics)
        assert "tabby_policy_endpoints 1.0" in text  # x/a, the node's only isolated pod
        run = CliRunner().invoke(
            tabbyctl, ["bpf", "policy", "dump", "x/b", "--lab", model.lab.name]
        )
        assert "ingress: not isolated" in run.output and ": programmed" in run.output
    finally:
        model.ds.delete("NetworkPolicy", "a-from-y", "x")
        model.lab.wait_ready()


def test_denies_counted_and_bad_input_changes_nothing(model: netpol.Harness) -> None:
    node = model.lab.pod("x/a")["node"]
    deny = policy("deny-a", podSelector={"matchLabels": {"pod": "a"}})
    apply(model, deny)
    try:
        before = counters(model.lab, node).get("drop_pol_in", 0)
        assert not tcp_ok(model, "y/a", "x/a")
        assert counters(model.lab, node).get("drop_pol_in", 0) > before
        bad = [
            ({"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}, "cidr"),
            ({"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}, "except"),
            ({"ports": [{"port": 80, "protocol": "ICMP"}]}, "protocol"),
            ({"ports": [{"port": "serve-80-tcp-too-long"}]}, "port"),
        ]
        for rule, field in bad:
            wrong = policy("deny-a", podSelector={"matchLabels": {"pod": "a"}}, ingress=[rule])
            with pytest.raises(ValidationError) as e:
                model.ds.apply([wrong])
            assert field in str(e.value)
        model.lab.wait_ready()
        assert not tcp_ok(model, "y/a", "x/a")  # still enforced as before
        assert tcp_ok(model, "y/a", "x/b")
        # the pod's own node still reaches it (kubelet probes), as Calico's default
        ip = model.pods["x/a"]["ip"]
        node_ns = model.lab.plan.node(node).netns
        traffic.in_netns(node_ns, lambda: socket.create_connection((ip, 80), timeout=2).close())
    finally:
        model.ds.delete("NetworkPolicy", "deny-a", "x")
        model.lab.wait_ready()


def test_established_flow_kept_new_connections_refused(model: netpol.Harness) -> None:
    """x/a admits y; an open connection from y/a stays usable when the policy stops admitting
    y (its verdict is on its conntrack entry), while a new connection is refused."""
    allow_y = policy(
        "a-from",
        podSelector={"matchLabels": {"pod": "a"}},
        ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}],
    )
    apply(model, allow_y)
    ip = model.pods["x/a"]["ip"]
    box: dict[str, socket.socket] = {}

    def connect() -> None:
        box["s"] = socket.create_connection((ip, 80), timeout=2)

    def get() -> bytes:
        """The status line of one whole response (a bare recv may stop at the headers and leave
        the body for the next request's read)."""
        s = box["s"]
        s.sendall(b"GET /hostname HTTP/1.1\r\nHost: x\r\n\r\n")
        return traffic.read_http_response(s)[0].encode()

    try:
        traffic.in_netns(model.pods["y/a"]["netns"], connect)
        assert b"200" in traffic.in_netns(model.pods["y/a"]["netns"], get)
        # the verdict sits on the flow's conntrack entry on x/a's node (tabbyctl shows it)
        node = model.lab.pod("x/a")["node"]
        run = CliRunner().invoke(
            tabbyctl,
            ["bpf", "conntrack", "dump", "--lab", model.lab.name, "--node", node]
            + ["--type", "PLAIN", "--ip", ip, "-o", "json"],
        )
        sport = box["s"].getsockname()[1]
        rows = [
            r
            for r in json.loads(run.output)
            if (r["src"], r["sport"], r["dst"], r["dport"])
            == (model.pods["y/a"]["ip"], sport, ip, 80)
        ]
        assert len(rows) == 1 and rows[0]["policy"] == ["IN"], run.output
        only_z = policy(
            "a-from",
            podSelector={"matchLabels": {"pod": "a"}},
            ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}],
        )
        apply(model, only_z)
        assert not tcp_ok(model, "y/a", "x/a")
        assert tcp_ok(model, "z/a", "x/a")
        assert b"200" in traffic.in_netns(model.pods["y/a"]["netns"], get)
    finally:
        if "s" in box:
            box["s"].close()
        model.ds.delete("NetworkPolicy", "a-from", "x")
        model.lab.wait_ready()


def test_connect_time_translated_clients_meet_the_same_policy(model: netpol.Harness) -> None:
    """Clients inside their pod's cgroup get the ClusterIP rewritten at connect() (CTLB, TCP):
    the packets carry the backend from the start, and the policy judges them the same."""
    allow_y = policy(
        "a-from-y",
        podSelector={"matchLabels": {"pod": "a"}},
        ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}],
    )
    apply(model, allow_y)
    vip = model.pods["x/a"]["cluster_ip"]
    try:
        for client, admitted in (("y/b", True), ("z/b", False)):
            rec = model.lab.pod(client)
            before = counters(model.lab, rec["node"]).get("ctlb_connect", 0)
            with SocketClient(rec["netns"], rec["cgroup"]) as c:
                got = c("tcp", ip=vip, port=80, path="/hostname")
            assert counters(model.lab, rec["node"]).get("ctlb_connect", 0) > before
            if admitted:
                assert got.get("body") == "a" and got.get("peer") == [vip, 80], got
            else:
                assert "errno" in got, got  # timed out: the SYN was dropped
    finally:
        model.ds.delete("NetworkPolicy", "a-from-y", "x")
        model.lab.wait_ready()

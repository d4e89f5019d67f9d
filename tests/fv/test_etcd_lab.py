"""A lab whose agents, controller, CNI and tabbyctl all run on etcd (Calico's etcd mode).

The lab starts its own etcd (loopback TCP on free ports + a unix socket in its state dir, data
there too), records it as a lab process and stops it by PID on `lab down`. On it run, unchanged,
a representative part of the service tests (test_services.py's ClusterIP TCP and UDP, NodePort
from outside on every node with the client's address kept, a service without endpoints refused,
hairpin: imported below, so pytest runs them here on this module's lab), 18 of the
NetworkPolicy reachability matrix's cases (tests/fv/netpol/cases.json, chosen below), plus
pod-to-pod traffic, a NetworkPolicy with a relabel through the ClusterIP, tabbyctl on etcd and an
etcd restart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tabby.datastore.etcd import EtcdDatastore
from tabby.lab import etcd, netpol, processes, state, traffic
from tabby.lab.cluster import Lab

from . import test_services as service_tests

# Collected here too, with this module's `lab`: the same tests on etcd (fixtures first).
cluster = service_tests.cluster
VIP = service_tests.VIP
test_clusterip_tcp = service_tests.test_clusterip_tcp_reaches_every_remote_backend_without_snat
test_clusterip_udp = service_tests.test_clusterip_udp
test_nodeport_from_outside = service_tests.test_nodeport_from_outside_on_every_node
test_no_endpoints_refused = service_tests.test_service_without_endpoints_is_refused_not_black_holed
test_hairpin = service_tests.test_hairpin_pod_reaches_itself_through_its_service

pytestmark = [pytest.mark.root, pytest.mark.lab, pytest.mark.etcd]
NETPOL_CASES = Path(__file__).parent / "netpol" / "cases.json"


# The reachability cases run here (the whole matrix runs on the embedded lab in test_netpol.py):
# one or more per way a datastore event changes policy (policy create, update, delete; pod and
# namespace relabels; pods and namespaces created and deleted) and per rule shape the agents
# program (selectors AND/OR, named and ranged ports, UDP, egress, ipBlock except, unions).
# The whole matrix on etcd passed too (93 s through the pods' addresses, 117 s through both):
# `tabbyctl lab up --datastore etcd` then `tabbyctl lab netpol-matrix --cases ...`.
ETCD_CASES = (
    "deny-all-ingress-x",
    "ingress-ns-and-pod-in-one-peer",
    "ingress-ns-or-pod-two-peers",
    "ingress-named-udp",
    "ingress-end-port",
    "deny-all-egress-x",
    "egress-named-port",
    "ingress-and-egress-meet",
    "ingress-ipblock-except",
    "union-of-policies",
    "update-policy",
    "delete-policy",
    "relabel-namespace",
    "relabel-client-pod",
    "relabel-target-pod",
    "create-pod",
    "delete-pod",
    "create-namespace",
)


@pytest.fixture(scope="module")
def model(lab: Lab) -> netpol.Harness:
    """test_netpol.py's x/y/z model, probed at the pods' own addresses: what etcd changes is
    what the agents program, not the service path (the 3-node lab probes both). No teardown of
    its own: the lab goes right after this module, with every pod."""
    h = netpol.Harness(lab, "pod", progress=lambda _m: None)
    h.setup()
    return h


@pytest.fixture(scope="module")
def lab(root_caps: None, etcd_binary: str) -> Iterator[Lab]:
    """Overrides conftest's: a 2-node lab on etcd; after down, its etcd must be gone."""
    name = "e" + uuid.uuid4().hex[:7]
    try:
        yield Lab.up(name, 2, progress=lambda _m: None, datastore="etcd")
    finally:
        recorded = [p for p in state.read(name).get("procs", []) if p["role"] == "etcd"]
        Lab.down(name, progress=lambda _m: None)
    assert recorded and not any(processes.alive(p) for p in recorded), "lab down left etcd"
    assert not os.path.exists(state.lab_dir(name))


def test_the_lab_runs_on_etcd(lab: Lab) -> None:
    assert lab.url.startswith("etcd+unix:///run/tabby/") and lab.etcd_url
    assert isinstance(lab.datastore(), EtcdDatastore)
    for node in lab.plan.nodes:
        argv = lab.agent_proc(node.name)["argv"]
        assert argv[argv.index("--datastore") + 1] == lab.url


def test_pods_talk_across_nodes(cluster: dict[str, Any]) -> None:
    client, web = cluster["client"], cluster["web-a"]
    assert traffic.http_get(client["netns"], web["ip"], 8080, "/hostname") == "web-a"
    seen = traffic.http_get(client["netns"], web["ip"], 8080, "/clientip").split(":")[0]
    assert seen == client["ip"], "no SNAT between pods"


def test_network_policy_and_a_relabel_on_etcd(lab: Lab, cluster: dict[str, Any]) -> None:
    """The policy side on etcd: a NetworkPolicy admitting only pods labelled role=friend to the
    web pods denies the client (direct and through the ClusterIP) until the client is relabelled,
    both changes travelling through the agents' etcd watch."""
    ds = lab.datastore()
    client, web = cluster["client"], cluster["web-a"]
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "friends-only", "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "friend"}}}]}],
        },
    }
    ds.apply([policy])
    lab.wait_ready()
    try:
        for ip, port in ((web["ip"], 8080), (VIP, 80)):
            ok, _ = traffic.reachable(
                lambda ip=ip, port=port: traffic.http_get(
                    client["netns"], ip, port, "/hostname", timeout_s=1
                )
            )
            assert not ok, f"{ip}:{port} answered a pod the policy does not admit"
        ds.patch("Pod", "client", "default", {"metadata": {"labels": {"role": "friend"}}})
        lab.wait_ready()
        assert traffic.http_get(client["netns"], web["ip"], 8080, "/hostname") == "web-a"
        assert traffic.http_get(client["netns"], VIP, 80, "/hostname") in {"web-a", "web-b"}
    finally:
        ds.delete("NetworkPolicy", "friends-only", "default")
        ds.patch("Pod", "client", "default", {"metadata": {"labels": {"role": None}}})
        lab.wait_ready()


def test_netpol_matrix_cases_on_etcd(model: netpol.Harness) -> None:
    cases = [c for c in netpol.load_cases(str(NETPOL_CASES)) if c["id"] in ETCD_CASES]
    assert sorted(c["id"] for c in cases) == sorted(ETCD_CASES)
    results = netpol.run_cases(model, cases, lambda _line: None)
    failed = [r for r in results if r.status != "passed"]
    assert not failed, "\n".join(netpol.render(r) for r in failed)
    assert len(results) == len(ETCD_CASES)
    model.reset({})


def test_tabbyctl_reads_the_lab_etcd(lab: Lab, cluster: dict[str, Any]) -> None:
    tabbyctl = os.path.join(os.path.dirname(sys.executable), "tabbyctl")
    assert lab.etcd_url is not None
    out = subprocess.run(
        [tabbyctl, "get", "pods", "--datastore", lab.etcd_url, "-o", "json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    items = listed["items"] if isinstance(listed, dict) else listed
    names = {p["metadata"]["name"] for p in items}
    assert {"client", "web-a", "web-b"} <= names
    ips = {p["metadata"]["name"]: p["status"]["podIP"] for p in items}
    assert ips["client"] == cluster["client"]["ip"]
    env = {**os.environ, "TABBY_DATASTORE": lab.etcd_url}
    out = subprocess.run(
        [tabbyctl, "get", "services"], capture_output=True, text=True, timeout=30, env=env
    )
    assert out.returncode == 0 and "web" in out.stdout and VIP in out.stdout, out.stderr


def test_agents_follow_etcd_through_a_restart(lab: Lab, cluster: dict[str, Any]) -> None:
    """etcd stopped (by PID) and started again on the same data: the agents' watches resume and
    program a pod added afterwards."""
    rec = next(p for p in state.read(lab.name)["procs"] if p["role"] == "etcd")
    processes.stop(rec)
    assert not processes.alive(rec)
    work = state.lab_dir(lab.name)
    new = processes.spawn(
        rec["argv"], "etcd", os.path.join(work, "etcd.log"), cgroup=None, cwd=work
    )
    with state.editing(lab.name) as st:
        st["procs"] = [p for p in st["procs"] if p["role"] != "etcd"] + [new]
    etcd.wait_ready(lab.url, alive=lambda: processes.alive(new))
    ip = lab.add_pod("late", "node2")  # waits until every agent has programmed it
    client = cluster["client"]
    assert traffic.http_get(client["netns"], ip, 8080, "/hostname") == "late"

"""Service policies on real packets: session affinity, external/internal traffic policy Local and
the health-check node port, kube-proxy's healthz, LoadBalancer ingress IPs, externalIPs and
source ranges, and how evenly a ClusterIP spreads.

Backends (netexec, ``app: pool``): pool-a on node2, pool-b and pool-c on node3. Clients: cl1 on
node1 (no backend), cl2 on node2 (one), and the external client 203.0.113.10, which reaches
198.51.100.0/24 through the fabric's ECMP route over every node (docs/design/lab.md).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from tabby.bpf.maps.counters import Reason
from tabby.lab.cluster import Lab

from .service_lab import (
    counter_delta,
    counters,
    hostnames,
    http,
    http_json,
    service,
    tcp_outcome,
    wait_for_endpoints,
)

pytestmark = [pytest.mark.root, pytest.mark.lab]

POOL = {"pool-a": "node2", "pool-b": "node3", "pool-c": "node3"}
STICKY_VIP = "100.64.0.30"
SPREAD_VIP = "100.64.0.31"
ITP_VIP = "100.64.0.32"
LB_OPEN_IP = "198.51.100.10"
LB_CLOSED_IP = "198.51.100.11"
EXTERNAL_IP = "198.51.100.20"
ALT_HEALTHZ_PORT = 10299


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> dict[str, Any]:
    lab.add_pod("cl1", "node1", wait=False)
    lab.add_pod("cl2", "node2", wait=False)
    for name, node in POOL.items():
        lab.add_pod(name, node, labels={"app": "pool", "pod": name}, wait=False)
    pool = {"app": "pool"}
    lab.datastore().apply(
        [
            service(
                "sticky",
                pool,
                clusterIP=STICKY_VIP,
                sessionAffinity="ClientIP",
                sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
            ),
            service("spread", pool, clusterIP=SPREAD_VIP),
            service("itp", pool, clusterIP=ITP_VIP, internalTrafficPolicy="Local"),
            service("etp", pool, type="LoadBalancer", externalTrafficPolicy="Local"),
            service(
                "lb-open",
                pool,
                type="LoadBalancer",
                loadBalancerSourceRanges=["203.0.113.0/24"],
                externalIPs=[EXTERNAL_IP],
                status={"loadBalancer": {"ingress": [{"ip": LB_OPEN_IP}]}},
            ),
            service(
                "lb-closed",
                pool,
                type="LoadBalancer",
                loadBalancerSourceRanges=["192.0.2.0/24"],
                status={"loadBalancer": {"ingress": [{"ip": LB_CLOSED_IP}]}},
            ),
        ]
    )
    for name in ("sticky", "spread", "itp", "etp", "lb-open", "lb-closed"):
        wait_for_endpoints(lab, name, len(POOL))
    return {n: lab.pod(n) for n in ("cl1", "cl2", *POOL)}


def test_session_affinity_client_ip_sticks_and_none_spreads(cluster: dict[str, Any]) -> None:
    netns = cluster["cl1"]["netns"]
    sticky = hostnames(netns, STICKY_VIP, 80, 20)
    spread = hostnames(netns, SPREAD_VIP, 80, 20)
    print(f"affinity ClientIP: {dict(sticky)}; affinity None: {dict(spread)}")
    assert len(sticky) == 1 and set(sticky) <= set(POOL), sticky
    assert len(spread) > 1, f"without affinity 20 connections all went to {spread}"


def test_external_traffic_policy_local_and_health_check_node_port(
    lab: Lab, cluster: dict[str, Any]
) -> None:
    stored = lab.datastore().get("Service", "etp", "default")
    assert stored is not None
    node_port = int(stored["spec"]["ports"][0]["nodePort"])
    hc_port = int(stored["spec"]["healthCheckNodePort"])
    ext = lab.plan.external_netns
    node1, node2, node3 = (lab.plan.node(n).ip for n in ("node1", "node2", "node3"))

    before = counters(lab, "node1")
    # node1 has no pool pod: kube-proxy drops there (a load balancer would not send it anything)
    outcome = tcp_outcome(ext, node1, node_port, timeout_s=1.0)
    after = counters(lab, "node1")
    assert outcome == "timeout", f"NodePort {node_port} on node1 (no local endpoint): {outcome}"
    assert counter_delta(before, after, Reason.DROP_NO_LOCAL) >= 1
    # nodes with local endpoints answer, with their own pods only
    assert hostnames(ext, node2, node_port, 5) == Counter({"pool-a": 5})
    assert set(hostnames(ext, node3, node_port, 10)) <= {"pool-b", "pool-c"}

    answers = {
        n: http_json(ext, ip, hc_port, "/") for n, ip in (("node1", node1), ("node2", node2))
    }
    print(f"healthCheckNodePort {hc_port}: {answers}")
    code, body = answers["node1"]
    assert code == 503 and body["localEndpoints"] == 0, answers
    code, body = answers["node2"]
    assert code == 200 and body["localEndpoints"] == 1, answers
    assert body["service"] == {"namespace": "default", "name": "etp"}


def test_internal_traffic_policy_local(lab: Lab, cluster: dict[str, Any]) -> None:
    seen = hostnames(cluster["cl2"]["netns"], ITP_VIP, 80, 10)
    assert seen == Counter({"pool-a": 10}), f"cl2 on node2 left its node: {seen}"
    before = counters(lab, "node1")
    outcome = tcp_outcome(cluster["cl1"]["netns"], ITP_VIP, 80, timeout_s=1.0)
    after = counters(lab, "node1")
    assert outcome == "timeout", f"cl1 on node1 (no local endpoint): {outcome}"
    assert counter_delta(before, after, Reason.DROP_NO_LOCAL) >= 1


def test_kube_proxy_healthz_on_every_node_and_its_port_moves(lab: Lab) -> None:
    ext = lab.plan.external_netns
    for node in lab.plan.nodes:
        code, body = http_json(ext, node.ip, 10256, "/healthz")
        assert code == 200, (node.name, code, body)
        assert {"lastUpdated", "currentTime", "nodeEligible"} <= set(body), body
    ds = lab.datastore()
    try:
        rev = ds.patch(
            "FelixConfiguration",
            "default",
            None,
            {"spec": {"bpfKubeProxyHealthzPort": ALT_HEALTHZ_PORT}},
        )
        lab.wait_ready(int(rev["metadata"]["resourceVersion"]))
        for node in lab.plan.nodes:
            assert http(ext, node.ip, ALT_HEALTHZ_PORT, "/healthz")[0] == 200, node.name
            assert tcp_outcome(ext, node.ip, 10256) == "refused", node.name
    finally:
        rev = ds.patch(
            "FelixConfiguration", "default", None, {"spec": {"bpfKubeProxyHealthzPort": 10256}}
        )
        lab.wait_ready(int(rev["metadata"]["resourceVersion"]))


def test_load_balancer_ingress_external_ips_and_source_ranges(
    lab: Lab, cluster: dict[str, Any]
) -> None:
    ext = lab.plan.external_netns
    assert set(hostnames(ext, LB_OPEN_IP, 80, 6)) <= set(POOL), "LoadBalancer ingress IP"
    assert set(hostnames(ext, EXTERNAL_IP, 80, 6)) <= set(POOL), "externalIP"
    before = {n.name: counters(lab, n.name) for n in lab.plan.nodes}
    outcome = tcp_outcome(ext, LB_CLOSED_IP, 80, timeout_s=1.0)
    dropped = sum(
        counter_delta(before[n.name], counters(lab, n.name), Reason.DROP_SRC_RANGE)
        for n in lab.plan.nodes
    )
    assert outcome == "timeout", f"203.0.113.10 is outside 192.0.2.0/24: {outcome}"
    assert dropped >= 1, "not dropped by the source-range check"


def test_clusterip_spreads_300_connections_evenly(cluster: dict[str, Any]) -> None:
    seen = hostnames(cluster["cl1"]["netns"], SPREAD_VIP, 80, 300)
    print(f"300 connections over 3 backends: {dict(sorted(seen.items()))}")
    assert set(seen) == set(POOL), seen
    assert all(60 <= n <= 140 for n in seen.values()), seen

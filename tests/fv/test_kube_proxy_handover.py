"""The kube-proxy hand-over on a lab node: kube-proxy's real rules are there, the agent starts,
they are gone, services work through tabby, and nobody else's rules or tables were touched.

node1's agent is stopped, as if kube-proxy had been running there until now; its namespace gets
what kube-proxy writes for the lab's own Service (its real endpoints) and 30 others: iptables in
the legacy and nft backends, ip6tables, the `ip kube-proxy` and `ip6 kube-proxy` nft tables
(tabby.lab.kubeproxy_rules); and beside them kubelet's KUBE-FIREWALL, a user chain, user rules and
an nft table of another owner. Then the agent starts again.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tabby.dataplane.kubeproxy import is_kube_proxy_chain
from tabby.lab import processes, topology, traffic
from tabby.lab.cluster import Lab
from tabby.lab.kubeproxy_rules import (
    KubeServicePort,
    iptables_restore,
    nftables,
    synthetic_services,
)

from .test_services import client_and_web

pytestmark = [pytest.mark.root, pytest.mark.lab]

VIP = "100.64.0.30"
SAVES = ("iptables-legacy-save", "iptables-nft-save", "ip6tables-legacy-save", "ip6tables-nft-save")
OTHERS = """*filter
:KUBE-FIREWALL - [0:0]
:MY-FW - [0:0]
-A INPUT -j KUBE-FIREWALL
-A INPUT -p tcp -m tcp --dport 2222 -j ACCEPT
-A INPUT -j MY-FW
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -j DROP
-A MY-FW -s 10.9.0.0/16 -j DROP
COMMIT
*nat
-A POSTROUTING -s 10.99.0.0/16 -j MASQUERADE
COMMIT
"""
OTHER_NFT = """table inet mine {
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\ttcp dport 2223 accept
\t}
}
"""
V6 = [KubeServicePort("default", "web6", "fd00:96::10", 80, "TCP", "http", (("fd00::2", 80),))]


@pytest.fixture(scope="module")
def lab(root_caps: None) -> Iterator[Lab]:
    """Overrides conftest's: two nodes are enough (client on node1, backends on node2)."""
    name = "k" + uuid.uuid4().hex[:7]
    try:
        yield Lab.up(name, 2, progress=lambda _m: None)
    finally:
        Lab.down(name, progress=lambda _m: None)


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> dict[str, Any]:
    return client_and_web(lab, VIP)


def _ns(netns: str, *argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", netns, *argv], input=stdin, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def _kube_proxys(line: str) -> bool:
    names = re.findall(r"KUBE-[A-Z0-9-]+", re.sub(r'"[^"]*"', '""', line))
    return any(is_kube_proxy_chain(n) for n in names)


def _load_kube_proxy(netns: str, cluster: dict[str, Any]) -> None:
    """What kube-proxy (iptables mode, then nftables mode) left, plus other owners' rules."""
    eps = ((cluster["web-a"]["ip"], 8080), (cluster["web-b"]["ip"], 8080))
    web = [
        KubeServicePort("default", "web", VIP, 80, "TCP", "http", eps),
        KubeServicePort("default", "web", VIP, 53, "UDP", "dns", ((eps[0][0], 5353),)),
    ]
    v4 = web + synthetic_services(30, 3, vip_base="100.64.1.0")
    pool = topology.POOL_CIDR
    for backend in ("legacy", "nft"):
        rules = iptables_restore(v4, cluster_cidr=pool)
        _ns(netns, f"iptables-{backend}-restore", "--noflush", stdin=rules)
        _ns(netns, f"iptables-{backend}-restore", "--noflush", stdin=OTHERS)
        rules6 = iptables_restore(V6, cluster_cidr="fd00::/48")
        _ns(netns, f"ip6tables-{backend}-restore", "--noflush", stdin=rules6)
    _ns(
        netns, "nft", "-f", "-", stdin=nftables(v4, cluster_cidr=pool, service_cidr="100.64.0.0/13")
    )
    _ns(
        netns,
        "nft",
        "-f",
        "-",
        stdin=nftables(V6, family="ip6", cluster_cidr="fd00::/48", service_cidr="fd00:96::/112"),
    )
    _ns(netns, "nft", "-f", "-", stdin=OTHER_NFT)


def _snapshot(netns: str) -> dict[str, str]:
    out = {s: _ns(netns, s) for s in SAVES}
    out["nft tables"] = _ns(netns, "nft", "list", "tables")
    out["nft inet mine"] = _ns(netns, "nft", "list", "table", "inet", "mine")
    return out


def _rule_lines(save: str) -> list[str]:
    """Tables, chains (without their packet counters, which traffic moves) and rules."""
    return [
        line.rsplit(" [", 1)[0] if line.startswith(":") else line
        for line in save.splitlines()
        if line.startswith(("-A", ":", "*"))
    ]


def _restart_agent_with_leftovers(lab: Lab, node: str, cluster: dict[str, Any]) -> dict[str, str]:
    """Stop the node's agent, load kube-proxy's rules, start the agent; the state loaded."""
    processes.stop(lab.agent_proc(node))
    netns = lab.plan.node(node).netns
    _load_kube_proxy(netns, cluster)
    before = _snapshot(netns)
    for s in SAVES:
        assert "-j KUBE-SVC-" in before[s] or "-j KUBE-SERVICES" in before[s], s
    assert "table ip kube-proxy" in before["nft tables"]
    lab.start_agent(lab.plan.node(node))
    lab.wait_ready()
    return before


def test_agent_start_removes_kube_proxy_rules_and_nothing_else(lab, cluster):
    netns = lab.plan.node("node1").netns
    before = _restart_agent_with_leftovers(lab, "node1", cluster)
    after = _snapshot(netns)
    for s in SAVES:
        assert not [line for line in after[s].splitlines() if _kube_proxys(line)], s
        assert _rule_lines(after[s]) == [x for x in _rule_lines(before[s]) if not _kube_proxys(x)]
    kept_tables = [t for t in before["nft tables"].splitlines() if not t.endswith(" kube-proxy")]
    assert after["nft tables"].splitlines() == kept_tables
    assert after["nft inet mine"] == before["nft inet mine"]
    assert "-A INPUT -j KUBE-FIREWALL" in after["iptables-legacy-save"]  # kubelet's stays
    assert "10.99.0.0/16 -j MASQUERADE" in after["iptables-nft-save"]

    # services work, and only tabby can be serving them now
    client = cluster["client"]
    seen = Counter(traffic.http_get(client["netns"], VIP, 80, "/hostname") for _ in range(20))
    assert set(seen) == {"web-a", "web-b"}, seen
    assert traffic.udp_request(client["netns"], VIP, 53, b"hostname") in {"web-a", "web-b"}


def test_cleanup_disabled_keeps_them_and_reenabling_removes_them_live(lab, cluster):
    ds = lab.datastore()
    ds.patch(
        "FelixConfiguration",
        "default",
        None,
        {"spec": {"bpfKubeProxyIptablesCleanupEnabled": False}},
    )
    netns = lab.plan.node("node2").netns
    try:
        before = _restart_agent_with_leftovers(lab, "node2", cluster)
        kept = _snapshot(netns)
        for s in SAVES:
            assert _rule_lines(kept[s]) == _rule_lines(before[s]), s
        assert "table ip kube-proxy" in kept["nft tables"]
    finally:
        ds.patch(
            "FelixConfiguration",
            "default",
            None,
            {"spec": {"bpfKubeProxyIptablesCleanupEnabled": True}},
        )
    lab.wait_ready()
    after = _snapshot(netns)
    for s in SAVES:
        assert not [line for line in after[s].splitlines() if _kube_proxys(line)], s
    assert "kube-proxy" not in after["nft tables"]

"""The bench's kube-proxy baselines carry real traffic: a ClusterIP is reachable through each
layout (iptables-legacy, iptables-nft, nftables) in its own node namespace, spreads over its
endpoints, keeps the pod's source address, and the rules sit in the backend they claim. A broken
baseline would make every ratio of `tabbyctl bench` a lie."""

from __future__ import annotations

import collections
import dataclasses
import uuid
from collections.abc import Iterator

import pytest

from tabby.lab import baselines, fabric, kubeproxy_rules, traffic
from tabby.lab.baselines import Baselines

pytestmark = [pytest.mark.root]

REQUESTS = 60


@pytest.fixture(scope="module")
def paths(root_caps: None) -> Iterator[Baselines]:
    prefix = "tbl" + uuid.uuid4().hex[:6]
    try:
        yield Baselines.up(prefix)
    finally:
        baselines.down(prefix)
        assert not fabric.lab_netns(f"{prefix}-"), "baseline namespaces left behind"


def spread(paths: Baselines, path: str, ip: str, port: int) -> collections.Counter[str]:
    netns = paths.prepare_run(path)
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(REQUESTS):
        body = traffic.http_get(netns, ip, port, "/").split()
        assert body[0] == "backend" and body[2] == "client", body
        assert body[3] == paths.plans[path].client_ip, f"{path}: source rewritten: {body}"
        seen[body[1]] += 1
    return seen


@pytest.mark.parametrize("path", ["iptables-legacy", "iptables-nft", "nftables"])
def test_clusterip_reaches_every_endpoint_through_the_layout(paths: Baselines, path: str) -> None:
    services = baselines.kube_services(50)
    done = paths.program(path, services)
    assert done.seconds is not None and done.seconds > 0
    vip, port = paths.target(path, services)
    assert vip == services[-1].cluster_ip  # the last service: the end of KUBE-SERVICES
    seen = spread(paths, path, vip, port)
    want = {ip for ip, _ in services[-1].endpoints}
    assert set(seen) == want, f"{path}: answered by {dict(seen)}, endpoints {want}"
    # statistic/numgen choice is uniform: each of 3 endpoints well above 5 of 60 (p < 1e-4)
    assert min(seen.values()) >= 5, f"{path}: skewed spread {dict(seen)}"
    # an unrelated service in the middle of the table is translated too
    middle = services[len(services) // 2]
    body = traffic.http_get(paths.plans[path].client_netns, middle.cluster_ip, middle.port, "/")
    assert body.split()[1] in {ip for ip, _ in middle.endpoints}


def test_rules_live_in_the_backend_they_claim(paths: Baselines) -> None:
    services = baselines.kube_services(3)
    chain = kubeproxy_rules.svc_chain(services[-1])
    for path in ("iptables-legacy", "iptables-nft", "nftables"):
        paths.program(path, services)
    node = {p: paths.plans[p].node_netns for p in baselines.PATHS}
    legacy = baselines.run_in(node["iptables-legacy"], ["iptables-legacy-save", "-t", "nat"])
    assert "-A KUBE-SERVICES" in legacy.stdout and chain in legacy.stdout
    assert "-m statistic --mode random --probability 0.33333" in legacy.stdout
    # iptables-nft writes nf_tables' "ip nat" table; the legacy node has no nft rules at all
    nft_tables = baselines.run_in(node["iptables-nft"], ["nft", "list", "tables"]).stdout
    assert "table ip nat" in nft_tables
    assert chain in baselines.run_in(node["iptables-nft"], ["iptables-nft-save"]).stdout
    assert baselines.run_in(node["iptables-legacy"], ["nft", "list", "tables"]).stdout == ""
    kp = baselines.run_in(node["nftables"], ["nft", "list", "table", "ip", "kube-proxy"]).stdout
    assert "map service-ips" in kp and "numgen random mod 3 vmap" in kp
    assert kubeproxy_rules.nft_service_chain(services[-1]) in kp


def test_plain_path_has_no_rule_and_no_conntrack(paths: Baselines) -> None:
    services = baselines.kube_services(3)
    paths.program("plain", services)
    ip, port = paths.target("plain", services)
    seen = spread(paths, "plain", ip, port)
    assert set(seen) == {ip}
    node = paths.plans["plain"].node_netns
    assert baselines.run_in(node, ["nft", "list", "ruleset"]).stdout == ""
    assert baselines.conntrack_count(node) == 0


def test_flush_removes_a_layout(paths: Baselines) -> None:
    services = baselines.kube_services(3)
    paths.program("nftables", services)
    paths.flush("nftables")
    vip, port = paths.target("nftables", services)
    netns = paths.prepare_run("nftables")
    ok, detail = traffic.reachable(lambda: traffic.http_get(netns, vip, port, "/", 1.0))
    assert not ok, f"still translated after flush: {detail}"


@pytest.mark.parametrize("path", ["iptables-legacy", "iptables-nft", "nftables"])
def test_partial_sync_moves_one_endpoint(paths: Baselines, path: str) -> None:
    services = baselines.kube_services(20)
    paths.program(path, services)
    old = services[10]
    new_ip = "100.120.255.7"
    new = dataclasses.replace(old, endpoints=((new_ip, old.endpoints[0][1]), *old.endpoints[1:]))
    after = [*services[:10], new, *services[11:]]
    took = paths.change_one(path, after, old, new)
    assert took is not None and took > 0
    seen = spread(paths, path, new.cluster_ip, new.port)
    assert set(seen) == {ip for ip, _ in new.endpoints}, dict(seen)
    # the other services kept their rules (KUBE-SERVICES is rewritten whole by the partial sync)
    last = services[-1]
    body = traffic.http_get(paths.plans[path].client_netns, last.cluster_ip, last.port, "/")
    assert body.split()[1] in {ip for ip, _ in last.endpoints}
    node = paths.plans[path].node_netns
    gone = old.endpoints[0][0]
    if path == "nftables":
        dump = baselines.run_in(node, ["nft", "list", "table", "ip", "kube-proxy"]).stdout
        assert kubeproxy_rules.nft_endpoint_chain(old, gone, old.endpoints[0][1]) not in dump
    else:
        save = baselines.run_in(node, [f"iptables-{baselines.iptables_backend(path)}-save"])
        assert kubeproxy_rules.sep_chain(old, gone, old.endpoints[0][1]) not in save.stdout


def test_large_nftables_tables_load_in_chunks(
    paths: Baselines, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above NFT_ONE_TRANSACTION_MAX the same rules go in several transactions (not timed)."""
    monkeypatch.setattr(baselines, "NFT_ONE_TRANSACTION_MAX", 10)
    monkeypatch.setattr(baselines, "NFT_CHUNK", 7)
    services = baselines.kube_services(25)
    done = paths.program("nftables", services)
    assert done.seconds is None and "not measured" in done.note
    netns = paths.prepare_run("nftables")
    for sp in (services[0], services[8], services[-1]):  # first, second and last transaction
        body = traffic.http_get(netns, sp.cluster_ip, sp.port, "/")
        assert body.split()[1] in {ip for ip, _ in sp.endpoints}
    node = paths.plans["nftables"].node_netns
    kp = baselines.run_in(node, ["nft", "list", "table", "ip", "kube-proxy"]).stdout
    assert kp.count("jump services") == 2  # nat-prerouting and nat-output, once each
    assert kp.count("numgen random mod 3") == 25

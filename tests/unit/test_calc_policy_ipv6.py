"""calc.policy over IPv6: dual-stack pods are peers by both addresses, IPv6 ipBlocks (and except)
compile into IPv6 prefixes, named egress ports resolve on IPv6 addresses too, and the policy of a
dual-stack pod names its IPv6 address (the same set, tby_pol_ep6)."""

from __future__ import annotations

from typing import Any

from tabby.calc import policy as P
from tabby.model.validate import validate


def pod(ns: str, name: str, ip4: str, ip6: str, labels: dict[str, str]) -> dict[str, Any]:
    ips = [{"ip": ip} for ip in (ip4, ip6) if ip]
    return {
        "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {
            "nodeName": "n1",
            "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}],
        },
        "status": {"podIP": ips[0]["ip"], "podIPs": ips, "phase": "Running"},
    }


def netpol(name: str, **spec: Any) -> dict[str, Any]:
    return validate(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"namespace": "x", "name": name},
            "spec": spec,
        }
    )


SERVER = pod("x", "server", "100.96.0.10", "fd00:96::10", {"app": "server"})
CLIENT = pod("x", "client", "100.96.0.11", "fd00:96::11", {"app": "client"})
OTHER = pod("x", "other", "100.96.0.12", "fd00:96::12", {"app": "other"})
ONLY6 = pod("x", "only6", "", "fd00:96::13", {"app": "only6"})


def resources(*objs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for o in (SERVER, CLIENT, OTHER, ONLY6, *objs):
        out.setdefault(o["kind"], {})[
            (o["metadata"].get("namespace", ""), o["metadata"]["name"])
        ] = o
    return out


def test_pod_selector_peers_contribute_both_addresses() -> None:
    pol = netpol(
        "allow-client",
        podSelector={"matchLabels": {"app": "server"}},
        ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}],
    )
    eps = P.compute(resources(pol), "n1")
    ep = eps["100.96.0.10"]
    assert ep.ip6 == "fd00:96::10"
    assert P.allows(ep.ingress, "fd00:96::11", "TCP", 8080)
    assert P.allows(ep.ingress, "100.96.0.11", "UDP", 53)
    assert not P.allows(ep.ingress, "fd00:96::12", "TCP", 8080), "other pod, IPv6"
    assert not P.allows(ep.ingress, "100.96.0.12", "TCP", 8080), "other pod, IPv4"
    peers = dict(P.compile_direction(ep.ingress).peers)
    assert "fd00:96::11/128" in peers and "100.96.0.11/32" in peers


def test_ipv6_only_pod_is_keyed_by_its_ipv6_address_and_is_a_peer() -> None:
    pol = netpol(
        "deny-all",
        podSelector={},
        ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "only6"}}}]}],
    )
    eps = P.compute(resources(pol), "n1")
    assert eps["fd00:96::13"].ip6 == "" and eps["fd00:96::13"].ip == "fd00:96::13"
    assert P.allows(eps["100.96.0.10"].ingress, "fd00:96::13", "TCP", 80)
    assert not P.allows(eps["100.96.0.10"].ingress, "fd00:96::11", "TCP", 80)


def test_ipv6_ip_block_with_except_and_ports() -> None:
    pol = netpol(
        "blocks",
        podSelector={"matchLabels": {"app": "server"}},
        ingress=[
            {
                "from": [{"ipBlock": {"cidr": "fd00:96::/64", "except": ["fd00:96::12/128"]}}],
                "ports": [{"protocol": "TCP", "port": 8000, "endPort": 8100}],
            },
            {"from": [{"ipBlock": {"cidr": "2001:db8::5/128"}}]},
        ],
    )
    ep = P.compute(resources(pol), "n1")["100.96.0.10"]
    assert P.allows(ep.ingress, "fd00:96::11", "TCP", 8080)
    assert not P.allows(ep.ingress, "fd00:96::11", "TCP", 8101), "outside endPort"
    assert not P.allows(ep.ingress, "fd00:96::11", "UDP", 8080), "UDP not listed"
    assert not P.allows(ep.ingress, "fd00:96::12", "TCP", 8080), "except"
    assert P.allows(ep.ingress, "2001:db8::5", "UDP", 9), "/128, every port"
    assert not P.allows(ep.ingress, "2001:db8::6", "UDP", 9)
    assert not P.allows(ep.ingress, "100.96.0.11", "TCP", 8080), "an IPv6 block holds no IPv4"


def test_empty_peers_admit_both_families_and_named_egress_ports_resolve_on_ipv6() -> None:
    pol = netpol(
        "egress",
        podSelector={"matchLabels": {"app": "client"}},
        policyTypes=["Egress"],
        egress=[
            {"ports": [{"protocol": "UDP", "port": 53}]},
            {
                "to": [{"podSelector": {"matchLabels": {"app": "server"}}}],
                "ports": [{"port": "http"}],
            },
        ],
    )
    ep = P.compute(resources(pol), "n1")["100.96.0.11"]
    assert P.allows(ep.egress, "2001:db8::1", "UDP", 53) and P.allows(
        ep.egress, "8.8.8.8", "UDP", 53
    )
    assert P.allows(ep.egress, "fd00:96::10", "TCP", 8080), "named port on the IPv6 address"
    assert not P.allows(ep.egress, "fd00:96::10", "TCP", 80)
    assert not P.allows(ep.egress, "fd00:96::12", "TCP", 8080)


def test_describe_names_pods_by_ipv6_address_once() -> None:
    pol = netpol(
        "allow-client",
        podSelector={"matchLabels": {"app": "server"}},
        ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}, {}],
    )
    res = resources(pol)
    ep = P.compute(res, "n1")["100.96.0.10"]
    words = P.describe(ep, P.pod_names(res))
    assert words["ip6"] == "fd00:96::10"
    peers = [p for rule in words["ingress"]["allow"] for p in rule["peers"]]
    assert "pod x/client (fd00:96::11)" in peers and "pod x/client (100.96.0.11)" in peers
    assert peers.count("anywhere") == 1

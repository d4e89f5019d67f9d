"""calc.policy: the API's NetworkPolicy semantics on the e2e model (namespaces x, y, z; pods a, b,
c), judged through the compiled LPM entries (what the datapath decides), fed in several orders."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from tabby.calc import policy as P
from tabby.model.errors import ValidationError
from tabby.model.validate import validate

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
PORT_NAMES = {
    (80, "TCP"): "serve-80-tcp",
    (81, "TCP"): "serve-81-tcp",
    (80, "UDP"): "serve-80-udp",
    (81, "UDP"): "serve-81-udp",
}


def ip_of(ns: str, pod: str) -> str:
    return f"100.96.{NAMESPACES.index(ns)}.{10 + PODS.index(pod)}"


def pod(ns: str, name: str, labels: dict[str, str] | None = None, node: str = "n1") -> dict:
    ports = [
        {"name": n, "containerPort": port, "protocol": proto}
        for (port, proto), n in PORT_NAMES.items()
    ]
    return {
        "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "labels": labels or {"pod": name}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": ports}]},
        "status": {"podIP": ip_of(ns, name), "phase": "Running"},
    }


def namespace(name: str, labels: dict[str, str] | None = None) -> dict:
    return {"kind": "Namespace", "metadata": {"name": name, "labels": labels or {"ns": name}}}


def netpol(ns: str, name: str, **spec: Any) -> dict:
    obj = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": ns, "name": name},
        "spec": spec,
    }
    return validate(obj)  # the model fills policyTypes and protocol defaults


def model(*extra: dict, order: int = 0) -> dict:
    objs = [namespace(n) for n in NAMESPACES] + [pod(n, p) for n in NAMESPACES for p in PODS]
    objs += list(extra)
    if order == 1:
        objs.reverse()
    elif order == 2:
        random.Random(7).shuffle(objs)
    out: dict = {}
    for o in objs:
        key = (o["metadata"].get("namespace", ""), o["metadata"]["name"])
        out.setdefault(o["kind"], {})[key] = o
    return out


def reach(res: dict, src: str, dst: str, port: int = 80, proto: str = "TCP") -> bool:
    """src egress and dst ingress both allow, as two nodes' datapaths would."""
    eps = P.compute(res, None)
    s_ns, s_pod = src.split("/")
    d_ns, d_pod = dst.split("/")
    s_ip, d_ip = ip_of(s_ns, s_pod), ip_of(d_ns, d_pod)
    ok = True
    if s_ip in eps:
        ok &= P.allows(eps[s_ip].egress, d_ip, proto, port)
    if d_ip in eps:
        ok &= P.allows(eps[d_ip].ingress, s_ip, proto, port)
    return ok


def matrix(res: dict, port: int = 80, proto: str = "TCP") -> dict[str, str]:
    names = [f"{n}/{p}" for n in NAMESPACES for p in PODS]
    return {
        f: "".join("." if f == t or reach(res, f, t, port, proto) else "X" for t in names)
        for f in names
    }


ALL_OK = {f"{n}/{p}": "........." for n in NAMESPACES for p in PODS}


@pytest.mark.parametrize("order", [0, 1, 2])
def test_no_policy_allows_all_in_any_order(order: int) -> None:
    assert matrix(model(order=order)) == ALL_OK
    assert P.compute(model(order=order), None) == {}


@pytest.mark.parametrize("order", [0, 1, 2])
def test_namespace_selector_and_port(order: int) -> None:
    pol = netpol(
        "x",
        "a-from-y",
        podSelector={"matchLabels": {"pod": "a"}},
        policyTypes=["Ingress"],
        ingress=[
            {
                "from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                "ports": [{"port": 80, "protocol": "TCP"}],
            }
        ],
    )
    res = model(pol, order=order)
    m80 = matrix(res, 80)
    assert m80["y/b"] == "........." and m80["z/c"][0] == "X" and m80["x/b"][0] == "X"
    assert all(row[0] == "X" for f, row in matrix(res, 81).items() if f != "x/a")
    assert all(row[0] == "X" for f, row in matrix(res, 80, "UDP").items() if f != "x/a")


def test_default_deny_ingress_and_empty_rule_allows_all() -> None:
    deny = netpol("x", "deny", podSelector={})
    m = matrix(model(deny))
    assert m["y/a"] == "XXX......" and m["x/a"] == ".XX......"
    allow = netpol("x", "allow", podSelector={}, ingress=[{}])
    assert matrix(model(deny, allow)) == ALL_OK


def test_policy_types_default_adds_egress_when_egress_rules_exist() -> None:
    pol = netpol(
        "x",
        "e",
        podSelector={"matchLabels": {"pod": "a"}},
        egress=[{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
    )
    assert pol["spec"]["policyTypes"] == ["Ingress", "Egress"]
    m = matrix(model(pol))
    assert m["x/a"] == "..X" + "XXXXXX"  # egress only to x/b (x/a is the diagonal)
    assert m["y/a"][0] == "X"  # ingress isolated with no rule


def test_pod_and_namespace_selector_in_one_peer_is_and() -> None:
    both = netpol(
        "x",
        "p",
        podSelector={"matchLabels": {"pod": "a"}},
        ingress=[
            {
                "from": [
                    {
                        "namespaceSelector": {"matchLabels": {"ns": "y"}},
                        "podSelector": {"matchLabels": {"pod": "b"}},
                    }
                ]
            }
        ],
    )
    col = [row[0] for row in matrix(model(both)).values()]
    assert "".join(col) == "." + "XX" + "X.X" + "XXX"
    two = netpol(
        "x",
        "p",
        podSelector={"matchLabels": {"pod": "a"}},
        ingress=[
            {
                "from": [
                    {"namespaceSelector": {"matchLabels": {"ns": "y"}}},
                    {"podSelector": {"matchLabels": {"pod": "b"}}},
                ]
            }
        ],
    )
    col = [row[0] for row in matrix(model(two)).values()]
    assert "".join(col) == ".." + "X" + "..." + "XXX"


def test_match_expressions() -> None:
    pol = netpol(
        "x",
        "p",
        podSelector={"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]}]},
        ingress=[
            {
                "from": [
                    {
                        "namespaceSelector": {
                            "matchExpressions": [
                                {"key": "ns", "operator": "NotIn", "values": ["y"]}
                            ]
                        }
                    }
                ]
            }
        ],
    )
    m = matrix(model(pol))
    assert m["y/c"][:3] == "XX." and m["z/c"][:3] == "..." and m["x/c"][:3] == "..."
    ex = netpol(
        "x", "p", podSelector={"matchExpressions": [{"key": "pod", "operator": "DoesNotExist"}]}
    )
    assert matrix(model(ex)) == ALL_OK  # selects nothing


def test_ip_block_with_except() -> None:
    pol = netpol(
        "x",
        "p",
        podSelector={"matchLabels": {"pod": "a"}},
        ingress=[
            {
                "from": [
                    {
                        "ipBlock": {
                            "cidr": "100.96.0.0/16",
                            "except": [f"{ip_of('y', 'b')}/32", "100.96.2.0/24"],
                        }
                    }
                ]
            }
        ],
    )
    col = "".join(row[0] for row in matrix(model(pol)).values())
    assert col == "..." + ".X." + "XXX"


def test_named_ports_resolved_per_destination_pod() -> None:
    # y/b serves serve-80-tcp on 8080 instead: a named rule follows it, a numbered one does not
    odd = pod("y", "b")
    odd["spec"]["containers"][0]["ports"][0]["containerPort"] = 8080
    egress = netpol(
        "x",
        "e",
        podSelector={"matchLabels": {"pod": "a"}},
        policyTypes=["Egress"],
        egress=[{"ports": [{"port": "serve-80-tcp"}]}],
    )
    res = model(egress)
    res["Pod"][("y", "b")] = odd
    eps = P.compute(res, None)
    a = eps[ip_of("x", "a")].egress
    assert P.allows(a, ip_of("y", "b"), "TCP", 8080)
    assert not P.allows(a, ip_of("y", "b"), "TCP", 80)
    assert P.allows(a, ip_of("y", "a"), "TCP", 80)
    assert not P.allows(a, "8.8.8.8", "TCP", 80)  # no pod: a name never matches
    ingress = netpol(
        "y",
        "i",
        podSelector={"matchLabels": {"pod": "b"}},
        ingress=[{"ports": [{"port": "serve-80-tcp"}]}],
    )
    res = model(ingress)
    res["Pod"][("y", "b")] = odd
    b = P.compute(res, None)[ip_of("y", "b")].ingress
    assert P.allows(b, "1.2.3.4", "TCP", 8080) and not P.allows(b, "1.2.3.4", "TCP", 80)
    assert not P.allows(b, "1.2.3.4", "UDP", 8080)


def test_end_port_and_protocol_only() -> None:
    pol = netpol(
        "x",
        "p",
        podSelector={},
        ingress=[{"ports": [{"port": 79, "endPort": 80, "protocol": "TCP"}, {"protocol": "UDP"}]}],
    )
    ep = P.compute(model(pol), None)[ip_of("x", "a")].ingress
    assert P.allows(ep, "1.1.1.1", "TCP", 80) and P.allows(ep, "1.1.1.1", "TCP", 79)
    assert not P.allows(ep, "1.1.1.1", "TCP", 81) and not P.allows(ep, "1.1.1.1", "TCP", 78)
    assert P.allows(ep, "1.1.1.1", "UDP", 12345)


def test_rules_union_with_overlapping_ports_and_peers() -> None:
    p1 = netpol(
        "x",
        "p1",
        podSelector={},
        ingress=[
            {
                "from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                "ports": [{"port": 1000, "endPort": 2000}],
            }
        ],
    )
    p2 = netpol(
        "x",
        "p2",
        podSelector={},
        ingress=[
            {
                "from": [{"ipBlock": {"cidr": "10.1.0.0/16"}}],
                "ports": [{"port": 1500, "endPort": 3000}],
            }
        ],
    )
    ep = P.compute(model(p1, p2), None)[ip_of("x", "a")].ingress
    assert P.allows(ep, "10.2.0.1", "TCP", 1000) and not P.allows(ep, "10.2.0.1", "TCP", 2500)
    assert P.allows(ep, "10.1.0.1", "TCP", 2500) and P.allows(ep, "10.1.0.1", "TCP", 1000)
    assert not P.allows(ep, "11.0.0.1", "TCP", 1500)


def test_sctp_is_noted() -> None:
    pol = netpol("x", "p", podSelector={}, ingress=[{"ports": [{"port": 80, "protocol": "SCTP"}]}])
    ep = P.compute(model(pol), None)[ip_of("x", "a")]
    assert any("SCTP" in n for n in ep.ingress.notes)


def test_only_local_pods_and_relabelling() -> None:
    pol = netpol("x", "p", podSelector={"matchLabels": {"pod": "a"}})
    res = model(pol)
    assert set(P.compute(res, "n1")) == {ip_of("x", "a")}
    assert P.compute(res, "n2") == {}
    res["Pod"][("x", "a")] = pod("x", "a", {"pod": "other"})
    assert P.compute(res, None) == {}
    ns_pol = netpol(
        "x",
        "q",
        podSelector={},
        ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}],
    )
    res = model(ns_pol)
    assert matrix(res)["y/a"][:3] == "XXX"
    res["Namespace"][("", "y")] = namespace("y", {"ns": "y", "team": "blue"})
    assert matrix(res)["y/a"][:3] == "..."


def test_port_prefixes_cover_exactly() -> None:
    for lo, hi in [(0, 65535), (1, 1), (79, 81), (1000, 2000), (65535, 65535), (3, 65534)]:
        covered = set()
        for value, plen in P.port_prefixes(lo, hi):
            size = 1 << (16 - plen)
            assert value % size == 0
            covered.update(range(value, value + size))
        assert covered == set(range(lo, hi + 1))


def test_results_do_not_depend_on_order() -> None:
    pols = [
        netpol("x", "a", podSelector={}, ingress=[{"from": [{"podSelector": {}}]}]),
        netpol(
            "x",
            "b",
            podSelector={"matchLabels": {"pod": "b"}},
            policyTypes=["Egress"],
            egress=[{"to": [{"ipBlock": {"cidr": "100.96.1.0/24"}}], "ports": [{"port": 81}]}],
        ),
    ]
    results = {
        repr(sorted(P.compute(model(*ps, order=o), None).items()))
        for ps in itertools.permutations(pols)
        for o in (0, 1, 2)
    }
    assert len(results) == 1


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]}]}, "cidr"),
        (
            {
                "ingress": [
                    {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}
                ]
            },
            "except",
        ),
        ({"ingress": [{"ports": [{"port": 80, "protocol": "ICMP"}]}]}, "protocol"),
        ({"ingress": [{"ports": [{"port": "a-very-long-port-name"}]}]}, "port"),
    ],
)
def test_bad_input_names_the_field(patch: dict, field: str) -> None:
    with pytest.raises(ValidationError) as e:
        netpol("x", "bad", podSelector={}, **patch)
    assert field in str(e.value)


def test_policy_types_defaulting_as_the_api_server() -> None:
    assert P.policy_types({"egress": []}) == ["Ingress"]
    assert P.policy_types({"policyTypes": [], "egress": [{}]}) == ["Ingress", "Egress"]
    assert P.policy_types({"policyTypes": ["Egress"]}) == ["Egress"]
    assert netpol("x", "e", podSelector={}, egress=[])["spec"]["policyTypes"] == ["Ingress"]
    # raw (unvalidated) objects too: an empty list is defaulted, so x is ingress-isolated
    raw = {
        "metadata": {"namespace": "x", "name": "r"},
        "spec": {"podSelector": {}, "policyTypes": []},
    }
    res = model()
    res["NetworkPolicy"] = {("x", "r"): raw}
    assert matrix(res)["y/a"] == "XXX......"

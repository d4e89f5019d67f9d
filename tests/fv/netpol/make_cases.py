"""Writes cases.json (tabby-accept-netpol/1): NetworkPolicy cases from the Kubernetes docs'
semantics, on the upstream e2e model. Each expectation is written by hand as a predicate over
(client, server), in the style of upstream's Reachability.Expect*: it states the documented
meaning of the policy, independently of tabby's calc. Run it after editing:
``.venv/bin/python tests/fv/netpol/make_cases.py`` (the JSON is what the harness reads).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

NS = ("x", "y", "z")
PODS = [f"{n}/{p}" for n in NS for p in ("a", "b", "c")]
Obj = dict[str, Any]
Allow = Callable[[str, str], bool]  # (client, server) -> may connect


def ns(pod: str) -> str:
    return pod.split("/")[0]


def name(pod: str) -> str:
    return pod.split("/")[1]


def pol(namespace: str, pname: str, **spec: Any) -> Obj:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": pname, "namespace": namespace},
        "spec": spec,
    }


def sel(**labels: str) -> Obj:
    return {"matchLabels": labels}


def expr(key: str, op: str, *values: str) -> Obj:
    req: Obj = {"key": key, "operator": op}
    if values:
        req["values"] = list(values)
    return {"matchExpressions": [req]}


def matrix(allow: Allow, pods: list[str] = PODS) -> Obj:
    return {
        "columns": list(pods),
        "rows": {f: "".join("." if f == t or allow(f, t) else "X" for t in pods) for f in pods},
    }


EVERYONE: Allow = lambda f, t: True  # noqa: E731


def probes(
    spec: dict[tuple[int, str], Allow], pods: list[str] = PODS, default: Allow = EVERYONE
) -> list[Obj]:
    """TCP/80, TCP/81, UDP/80, UDP/81 probes; unlisted (port, protocol) use ``default``."""
    out = []
    for port, proto in ((80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP")):
        allow = spec.get((port, proto), default)
        out.append({"port": port, "protocol": proto, "expected": matrix(allow, pods)})
    return out


def same(allow: Allow) -> dict[tuple[int, str], Allow]:
    return {(p, proto): allow for p in (80, 81) for proto in ("TCP", "UDP")}


def step(desc: str, actions: list[Obj], expect: list[Obj]) -> Obj:
    return {"description": desc, "actions": actions, "probes": expect}


def create(p: Obj) -> Obj:
    return {"op": "create_policy", "policy": p}


CASES: list[Obj] = []


def case(
    cid: str, title: str, tags: list[str], steps: list[Obj], requires: list[str] | None = None
) -> None:
    policies = [a["policy"] for s in steps for a in s["actions"] if a["op"] == "create_policy"]
    needs = list(requires or [])
    if "${" in json.dumps(steps):  # ipBlocks built from pod addresses
        needs.append("pod-ip-templates")
    CASES.append(
        {
            "id": cid,
            "name": title,
            "tags": tags,
            "requires": needs,
            "namespace_labels": {n: {"ns": n, "kubernetes.io/metadata.name": n} for n in NS},
            "pod_labels": {p: {"pod": name(p)} for p in PODS},
            "policies": policies,
            "steps": steps,
        }
    )


def single(
    cid: str,
    title: str,
    tags: list[str],
    policies: list[Obj],
    expect: list[Obj],
    requires: list[str] | None = None,
) -> None:
    case(cid, title, tags, [step(title, [create(p) for p in policies], expect)], requires)


# --- ingress basics ------------------------------------------------------------------------
not_into_x: Allow = lambda f, t: ns(t) != "x"  # noqa: E731
single(
    "deny-all-ingress-x",
    "default deny ingress in x",
    ["ingress", "default-deny"],
    [pol("x", "deny", podSelector={}, policyTypes=["Ingress"])],
    probes(same(not_into_x)),
)
single(
    "allow-all-ingress-x",
    "deny all, then an empty ingress rule allows all",
    ["ingress"],
    [
        pol("x", "deny", podSelector={}, policyTypes=["Ingress"]),
        pol("x", "allow", podSelector={}, ingress=[{}]),
    ],
    probes({}),
)
single(
    "ingress-same-namespace",
    "x admits only pods of x (podSelector {} in from)",
    ["ingress", "pod-selector", "empty-selector"],
    [pol("x", "same-ns", podSelector={}, ingress=[{"from": [{"podSelector": {}}]}])],
    probes(same(lambda f, t: ns(t) != "x" or ns(f) == "x")),
)
single(
    "ingress-from-namespace-y",
    "x/a admits namespace y",
    ["ingress", "namespace-selector"],
    [
        pol(
            "x",
            "a-from-y",
            podSelector=sel(pod="a"),
            ingress=[{"from": [{"namespaceSelector": sel(ns="y")}]}],
        )
    ],
    probes(same(lambda f, t: t != "x/a" or ns(f) == "y")),
)
single(
    "ingress-from-pod-b-same-ns",
    "x/a admits pod=b of its own namespace only",
    ["ingress", "pod-selector"],
    [
        pol(
            "x",
            "a-from-b",
            podSelector=sel(pod="a"),
            ingress=[{"from": [{"podSelector": sel(pod="b")}]}],
        )
    ],
    probes(same(lambda f, t: t != "x/a" or f == "x/b")),
)
single(
    "ingress-from-pod-b-any-ns",
    "x/a admits pod=b of every namespace",
    ["ingress", "pod-selector", "namespace-selector", "empty-selector"],
    [
        pol(
            "x",
            "a-from-any-b",
            podSelector=sel(pod="a"),
            ingress=[{"from": [{"namespaceSelector": {}, "podSelector": sel(pod="b")}]}],
        )
    ],
    probes(same(lambda f, t: t != "x/a" or name(f) == "b")),
)
single(
    "ingress-ns-and-pod-in-one-peer",
    "x/a admits pod b of namespace y (one peer: AND)",
    ["ingress", "pod-selector", "namespace-selector"],
    [
        pol(
            "x",
            "and",
            podSelector=sel(pod="a"),
            ingress=[{"from": [{"namespaceSelector": sel(ns="y"), "podSelector": sel(pod="b")}]}],
        )
    ],
    probes(same(lambda f, t: t != "x/a" or f == "y/b")),
)
single(
    "ingress-ns-or-pod-two-peers",
    "x/a admits namespace y, or pod b of x (two peers: OR)",
    ["ingress", "pod-selector", "namespace-selector"],
    [
        pol(
            "x",
            "or",
            podSelector=sel(pod="a"),
            ingress=[{"from": [{"namespaceSelector": sel(ns="y")}, {"podSelector": sel(pod="b")}]}],
        )
    ],
    probes(same(lambda f, t: t != "x/a" or ns(f) == "y" or f == "x/b")),
)
single(
    "ingress-ns-in",
    "x admits namespaces In (y, z)",
    ["ingress", "match-expressions"],
    [
        pol(
            "x",
            "in",
            podSelector={},
            ingress=[{"from": [{"namespaceSelector": expr("ns", "In", "y", "z")}]}],
        )
    ],
    probes(same(lambda f, t: ns(t) != "x" or ns(f) in ("y", "z"))),
)
single(
    "ingress-ns-notin",
    "x/b admits namespaces NotIn (x)",
    ["ingress", "match-expressions"],
    [
        pol(
            "x",
            "notin",
            podSelector=sel(pod="b"),
            ingress=[{"from": [{"namespaceSelector": expr("ns", "NotIn", "x")}]}],
        )
    ],
    probes(same(lambda f, t: t != "x/b" or ns(f) != "x")),
)
single(
    "ingress-pod-exists",
    "x/c admits pods with a label pod (Exists): all of x",
    ["ingress", "match-expressions"],
    [
        pol(
            "x",
            "exists",
            podSelector=sel(pod="c"),
            ingress=[{"from": [{"podSelector": expr("pod", "Exists")}]}],
        )
    ],
    probes(same(lambda f, t: t != "x/c" or ns(f) == "x")),
)
single(
    "ingress-pod-doesnotexist",
    "x/c admits pods without label pod: none",
    ["ingress", "match-expressions"],
    [
        pol(
            "x",
            "dne",
            podSelector=sel(pod="c"),
            ingress=[{"from": [{"podSelector": expr("pod", "DoesNotExist")}]}],
        )
    ],
    probes(same(lambda f, t: t != "x/c")),
)
single(
    "target-by-expression",
    "pods In (a, b) of y isolated, admitting namespace z",
    ["ingress", "match-expressions"],
    [
        pol(
            "y",
            "ab",
            podSelector=expr("pod", "In", "a", "b"),
            ingress=[{"from": [{"namespaceSelector": sel(ns="z")}]}],
        )
    ],
    probes(same(lambda f, t: t not in ("y/a", "y/b") or ns(f) == "z")),
)
single(
    "ingress-metadata-name",
    "y admits namespace z by kubernetes.io/metadata.name",
    ["ingress", "namespace-selector"],
    [
        pol(
            "y",
            "by-name",
            podSelector={},
            ingress=[
                {"from": [{"namespaceSelector": sel(**{"kubernetes.io/metadata.name": "z"})}]}
            ],
        )
    ],
    probes(same(lambda f, t: ns(t) != "y" or ns(f) == "z")),
)
single(
    "ingress-all-namespaces",
    "z admits every pod of every namespace (namespaceSelector {})",
    ["ingress", "namespace-selector", "empty-selector"],
    [pol("z", "all-pods", podSelector={}, ingress=[{"from": [{"namespaceSelector": {}}]}])],
    probes({}),
)

# --- ports ------------------------------------------------------------------------------------
x_a_closed: Allow = lambda f, t: t != "x/a"  # noqa: E731
single(
    "ingress-tcp-80",
    "x/a admits everyone on TCP 80 only",
    ["ingress", "port"],
    [pol("x", "tcp80", podSelector=sel(pod="a"), ingress=[{"ports": [{"port": 80}]}])],
    probes({(80, "TCP"): EVERYONE}, default=x_a_closed),
)
single(
    "ingress-named-tcp",
    "x/a admits everyone on port serve-81-tcp",
    ["ingress", "named-port"],
    [
        pol(
            "x",
            "named",
            podSelector=sel(pod="a"),
            ingress=[{"ports": [{"port": "serve-81-tcp", "protocol": "TCP"}]}],
        )
    ],
    probes({(81, "TCP"): EVERYONE}, default=x_a_closed),
)
single(
    "ingress-named-udp",
    "x/a admits everyone on port serve-80-udp (UDP)",
    ["ingress", "named-port", "udp"],
    [
        pol(
            "x",
            "named-udp",
            podSelector=sel(pod="a"),
            ingress=[{"ports": [{"port": "serve-80-udp", "protocol": "UDP"}]}],
        )
    ],
    probes({(80, "UDP"): EVERYONE}, default=x_a_closed),
)
single(
    "ingress-named-wrong-protocol",
    "serve-80-tcp asked as UDP matches nothing",
    ["ingress", "named-port"],
    [
        pol(
            "x",
            "named-mismatch",
            podSelector=sel(pod="a"),
            ingress=[{"ports": [{"port": "serve-80-tcp", "protocol": "UDP"}]}],
        )
    ],
    probes({}, default=x_a_closed),
)
single(
    "ingress-end-port",
    "x/a admits TCP 80-81 (endPort)",
    ["ingress", "end-port"],
    [
        pol(
            "x",
            "range",
            podSelector=sel(pod="a"),
            ingress=[{"ports": [{"port": 79, "endPort": 81, "protocol": "TCP"}]}],
        )
    ],
    probes({(80, "TCP"): EVERYONE, (81, "TCP"): EVERYONE}, default=x_a_closed),
)
single(
    "ingress-udp-any-port",
    "x/a admits UDP on any port (protocol without port)",
    ["ingress", "port", "udp"],
    [pol("x", "udp", podSelector=sel(pod="a"), ingress=[{"ports": [{"protocol": "UDP"}]}])],
    probes({(80, "UDP"): EVERYONE, (81, "UDP"): EVERYONE}, default=x_a_closed),
)
single(
    "ingress-port-and-peer",
    "x/a admits namespace y on TCP 81 and namespace z on UDP 80",
    ["ingress", "port", "namespace-selector"],
    [
        pol(
            "x",
            "mixed",
            podSelector=sel(pod="a"),
            ingress=[
                {"from": [{"namespaceSelector": sel(ns="y")}], "ports": [{"port": 81}]},
                {
                    "from": [{"namespaceSelector": sel(ns="z")}],
                    "ports": [{"port": 80, "protocol": "UDP"}],
                },
            ],
        )
    ],
    probes(
        {
            (81, "TCP"): lambda f, t: t != "x/a" or ns(f) == "y",
            (80, "UDP"): lambda f, t: t != "x/a" or ns(f) == "z",
        },
        default=x_a_closed,
    ),
)
single(
    "sctp-port",
    "x/a admits SCTP 80 only (cannot match on a kernel without SCTP)",
    ["ingress", "sctp"],
    [
        pol(
            "x",
            "sctp",
            podSelector=sel(pod="a"),
            ingress=[{"ports": [{"port": 80, "protocol": "SCTP"}]}],
        )
    ],
    probes({}, default=x_a_closed),
    requires=["sctp"],
)

# --- egress -----------------------------------------------------------------------------------
not_from_x: Allow = lambda f, t: ns(f) != "x"  # noqa: E731
single(
    "deny-all-egress-x",
    "default deny egress in x",
    ["egress", "default-deny"],
    [pol("x", "deny-out", podSelector={}, policyTypes=["Egress"])],
    probes(same(not_from_x)),
)
single(
    "allow-all-egress-x",
    "deny egress, then an empty egress rule allows all",
    ["egress"],
    [
        pol("x", "deny-out", podSelector={}, policyTypes=["Egress"]),
        pol("x", "allow-out", podSelector={}, policyTypes=["Egress"], egress=[{}]),
    ],
    probes({}),
)
single(
    "egress-to-namespace-y",
    "x/a may reach namespace y only",
    ["egress", "namespace-selector"],
    [
        pol(
            "x",
            "a-to-y",
            podSelector=sel(pod="a"),
            policyTypes=["Egress"],
            egress=[{"to": [{"namespaceSelector": sel(ns="y")}]}],
        )
    ],
    probes(same(lambda f, t: f != "x/a" or ns(t) == "y")),
)
single(
    "egress-named-port",
    "x/a may reach pod b of x on serve-80-tcp only",
    ["egress", "named-port", "pod-selector"],
    [
        pol(
            "x",
            "a-to-b-http",
            podSelector=sel(pod="a"),
            policyTypes=["Egress"],
            egress=[{"to": [{"podSelector": sel(pod="b")}], "ports": [{"port": "serve-80-tcp"}]}],
        )
    ],
    probes({(80, "TCP"): lambda f, t: f != "x/a" or t == "x/b"}, default=lambda f, t: f != "x/a"),
)
single(
    "egress-udp-80-anywhere",
    "x may send UDP 80 only",
    ["egress", "port", "udp"],
    [
        pol(
            "x",
            "udp-out",
            podSelector={},
            policyTypes=["Egress"],
            egress=[{"ports": [{"port": 80, "protocol": "UDP"}]}],
        )
    ],
    probes({(80, "UDP"): EVERYONE}, default=not_from_x),
)
single(
    "egress-end-port",
    "z/c may reach TCP 81-81 (endPort = port)",
    ["egress", "end-port"],
    [
        pol(
            "z",
            "c-81",
            podSelector=sel(pod="c"),
            policyTypes=["Egress"],
            egress=[{"ports": [{"port": 81, "endPort": 81}]}],
        )
    ],
    probes({(81, "TCP"): EVERYONE}, default=lambda f, t: f != "z/c"),
)
single(
    "egress-default-policy-types",
    "egress rules present: policyTypes default to both",
    ["egress", "ingress", "policy-types"],
    [
        pol(
            "y",
            "both",
            podSelector=sel(pod="a"),
            egress=[{"to": [{"namespaceSelector": sel(ns="z")}]}],
        )
    ],
    probes(same(lambda f, t: t != "y/a" and (f != "y/a" or ns(t) == "z"))),
)
single(
    "egress-only-ignores-ingress-rules",
    "policyTypes [Egress]: ingress rules are ignored",
    ["egress", "policy-types"],
    [
        pol(
            "y",
            "egress-only",
            podSelector=sel(pod="b"),
            policyTypes=["Egress"],
            ingress=[{"from": [{"podSelector": sel(pod="nobody")}]}],
            egress=[{}],
        )
    ],
    probes({}),
)
single(
    "ingress-and-egress-meet",
    "x/a may only send to y; y/b only admits x/a",
    ["egress", "ingress"],
    [
        pol(
            "x",
            "a-out",
            podSelector=sel(pod="a"),
            policyTypes=["Egress"],
            egress=[{"to": [{"namespaceSelector": sel(ns="y")}]}],
        ),
        pol(
            "y",
            "b-in",
            podSelector=sel(pod="b"),
            ingress=[{"from": [{"namespaceSelector": sel(ns="x"), "podSelector": sel(pod="a")}]}],
        ),
    ],
    probes(same(lambda f, t: (f != "x/a" or ns(t) == "y") and (t != "y/b" or f == "x/a"))),
)
single(
    "replies-pass-reverse-denied",
    "x/a admits y but may send nothing: y still gets replies",
    ["ingress", "egress", "conntrack"],
    [
        pol(
            "x",
            "a-in",
            podSelector=sel(pod="a"),
            ingress=[{"from": [{"namespaceSelector": sel(ns="y")}]}],
        ),
        pol("x", "a-out", podSelector=sel(pod="a"), policyTypes=["Egress"]),
    ],
    probes(same(lambda f, t: f != "x/a" and (t != "x/a" or ns(f) == "y"))),
)

# --- ipBlock ----------------------------------------------------------------------------------
single(
    "ingress-ipblock-one-pod",
    "x/a admits only y/b's address (ipBlock /32)",
    ["ingress", "ip-block"],
    [
        pol(
            "x",
            "one-ip",
            podSelector=sel(pod="a"),
            ingress=[{"from": [{"ipBlock": {"cidr": "${ip:y/b}/32"}}]}],
        )
    ],
    probes(same(lambda f, t: t != "x/a" or f == "y/b")),
)
single(
    "ingress-ipblock-except",
    "x/a admits the pods' network except y/b",
    ["ingress", "ip-block", "except"],
    [
        pol(
            "x",
            "all-but-yb",
            podSelector=sel(pod="a"),
            ingress=[{"from": [{"ipBlock": {"cidr": "${net:x/b/4}", "except": ["${ip:y/b}/32"]}}]}],
        )
    ],
    probes(same(lambda f, t: t != "x/a" or f != "y/b")),
)
single(
    "egress-ipblock-one-pod",
    "x/c may reach z/c's address only",
    ["egress", "ip-block"],
    [
        pol(
            "x",
            "to-zc",
            podSelector=sel(pod="c"),
            policyTypes=["Egress"],
            egress=[{"to": [{"ipBlock": {"cidr": "${ip:z/c}/32"}}]}],
        )
    ],
    probes(same(lambda f, t: f != "x/c" or t == "z/c")),
)
single(
    "egress-ipblock-except-port",
    "z/a may reach the pods' network but x/a, on TCP 80",
    ["egress", "ip-block", "except", "port"],
    [
        pol(
            "z",
            "net-80",
            podSelector=sel(pod="a"),
            policyTypes=["Egress"],
            egress=[
                {
                    "to": [{"ipBlock": {"cidr": "${net:x/a/4}", "except": ["${ip:x/a}/32"]}}],
                    "ports": [{"port": 80}],
                }
            ],
        )
    ],
    probes({(80, "TCP"): lambda f, t: f != "z/a" or t != "x/a"}, default=lambda f, t: f != "z/a"),
)
single(
    "ipblock-or-selector",
    "y/c admits y/a by address or namespace z by selector",
    ["ingress", "ip-block", "namespace-selector"],
    [
        pol(
            "y",
            "mix",
            podSelector=sel(pod="c"),
            ingress=[
                {
                    "from": [
                        {"ipBlock": {"cidr": "${ip:y/a}/32"}},
                        {"namespaceSelector": sel(ns="z")},
                    ]
                }
            ],
        )
    ],
    probes(same(lambda f, t: t != "y/c" or f == "y/a" or ns(f) == "z")),
)

# --- unions, updates, relabelling, pods and namespaces ----------------------------------------
single(
    "union-of-policies",
    "two policies on x/a: from y, and from z: both admitted",
    ["ingress", "union"],
    [
        pol(
            "x",
            "from-y",
            podSelector=sel(pod="a"),
            ingress=[{"from": [{"namespaceSelector": sel(ns="y")}]}],
        ),
        pol(
            "x",
            "from-z",
            podSelector=sel(pod="a"),
            ingress=[{"from": [{"namespaceSelector": sel(ns="z")}]}],
        ),
    ],
    probes(same(lambda f, t: t != "x/a" or ns(f) != "x")),
)
single(
    "deny-everything",
    "default deny ingress and egress in every namespace",
    ["ingress", "egress", "default-deny"],
    [pol(n, "deny", podSelector={}, policyTypes=["Ingress", "Egress"]) for n in NS],
    probes(same(lambda f, t: False)),
)
from_y = pol(
    "x",
    "a-from",
    podSelector=sel(pod="a"),
    ingress=[{"from": [{"namespaceSelector": sel(ns="y")}]}],
)
from_z = pol(
    "x",
    "a-from",
    podSelector=sel(pod="a"),
    ingress=[{"from": [{"namespaceSelector": sel(ns="z")}]}],
)
case(
    "update-policy",
    "x/a admits y, then the same policy updated to admit z",
    ["ingress", "update"],
    [
        step("admits y", [create(from_y)], probes(same(lambda f, t: t != "x/a" or ns(f) == "y"))),
        step(
            "updated: admits z",
            [{"op": "update_policy", "policy": from_z}],
            probes(same(lambda f, t: t != "x/a" or ns(f) == "z")),
        ),
    ],
)
case(
    "delete-policy",
    "deny into x, then the policy is deleted",
    ["ingress", "delete"],
    [
        step("deny into x", [create(pol("x", "deny", podSelector={}))], probes(same(not_into_x))),
        step("deleted", [{"op": "delete_policy", "namespace": "x", "name": "deny"}], probes({})),
    ],
)
case(
    "delete-all-policies",
    "deny into x and y, then every policy deleted",
    ["delete"],
    [
        step(
            "deny into x and y",
            [create(pol("x", "deny", podSelector={})), create(pol("y", "deny", podSelector={}))],
            probes(same(lambda f, t: ns(t) == "z")),
        ),
        step("all deleted", [{"op": "delete_all_policies"}], probes({})),
    ],
)
case(
    "relabel-namespace",
    "x admits team=blue namespaces; y gets the label",
    ["ingress", "namespace-selector", "relabel"],
    [
        step(
            "no namespace is blue",
            [
                create(
                    pol(
                        "x",
                        "blue",
                        podSelector={},
                        ingress=[{"from": [{"namespaceSelector": sel(team="blue")}]}],
                    )
                )
            ],
            probes(same(not_into_x)),
        ),
        step(
            "y labelled team=blue",
            [
                {
                    "op": "set_namespace_labels",
                    "namespace": "y",
                    "labels": {"ns": "y", "kubernetes.io/metadata.name": "y", "team": "blue"},
                }
            ],
            probes(same(lambda f, t: ns(t) != "x" or ns(f) == "y")),
        ),
    ],
)
case(
    "relabel-client-pod",
    "x/a admits role=client pods of x; x/c gets the label",
    ["ingress", "pod-selector", "relabel"],
    [
        step(
            "no client",
            [
                create(
                    pol(
                        "x",
                        "clients",
                        podSelector=sel(pod="a"),
                        ingress=[{"from": [{"podSelector": sel(role="client")}]}],
                    )
                )
            ],
            probes(same(x_a_closed)),
        ),
        step(
            "x/c labelled role=client",
            [{"op": "set_pod_labels", "pod": "x/c", "labels": {"pod": "c", "role": "client"}}],
            probes(same(lambda f, t: t != "x/a" or f == "x/c")),
        ),
    ],
)
case(
    "relabel-target-pod",
    "deny for role=locked pods; y/b gets the label, then loses it",
    ["ingress", "relabel"],
    [
        step(
            "nobody locked",
            [create(pol("y", "locked", podSelector=sel(role="locked")))],
            probes({}),
        ),
        step(
            "y/b locked",
            [{"op": "set_pod_labels", "pod": "y/b", "labels": {"pod": "b", "role": "locked"}}],
            probes(same(lambda f, t: t != "y/b")),
        ),
        step(
            "y/b unlocked",
            [{"op": "set_pod_labels", "pod": "y/b", "labels": {"pod": "b"}}],
            probes({}),
        ),
    ],
)
with_d = PODS + ["x/d"]
case(
    "create-pod",
    "x/a admits pod=d; a new pod x/d is created and admitted",
    ["ingress", "pod-selector", "create-pod"],
    [
        step(
            "only d may reach x/a",
            [
                create(
                    pol(
                        "x",
                        "from-d",
                        podSelector=sel(pod="a"),
                        ingress=[{"from": [{"podSelector": sel(pod="d")}]}],
                    )
                )
            ],
            probes(same(x_a_closed)),
        ),
        step(
            "x/d created",
            [{"op": "create_pod", "pod": "x/d", "labels": {"pod": "d"}}],
            probes(same(lambda f, t: t != "x/a" or f == "x/d"), with_d),
        ),
    ],
)
without_yc = [p for p in PODS if p != "y/c"]
case(
    "delete-pod",
    "y/a admits y/c; y/c is deleted and comes back",
    ["ingress", "delete-pod"],
    [
        step(
            "y/a admits y/c",
            [
                create(
                    pol(
                        "y",
                        "from-c",
                        podSelector=sel(pod="a"),
                        ingress=[{"from": [{"podSelector": sel(pod="c")}]}],
                    )
                )
            ],
            probes(same(lambda f, t: t != "y/a" or f == "y/c")),
        ),
        step(
            "y/c deleted",
            [{"op": "delete_pod", "pod": "y/c"}],
            probes(same(lambda f, t: t != "y/a"), without_yc),
        ),
        step(
            "y/c created again",
            [{"op": "create_pod", "pod": "y/c", "labels": {"pod": "c"}}],
            probes(same(lambda f, t: t != "y/a" or f == "y/c")),
        ),
    ],
)
with_w = PODS + ["w/a"]
case(
    "create-namespace",
    "x admits namespace w; w and a pod in it are created",
    ["ingress", "namespace-selector", "create-namespace"],
    [
        step(
            "x admits ns=w",
            [
                create(
                    pol(
                        "x",
                        "from-w",
                        podSelector={},
                        ingress=[{"from": [{"namespaceSelector": sel(ns="w")}]}],
                    )
                )
            ],
            probes(same(not_into_x)),
        ),
        step(
            "namespace w and w/a created",
            [
                {
                    "op": "create_namespace",
                    "namespace": "w",
                    "labels": {"ns": "w", "kubernetes.io/metadata.name": "w"},
                },
                {"op": "create_pod", "pod": "w/a", "labels": {"pod": "a"}},
            ],
            probes(same(lambda f, t: ns(t) != "x" or f == "w/a"), with_w),
        ),
    ],
)


def main() -> None:
    out = Path(__file__).with_name("cases.json")
    doc = {
        "format": "tabby-accept-netpol/1",
        "model": {
            "namespaces": list(NS),
            "pods": ["a", "b", "c"],
            "ports": [80, 81],
            "protocols": ["TCP", "UDP"],
        },
        "cases": CASES,
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{len(CASES)} cases -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

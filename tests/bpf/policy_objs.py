"""The NetworkPolicy tests' cluster, shared by test_policy.py (IPv4) and test_policy6.py (dual
stack): pods x/server and x/client on this node (n1), y/remote on another, namespaces x and y,
policies in x; indexed as calc.policy.compute reads them."""

from __future__ import annotations

from typing import Any

from scapy.all import TCP

from tabby.calc import policy as calc
from tabby.model.validate import validate

Obj = dict[str, Any]


def pod(ns: str, name: str, node: str, labels: dict[str, str], ip4: str, ip6: str = "") -> Obj:
    """A running pod with an http port 8080; ``ip6``: dual-stack (IPv6-only when ``ip4`` is
    empty)."""
    ips = [ip for ip in (ip4, ip6) if ip]
    status: Obj = {"podIP": ips[0], "phase": "Running"}
    if ip6:
        status["podIPs"] = [{"ip": ip} for ip in ips]
    return {
        "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}],
        },
        "status": status,
    }


def netpol(name: str, **spec: Any) -> Obj:
    return validate(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"namespace": "x", "name": name},
            "spec": spec,
        }
    )


def rules(pods: list[Obj], policies: tuple[Obj, ...]) -> dict[str, calc.EndpointPolicy]:
    """n1's policy state for ``pods`` and ``policies`` in namespaces x and y."""
    objs = [
        *pods,
        {"kind": "Namespace", "metadata": {"name": "x", "labels": {"ns": "x"}}},
        {"kind": "Namespace", "metadata": {"name": "y", "labels": {"ns": "y"}}},
        *policies,
    ]
    res: dict[str, dict[tuple[str, str], Any]] = {}
    for o in objs:
        key = (o["metadata"].get("namespace", ""), o["metadata"]["name"])
        res.setdefault(o["kind"], {})[key] = o
    return calc.compute(res, "n1")


def syn(sport: int, dport: int) -> TCP:
    return TCP(sport=sport, dport=dport, flags="S")


SERVER_FROM_CLIENT_8080 = netpol(
    "server-from-client",
    podSelector={"matchLabels": {"app": "server"}},
    ingress=[
        {
            "from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
            "ports": [{"port": 8080, "protocol": "TCP"}],
        }
    ],
)

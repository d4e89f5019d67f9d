"""networking.k8s.io/v1 NetworkPolicy."""

from __future__ import annotations

import ipaddress
from typing import Any

from tabby.model.core import resource
from tabby.model.errors import FieldError
from tabby.model.meta import label_selector
from tabby.model.schema import Struct, at, cidr, enum, int_or_name, item, list_of, port, protocol


def _ip_block_rules(block: dict[str, Any], path: str) -> dict[str, Any]:
    net = ipaddress.ip_network(block["cidr"])
    for i, exc in enumerate(block.get("except", [])):
        sub = ipaddress.ip_network(exc)
        if sub.version != net.version or not sub.subnet_of(net):  # type: ignore[arg-type]
            raise FieldError(item(at(path, "except"), i), f"{exc} is not inside {net}")
    return block


def _peer_rules(peer: dict[str, Any], path: str) -> dict[str, Any]:
    if not peer:
        raise FieldError(path, "needs podSelector, namespaceSelector or ipBlock")
    if "ipBlock" in peer and len(peer) > 1:
        raise FieldError(at(path, "ipBlock"), "cannot be combined with a selector")
    return peer


_peer = Struct(
    {
        "podSelector": label_selector,
        "namespaceSelector": label_selector,
        "ipBlock": Struct(
            {"cidr": cidr, "except": list_of(cidr)}, required=("cidr",), post=_ip_block_rules
        ),
    },
    post=_peer_rules,
)


def _port_rules(p: dict[str, Any], path: str) -> dict[str, Any]:
    if "endPort" in p:
        if not isinstance(p.get("port"), int):
            raise FieldError(at(path, "endPort"), "needs a numeric port")
        if p["endPort"] < p["port"]:
            raise FieldError(at(path, "endPort"), "must be >= port")
    return p


_ports = list_of(
    Struct(
        {"protocol": protocol, "port": int_or_name, "endPort": port},
        defaults={"protocol": "TCP"},
        post=_port_rules,
    )
)


def _default_policy_types(spec: dict[str, Any]) -> list[str]:
    """The API server's defaulting: Ingress, plus Egress when there is at least one egress rule
    (an empty ``egress: []`` adds nothing)."""
    return ["Ingress", "Egress"] if spec.get("egress") else ["Ingress"]


_spec = Struct(
    {
        "podSelector": label_selector,
        "policyTypes": list_of(enum("Ingress", "Egress")),
        "ingress": list_of(Struct({"from": list_of(_peer), "ports": _ports})),
        "egress": list_of(Struct({"to": list_of(_peer), "ports": _ports})),
    },
    defaults={"podSelector": {}, "policyTypes": _default_policy_types},
)

network_policy = resource(spec=_spec).extend({}, required=("metadata", "spec"))

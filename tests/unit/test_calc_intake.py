"""What the agent keeps of Pods, Nodes and IPAM blocks (calc/intake.py): calc's whole output is
the same on the kept objects as on the objects a kube-apiserver serves, a fraction of the size.

A reader of a Pod or Node field that intake drops makes the comparisons below fail: the cluster
here exercises every reader (this node's endpoints and routes, dual-stack addresses, hostNetwork
and finished pods, NetworkPolicy selectors and named ports, DSR's subnet warning, BGP peers by
selector, AS numbers and route reflectors)."""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import pytest

from tabby.calc import bird, names
from tabby.calc.intake import kept
from tabby.calc.nodestate import compute
from tabby.lab import apishapes
from tabby.model.validate import validate

Obj = dict[str, Any]
ADDR = "projectcalico.org/IPv4Address"


def _nodes() -> list[Obj]:
    return [
        apishapes.node("n1", "172.20.32.11", {"route-reflector": "true"},
                       {ADDR: "172.20.32.11/19", "projectcalico.org/ASNumber": "64600",
                        "projectcalico.org/RouteReflectorClusterID": "224.0.0.1"}),
        apishapes.node("n2", "172.20.32.12", {}, {ADDR: "172.20.32.12/19"}),
        apishapes.node("n3", "172.20.64.13", {"rack": "b"}, {ADDR: "172.20.64.13/19"}),
        # no Calico annotation: its address is its status's InternalIP
        apishapes.node("n4", "172.20.32.14", {"route-reflector": "true"}, {}),
    ]  # fmt: skip


def _pods() -> list[Obj]:
    http = [{"name": "http", "containerPort": 8080}, {"name": "dns", "containerPort": 53,
                                                      "protocol": "UDP"}]  # fmt: skip
    pods = [
        apishapes.pod("default", "web-0", "n1", "100.96.0.10", {"app": "web"}, http),
        apishapes.pod("default", "web-1", "n2", "100.96.0.74", {"app": "web"}, http),
        apishapes.pod("default", "dual-0", "n1", "100.96.0.11", {"app": "dual"},
                      ip6="fd00:96::11"),
        apishapes.pod("prod", "client-0", "n1", "100.96.0.12", {"app": "client"}, []),
        apishapes.pod("prod", "client-1", "n3", "100.96.1.10", {"app": "client"}, []),
        apishapes.pod("default", "done-0", "n1", "100.96.0.13", {"app": "web"}, http),
        apishapes.pod("kube-system", "hostnet-0", "n1", "172.20.32.11", {"app": "web"}, http),
    ]  # fmt: skip
    pods[5]["status"]["phase"] = "Succeeded"
    pods[6]["spec"]["hostNetwork"] = True
    return pods


def _block(cidr: str, node: str, base: int) -> Obj:
    """A block full of pods, its first address the node's tunnel address (as IPAM leaves it)."""
    net = cidr.rsplit(".", 1)[0]
    pods = {f"{net}.{base + i}": f"pod-default-p{base + i}" for i in range(1, 60)}
    return {"cidr": cidr, "affinity": f"host:{node}",
            "allocations": {f"{net}.{base}": names.tunnel_handle(node), **pods}}  # fmt: skip


def _others() -> list[Obj]:
    def obj(kind: str, name: str, spec: Obj, ns: str = "", **meta: Any) -> Obj:
        md = {"name": name, **({"namespace": ns} if ns else {}), **meta}
        return {"kind": kind, "metadata": md, "spec": spec}

    policy = validate(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"namespace": "default", "name": "web"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [
                    {
                        "from": [
                            {
                                "namespaceSelector": {"matchLabels": {"env": "prod"}},
                                "podSelector": {"matchLabels": {"app": "client"}},
                            }
                        ],
                        "ports": [{"port": "http"}, {"port": "dns", "protocol": "UDP"}],
                    }
                ],
                "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "dual"}}}]}],
            },
        }
    )
    return [
        policy,
        {"kind": "Namespace", "metadata": {"name": "default", "labels": {"env": "dev"}}},
        {"kind": "Namespace", "metadata": {"name": "prod", "labels": {"env": "prod"}}},
        obj("FelixConfiguration", "default", {"bpfExternalServiceMode": "DSR"}),
        obj(
            "IPPool",
            "default",
            {"cidr": "100.96.0.0/16", "blockSize": 26, "vxlanMode": "CrossSubnet"},
        ),  # fmt: skip
        obj("IPAMBlock", "100-96-0-0-26", _block("100.96.0.0/26", "n1", 0)),
        obj("IPAMBlock", "100-96-0-64-26", _block("100.96.0.64/26", "n2", 64)),
        obj("IPAMBlock", "100-96-1-0-26", _block("100.96.1.0/26", "n3", 256)),
        obj("BGPConfiguration", "default", {"nodeToNodeMeshEnabled": False}),
        obj("BGPPeer", "to-rr", {"peerSelector": "route-reflector == 'true'"}),
        obj(
            "BGPPeer",
            "rack-b",
            {"nodeSelector": "rack == 'b'", "peerIP": "172.20.64.1", "asNumber": 64700},
        ),  # fmt: skip
    ]


def _resources(objs: list[Obj], keep: bool) -> dict[str, dict[tuple[str, str], Obj]]:
    """The agent's resources dict of ``objs``, whole or as intake keeps them."""
    out: dict[str, dict[tuple[str, str], Obj]] = {}
    for o in objs:
        key = (o["metadata"].get("namespace", ""), o["metadata"]["name"])
        out.setdefault(o["kind"], {})[key] = kept(o["kind"], o) if keep else o
    return out


CLUSTER = _nodes() + _pods() + _others()


@pytest.mark.parametrize("node", ["n1", "n2", "n3", "n4"])
def test_calc_says_the_same_of_kept_and_whole_objects(node: str) -> None:
    whole, slim = _resources(CLUSTER, keep=False), _resources(CLUSTER, keep=True)
    for bgp in (False, True):
        state = compute(whole, node, bgp=bgp)
        assert compute(slim, node, bgp=bgp) == state
    if node == "n1":  # the cluster does exercise the readers
        local = {e.name for e in state.endpoints.values()}
        assert local == {"web-0", "dual-0", "client-0", "done-0"}  # not hostnet-0
        assert state.policies and state.warnings  # web-0 isolated; DSR across subnets
        assert state.tunnel_ip == "100.96.0.0"  # from its block's allocations
    whole_bird, slim_bird = bird.render(whole, node), bird.render(slim, node)
    assert whole_bird is not None and slim_bird is not None
    assert slim_bird.text == whole_bird.text and slim_bird.warnings == whole_bird.warnings


def test_kept_objects_are_a_fraction_of_the_whole_ones() -> None:
    def decoded_bytes(objs: list[Obj]) -> int:
        text = [json.dumps(o) for o in objs]
        tracemalloc.start()
        try:
            held = [json.loads(t) for t in text]
            size = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        assert len(held) == len(objs)
        return size

    pods = [
        apishapes.pod("default", f"web-{i}", "n1", f"100.96.{i // 200}.{i % 200}", {"app": "web"})
        for i in range(200)
    ]
    whole, slim = decoded_bytes(pods), decoded_bytes([kept("Pod", p) for p in pods])
    assert whole / len(pods) > 20_000  # ~32 KB each, what the agent used to hold per pod
    assert slim * 6 < whole
    nodes = _nodes()
    assert decoded_bytes([kept("Node", n) for n in nodes]) * 8 < decoded_bytes(nodes)
    blocks = [o for o in _others() if o["kind"] == "IPAMBlock"]
    assert decoded_bytes([kept("IPAMBlock", b) for b in blocks]) * 8 < decoded_bytes(blocks)


def test_kept_leaves_other_kinds_and_the_input_alone() -> None:
    pod = _pods()[0]
    before = json.dumps(pod, sort_keys=True)
    slim = kept("Pod", pod)
    assert json.dumps(pod, sort_keys=True) == before, "the watched object is not changed"
    assert slim["spec"]["containers"] == [
        {"ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                   {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}
    ]  # fmt: skip
    assert "managedFields" not in slim["metadata"] and "containerStatuses" not in slim["status"]
    ns = _others()[1]
    assert kept("Namespace", ns) is ns
    block = next(o for o in _others() if o["kind"] == "IPAMBlock")
    assert kept("IPAMBlock", block)["spec"]["allocations"] == {"100.96.0.0": "vxlan-tunnel-addr-n1"}
    assert len(block["spec"]["allocations"]) == 60

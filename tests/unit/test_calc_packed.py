"""Packed resources (calc.packed) and the streamed list the agent feeds its service index with.

What the index computes from a packed Service and its slices must be what it computes from the
decoded objects, for every field calc reads; the packed form drops only metadata calc never
reads, and is several times smaller.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tabby.calc.packed import LAST_APPLIED, pack, unpack
from tabby.calc.services import ServiceIndex, service_nat
from tabby.datastore.api import StreamingList
from tabby.datastore.embedded import EmbeddedDatastore

NODE = "node1"


def _meta(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": "shop",
        "uid": "9dec5adf-20cf-46b4-9b63-439c93510056",
        "resourceVersion": "20021",
        "creationTimestamp": "2026-12-07T08:09:49Z",
        "managedFields": [{"manager": "kubectl", "operation": "Apply", "fieldsV1": {"f:spec": {}}}],
        **extra,
    }


def _service() -> dict[str, Any]:
    """A Service using every field calc.services reads."""
    body = {"spec": {"type": "LoadBalancer"}, "metadata": {"name": "web"}}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(
            "web",
            labels={"app": "web"},
            annotations={LAST_APPLIED: json.dumps(body) * 20, "team": "shop"},
        ),
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": "100.64.0.20",
            "clusterIPs": ["100.64.0.20"],
            "externalIPs": ["198.51.100.9"],
            "externalTrafficPolicy": "Local",
            "internalTrafficPolicy": "Cluster",
            "healthCheckNodePort": 31999,
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
            "loadBalancerSourceRanges": ["203.0.113.0/24"],
            "ports": [
                {
                    "name": "http",
                    "port": 80,
                    "targetPort": 8080,
                    "protocol": "TCP",
                    "nodePort": 30080,
                },
                {
                    "name": "dns",
                    "port": 53,
                    "targetPort": 5353,
                    "protocol": "UDP",
                    "nodePort": 30053,
                },
            ],
        },
        "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7", "ipMode": "VIP"}]}},
    }


def _slice(name: str, node: str, ready: bool) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": _meta(name, labels={"kubernetes.io/service-name": "web"}),
        "addressType": "IPv4",
        "ports": [
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "dns", "port": 5353, "protocol": "UDP"},
        ],
        "endpoints": [
            {
                "addresses": [f"100.96.{i}.{10 + int(ready)}"],
                "conditions": {"ready": ready, "serving": True, "terminating": not ready},
                "nodeName": node if i else "node2",
            }
            for i in range(3)
        ],
    }


def test_packed_objects_give_the_same_nat_and_drop_only_unread_metadata() -> None:
    svc = _service()
    slices = [_slice("web-a", NODE, True), _slice("web-b", NODE, False)]
    want = service_nat(svc, slices, NODE, "172.20.32.11")
    assert want.frontends and want.health_check_port == 31999  # a rich case, not an empty one
    got = service_nat(unpack(pack(svc)), [unpack(pack(s)) for s in slices], NODE, "172.20.32.11")
    assert got == want
    back = unpack(pack(svc))
    assert back["metadata"] == {
        "name": "web",
        "namespace": "shop",
        "labels": {"app": "web"},
        "annotations": {"team": "shop"},
    }
    assert back["spec"] == svc["spec"] and back["status"] == svc["status"]
    assert "apiVersion" not in back and "kind" not in back
    # the last-applied copy and managed fields are gone: a fraction of the object's own JSON
    assert len(pack(svc)) * 4 < len(json.dumps(svc))


def test_the_index_recomputes_from_packed_objects() -> None:
    index = ServiceIndex(NODE)
    index.set_node_ip("172.20.32.11")
    svc = _service()
    index.on_service(("shop", "web"), svc)
    index.on_slice(("shop", "web-a"), _slice("web-a", NODE, True))
    first = index.results()["shop/web"]
    # a new index (a relist) cannot name what an older one had: everything is to be compared
    assert index.changed is None
    svc["spec"]["ports"] = []  # the caller's object is not what the index holds
    index.on_slice(("shop", "web-b"), _slice("web-b", NODE, False))
    second = index.results()["shop/web"]
    assert index.changed == {"shop/web"}
    assert second.frontends == first.frontends
    assert second == service_nat(
        _service(),
        [_slice("web-a", NODE, True), _slice("web-b", NODE, False)],
        NODE,
        "172.20.32.11",
    )


def test_embedded_iter_list_streams_what_list_returns(tmp_path: Path) -> None:
    ds = EmbeddedDatastore(tmp_path / "s.db")
    try:
        objs = []
        for i in range(2500):  # more than one fetch batch
            objs.append(
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": f"s{i:04d}",
                        "namespace": "ns" if i % 2 else "default",
                        "labels": {"kubernetes.io/service-name": f"svc{i}"},
                    },
                    "addressType": "IPv4",
                    "endpoints": [{"addresses": [f"100.96.{i // 250}.{i % 250}"]}],
                }
            )
        ds.apply(objs)
        assert isinstance(ds, StreamingList)
        listed, _ = ds.list("EndpointSlice")
        assert list(ds.iter_list("EndpointSlice")) == listed and len(listed) == 2500
        assert list(ds.iter_list("Service")) == []
    finally:
        ds.close()

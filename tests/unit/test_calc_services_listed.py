"""Services computed while a relist streams them (ServiceIndex.compute_listed).

The agent lists the EndpointSlices before the Services and computes each Service as it is
listed: what the index then holds must be exactly what computing everything after the list
gives, whatever the order the objects came in (a slice after its Service, a slice of another
service moving, a Service without slices, one kube-proxy leaves alone), and a slice recorded
after its Service was computed must be seen by the next results().
"""

from __future__ import annotations

import itertools
from typing import Any

from tabby.calc.services import ServiceIndex

NODE = "node1"
NODE_IP = "172.20.32.2"


def _service(name: str, ip: str, **spec: Any) -> dict[str, Any]:
    ports = [{"name": "http", "port": 80, "protocol": "TCP"}]
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": ports, **spec},
    }


def _slice(name: str, service: str, addrs: list[str], node: str = "node2") -> dict[str, Any]:
    return {
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [a], "nodeName": node} for a in addrs],
    }


def _objects() -> list[dict[str, Any]]:
    return [
        _service("web", "100.64.0.10"),
        _slice("web-a", "web", ["100.96.1.2", "100.96.1.3"]),
        _slice("web-b", "web", ["100.96.1.4"], node=NODE),  # a second slice, local endpoint
        _service(
            "api",
            "100.64.0.11",
            type="NodePort",
            externalTrafficPolicy="Local",
            healthCheckNodePort=32000,
            ports=[{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}],
        ),
        _slice("api-a", "api", ["100.96.1.5"], node=NODE),
        _service("empty", "100.64.0.12"),  # no slice: rejects
        _service("headless", "None"),  # left alone
        _slice("headless-a", "headless", ["100.96.1.6"]),
        _slice("orphan-a", "gone", ["100.96.1.7"]),  # its Service is not listed
    ]


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["metadata"]["namespace"], obj["metadata"]["name"]


def _relisted(objs: list[dict[str, Any]]) -> ServiceIndex:
    """What the agent's relist does: each Service computed as it comes."""
    index = ServiceIndex(NODE)
    index.set_node_ip(NODE_IP)
    for obj in objs:
        if obj["kind"] == "Service":
            index.on_service(_key(obj), obj)
            index.compute_listed(_key(obj), obj)
        else:
            index.on_slice(_key(obj), obj)
    return index


def _after_the_list(objs: list[dict[str, Any]]) -> ServiceIndex:
    index = ServiceIndex(NODE)
    index.set_node_ip(NODE_IP)
    for obj in objs:
        (index.on_service if obj["kind"] == "Service" else index.on_slice)(_key(obj), obj)
    return index


def test_computed_while_listed_equals_computed_after_the_list_in_any_order() -> None:
    objs = _objects()
    reference = _after_the_list(objs)
    expected = reference.results()
    assert set(expected) == {"shop/web", "shop/api", "shop/empty"}
    assert len(expected["shop/web"].backend_sets["shop/web:http/TCP:cluster"]) == 3
    assert reference.health_checks == {"shop/api": (32000, 1)}
    # slices first (the agent's order), services first, and some mixed orders
    orders = [
        sorted(objs, key=lambda o: o["kind"] == "Service"),
        sorted(objs, key=lambda o: o["kind"] != "Service"),
        *itertools.islice(itertools.permutations(objs), 0, 5040, 97),
    ]
    for order in orders:
        index = _relisted(list(order))
        got = index.results()
        assert got == expected, [o["metadata"]["name"] for o in order]
        assert (index.health_checks, index.warnings) == (
            reference.health_checks,
            reference.warnings,
        )
        assert index.changed is None  # a new index: NAT compares everything


def test_the_first_results_has_nothing_left_to_compute_after_a_slices_first_list() -> None:
    objs = sorted(_objects(), key=lambda o: o["kind"] == "Service")
    index = _relisted(objs)
    # every listed Service was computed while listed; left: the orphan slice's missing owner
    assert index._dirty == {("shop", "gone")}
    first = index.results()
    assert index.results() == first and index.changed == frozenset()


def test_a_slice_after_its_service_was_computed_is_seen_by_the_next_results() -> None:
    index = _relisted([_slice("web-a", "web", ["100.96.1.2"]), _service("web", "100.64.0.10")])
    early = index._results["shop/web"]  # computed when the Service was listed
    assert early.backend_sets["shop/web:http/TCP:cluster"] == (("100.96.1.2", 8080),)
    # a second slice and a change to the first, after the Service was computed
    index.on_slice(("shop", "web-b"), _slice("web-b", "web", ["100.96.1.9"]))
    index.on_slice(("shop", "web-a"), _slice("web-a", "web", ["100.96.1.3"]))
    got = index.results()["shop/web"]
    assert got.backend_sets["shop/web:http/TCP:cluster"] == (
        ("100.96.1.3", 8080),
        ("100.96.1.9", 8080),
    )
    assert got is not early
    # and later changes name it, as ever
    index.on_slice(("shop", "web-b"), None)
    assert index.results()["shop/web"].backend_sets["shop/web:http/TCP:cluster"] == (
        ("100.96.1.3", 8080),
    )
    assert index.changed == {"shop/web"}


def test_listed_services_are_named_as_changed_on_an_index_already_used() -> None:
    index = _relisted([_slice("web-a", "web", ["100.96.1.2"]), _service("web", "100.64.0.10")])
    index.results()
    svc = _service("web", "100.64.0.20")
    index.on_service(("shop", "web"), svc)
    index.compute_listed(("shop", "web"), svc)
    got = index.results()
    assert index.changed == {"shop/web"}
    assert got["shop/web"].frontends[0].addr == "100.64.0.20"


def test_results_is_a_snapshot_taken_without_copying_and_kept_by_later_changes() -> None:
    """The agent hands results() to the dataplane thread at every change: it is taken in O(1)
    (the same object while nothing changed, not a copy of every service's entry) and a later
    change leaves a snapshot already handed over as it was."""
    index = _relisted([_slice("web-a", "web", ["100.96.1.2"]), _service("web", "100.64.0.10")])
    before = index.results()
    assert index.results() is before
    index.on_slice(("shop", "web-a"), _slice("web-a", "web", ["100.96.1.3"]))
    index.on_service(("shop", "api"), _service("api", "100.64.0.11"))
    after = index.results()
    cluster = "shop/web:http/TCP:cluster"
    assert before["shop/web"].backend_sets[cluster] == (("100.96.1.2", 8080),)
    assert "shop/api" not in before
    assert after["shop/web"].backend_sets[cluster] == (("100.96.1.3", 8080),)
    assert set(after) == {"shop/web", "shop/api"}

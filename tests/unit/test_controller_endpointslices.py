"""EndpointSlice controller: named ports, readiness, grouping, splitting, and sync."""

from __future__ import annotations

import threading
import time

from tabby.controller import endpointslices as eps
from tabby.datastore.embedded import EmbeddedDatastore
from tabby.model import validate


def svc(name="web", selector=None, ports=None, **spec):
    return validate(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {
                "selector": {"app": "web"} if selector is None else selector,
                "ports": ports or [{"name": "http", "port": 80, "targetPort": "http"}],
                **spec,
            },
        }
    )


def pod(name, ip, ports=(("http", 8080),), labels=None, node="n1", **status):
    containers = [{"name": "c", "ports": [{"name": n, "containerPort": p} for n, p in ports]}]
    return validate(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {"app": "web"}},
            "spec": {"nodeName": node, "containers": containers},
            "status": {"podIP": ip, "phase": "Running", **status},
        }
    )


def test_named_port_resolved_per_pod_and_grouped():
    pods = [
        pod("a", "100.96.0.2", ports=[("http", 8080)]),
        pod("b", "100.96.0.3", ports=[("http", 9090)]),
        pod("c", "100.96.0.4", ports=[("metrics", 9100)]),  # lacks "http": left out
    ]
    slices = eps.desired_slices([svc()], pods)
    by_port = {s["ports"][0]["port"]: s for s in slices}
    assert sorted(by_port) == [8080, 9090]
    assert [e["addresses"] for e in by_port[8080]["endpoints"]] == [["100.96.0.2"]]
    assert [e["addresses"] for e in by_port[9090]["endpoints"]] == [["100.96.0.3"]]
    assert sorted(s["metadata"]["name"] for s in slices) == ["web-tabby", "web-tabby-1"]
    for s in slices:
        labels = s["metadata"]["labels"]
        assert labels["kubernetes.io/service-name"] == "web"
        assert labels["endpointslice.kubernetes.io/managed-by"] == "tabby-controller"
        validate(s)


def test_readiness_and_terminating():
    ready = pod("ready", "100.96.0.2", conditions=[{"type": "Ready", "status": "True"}])
    unready = pod("unready", "100.96.0.3", conditions=[{"type": "Ready", "status": "False"}])
    no_conditions = pod("bare", "100.96.0.4")  # Running, no conditions: ready
    pending = pod("pending", "100.96.0.5", phase="Pending")
    going = pod("going", "100.96.0.6", conditions=[{"type": "Ready", "status": "True"}])
    going["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    [s] = eps.desired_slices([svc()], [ready, unready, no_conditions, pending, going])
    conditions = {e["targetRef"]["name"]: e["conditions"] for e in s["endpoints"]}
    assert conditions["ready"] == {"ready": True, "serving": True, "terminating": False}
    assert conditions["unready"] == {"ready": False, "serving": False, "terminating": False}
    assert conditions["bare"]["ready"] is True
    assert conditions["pending"]["ready"] is False
    assert conditions["going"] == {"ready": False, "serving": True, "terminating": True}
    assert all(e["nodeName"] == "n1" for e in s["endpoints"])


def test_selection_rules_and_split():
    other_ns = pod("x", "100.96.0.9")
    other_ns["metadata"]["namespace"] = "other"
    no_ip = pod("noip", "100.96.0.8")
    del no_ip["status"]["podIP"], no_ip["status"]["podIPs"]
    wrong_label = pod("db", "100.96.0.7", labels={"app": "db"})
    assert eps.desired_slices([svc()], [other_ns, no_ip, wrong_label]) == []
    assert eps.desired_slices([svc(selector={})], [pod("a", "100.96.0.2")]) == []
    many = [pod(f"p{i}", f"100.96.1.{i}") for i in range(1, 151)]
    slices = eps.desired_slices([svc(ports=[{"port": 80, "targetPort": 8080}])], many)
    assert [len(s["endpoints"]) for s in slices] == [100, 50]


def test_sync_applies_and_deletes(tmp_path):
    ds = EmbeddedDatastore(tmp_path / "s.db")
    ds.apply([svc(), pod("a", "100.96.0.2")])
    eps.sync(ds)
    [s] = ds.list("endpointslices")[0]
    assert s["metadata"]["name"] == "web-tabby"
    rev = ds.revision()
    eps.sync(ds)
    assert ds.revision() == rev  # nothing new, nothing written
    ds.delete("service", "web")
    eps.sync(ds)
    assert ds.list("endpointslices")[0] == []


def test_run_follows_changes(tmp_path):
    ds = EmbeddedDatastore(tmp_path / "s.db")
    ds.apply([svc()])
    stop = threading.Event()
    worker = threading.Thread(target=eps.run, args=(ds, stop))
    worker.start()
    try:
        ds.apply([pod("a", "100.96.0.2")])
        deadline = time.monotonic() + 5
        while not ds.list("endpointslice")[0] and time.monotonic() < deadline:
            time.sleep(0.02)
        [s] = ds.list("endpointslice")[0]
        assert s["endpoints"][0]["addresses"] == ["100.96.0.2"]
    finally:
        stop.set()
        worker.join(timeout=5)
    assert not worker.is_alive()

"""The lab's deployment reconciler over a real embedded datastore, with the pod machinery
(tabby-cni, namespaces, processes) replaced by fakes that record calls and write the Pod objects
as pods.add / pods.remove do: naming, spreading, scaling, refusal, garbage collection, status."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import pytest

from tabby.datastore.embedded import EmbeddedDatastore
from tabby.lab import deployments, pods
from tabby.lab.topology import plan

Obj = dict[str, Any]


def deployment(name: str, replicas: int, image: str = "nginx", labels: Obj | None = None) -> Obj:
    labels = labels or {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "c", "image": image}]},
            },
        },
    }


class FakeLab:
    """pods.add / pods.remove without namespaces: the Pod object and a state record."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.recs: dict[str, Obj] = {}
        self.added: list[tuple[str, str, str]] = []
        self.fail_on = fail_on

    def add(self, plan_, ds, name, node, namespace, image, labels, owner=None) -> str:
        if self.fail_on is not None and len(self.added) == self.fail_on:
            raise pods.PodError("tabby-cni ADD: no address left")
        ds.apply([pods.pod_object(name, namespace, node, image, labels, owner)])
        ds.patch(
            "Pod",
            name,
            namespace,
            {
                "status": {
                    "phase": "Running",
                    "podIP": f"10.0.0.{len(self.added) + 1}",
                    "conditions": [{"type": "Ready", "status": "True"}],
                }
            },
        )
        self.recs[f"{namespace}/{name}"] = {"node": node, "image": image}
        self.added.append((name, node, image))
        return "10.0.0.1"

    def remove(self, plan_, ds, namespace, name) -> None:
        self.recs.pop(f"{namespace}/{name}")
        ds.delete("Pod", name, namespace)


@pytest.fixture
def setup(tmp_path):
    ds = EmbeddedDatastore(tmp_path / "s.db")
    lab = FakeLab()
    rec = deployments.Reconciler(
        plan("unit", 3), ds, add=lab.add, remove=lab.remove, lab_pods=lambda: set(lab.recs)
    )
    yield ds, lab, rec
    ds.close()


def owned(ds, name: str) -> list[Obj]:
    return [p for p in ds.list("Pod")[0] if p["metadata"]["name"].startswith(f"{name}-")]


def test_replicas_become_named_labelled_spread_pods_and_status(setup):
    ds, lab, rec = setup
    ds.apply([deployment("web", 3, image="docker.io/library/nginx:1.25")])
    rec.reconcile()
    got = owned(ds, "web")
    assert len(got) == 3
    for p in got:
        assert re.fullmatch(r"web-[a-z]{5}", p["metadata"]["name"])
        assert p["metadata"]["labels"] == {"app": "web"}
        ref = p["metadata"]["ownerReferences"][0]
        assert (
            ref["kind"] == "Deployment"
            and ref["uid"] == ds.get("Deployment", "web", "default")["metadata"]["uid"]
        )
    assert sorted(n for _, n, _ in lab.added) == ["node1", "node2", "node3"]
    assert {i for _, _, i in lab.added} == {"nginx"}
    status = ds.get("Deployment", "web", "default")["status"]
    assert (status["replicas"], status["readyReplicas"], status["availableReplicas"]) == (3, 3, 3)
    assert (
        status["conditions"][0]["type"] == "Available"
        and status["conditions"][0]["status"] == "True"
    )
    before = ds.revision()
    rec.reconcile()  # idempotent: nothing to create, status unchanged -> no write
    assert ds.revision() == before and len(lab.added) == 3


def test_new_pods_go_to_the_least_loaded_nodes(setup):
    ds, lab, rec = setup
    ds.apply([pods.pod_object("other", "default", "node1", "netexec", {"app": "other"})])
    ds.apply([deployment("web", 2)])
    rec.reconcile()
    assert sorted(n for _, n, _ in lab.added) == ["node2", "node3"]


def test_scale_down_and_up_and_delete(setup):
    ds, lab, rec = setup
    ds.apply([deployment("web", 3)])
    rec.reconcile()
    ds.patch("Deployment", "web", "default", {"spec": {"replicas": 1}})
    rec.reconcile()
    assert len(owned(ds, "web")) == 1 and len(lab.recs) == 1
    ds.patch("Deployment", "web", "default", {"spec": {"replicas": 2}})
    rec.reconcile()
    assert len(owned(ds, "web")) == 2
    ds.delete("Deployment", "web", "default")
    rec.reconcile()
    assert owned(ds, "web") == [] and lab.recs == {}


def test_pods_not_owned_are_left_alone_even_when_selected(setup):
    ds, lab, rec = setup
    ds.apply([pods.pod_object("web-handmade", "default", "node1", "nginx", {"app": "web"})])
    ds.apply([deployment("web", 1)])
    rec.reconcile()
    ds.delete("Deployment", "web", "default")
    rec.reconcile()
    assert [p["metadata"]["name"] for p in owned(ds, "web")] == ["web-handmade"]


def test_unknown_image_refused_with_replica_failure_and_nothing_created(setup):
    ds, lab, rec = setup
    ds.apply([deployment("cache", 2, image="redis:7")])
    rec.reconcile()
    assert lab.added == [] and owned(ds, "cache") == []
    conds = ds.get("Deployment", "cache", "default")["status"]["conditions"]
    failure = next(c for c in conds if c["type"] == "ReplicaFailure")
    assert failure["status"] == "True" and failure["reason"] == "FailedCreate"
    assert failure["message"].startswith("spec.template.spec.containers[0].image: ")
    assert 'image "redis:7" is not runnable in the lab' in failure["message"]
    assert not rec.failed  # a template error waits for a change, no retry timer
    ds.patch(
        "Deployment",
        "cache",
        "default",
        {"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "nginx"}]}}}},
    )
    rec.reconcile()
    assert len(owned(ds, "cache")) == 2
    conds = ds.get("Deployment", "cache", "default")["status"]["conditions"]
    assert [c["type"] for c in conds] == ["Available"]


@pytest.mark.parametrize(
    "image, lab_image",
    [
        ("nginx", "nginx"),
        ("nginx:1.25", "nginx"),
        ("docker.io/library/nginx@sha256:abc", "nginx"),
        ("pause", "pause"),
        ("quay.io/someone/nginx", None),
        ("redis", None),
        ("", None),
    ],
)
def test_lab_image(image, lab_image):
    assert pods.lab_image(image) == lab_image


def test_several_containers_refused(setup):
    ds, lab, rec = setup
    dep = deployment("two", 1)
    dep["spec"]["template"]["spec"]["containers"].append({"name": "d", "image": "nginx"})
    ds.apply([dep])
    rec.reconcile()
    conds = ds.get("Deployment", "two", "default")["status"]["conditions"]
    assert "exactly one container, got 2" in conds[-1]["message"] and lab.added == []


def test_failed_creation_is_reported_and_retried(setup):
    ds, lab, rec = setup
    lab.fail_on = 1
    ds.apply([deployment("web", 2)])
    rec.reconcile()
    assert rec.failed and len(owned(ds, "web")) == 1
    conds = ds.get("Deployment", "web", "default")["status"]["conditions"]
    assert "no address left" in conds[-1]["message"]
    lab.fail_on = None
    rec.reconcile()
    assert not rec.failed and len(owned(ds, "web")) == 2


def test_run_follows_the_watch(setup):
    ds, lab, rec = setup
    stop = threading.Event()
    t = threading.Thread(target=rec.run, args=(stop,))
    t.start()
    try:
        ds.apply([deployment("web", 2)])
        deadline = time.monotonic() + 10
        while len(owned(ds, "web")) != 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(owned(ds, "web")) == 2
        victim = owned(ds, "web")[0]["metadata"]["name"]
        lab.remove(None, ds, "default", victim)  # a pod deleted behind its back is replaced
        deadline = time.monotonic() + 10
        while len(owned(ds, "web")) != 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        names = {p["metadata"]["name"] for p in owned(ds, "web")}
        assert len(names) == 2 and victim not in names
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()

"""Deployments in the lab, end to end: seed 001's own Deployment + NodePort Service YAML
(examples/seed-001-nginx.yaml, applied unchanged with `tabbyctl apply -f`) becomes a real nginx pod
through the lab's kubelet process; the external client reaches it on NodePort 30604 through every
node; scaling, a refused image and deletion are reconciled by the same process."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from tabby.lab import fabric, state, traffic
from tabby.lab.cluster import Lab
from tabby.lab.topology import EXTERNAL_CLIENT_IP

from .service_lab import wait_for_endpoints

pytestmark = [pytest.mark.root, pytest.mark.lab]

SEED = pathlib.Path(__file__).parents[2] / "examples" / "seed-001-nginx.yaml"
TABBYCTL = os.path.join(os.path.dirname(sys.executable), "tabbyctl")
NODEPORT = 30604
T = TypeVar("T")

BAD = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: cache}
spec:
  replicas: 2
  selector: {matchLabels: {app: cache}}
  template:
    metadata: {labels: {app: cache}}
    spec: {containers: [{name: redis, image: redis:7}]}
"""


def tabbyctl(lab: Lab, *args: str, stdin: str | None = None) -> str:
    out = subprocess.run(
        [TABBYCTL, *args, "--datastore", lab.url],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, (args, out.stdout, out.stderr)
    return out.stdout


def until(what: str, check: Callable[[], T | None], timeout_s: float = 30.0) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.1)


def lab_pods(lab: Lab, prefix: str) -> dict[str, dict[str, Any]]:
    """The lab's pods (state.json, as `lab status` reads it) named ``<prefix>-xxxxx``."""
    pattern = re.compile(rf"default/{prefix}-[a-z]{{5}}$")
    return {
        key.split("/")[1]: rec
        for key, rec in state.read(lab.name).get("pods", {}).items()
        if pattern.match(key)
    }


def running(lab: Lab, prefix: str, count: int) -> dict[str, dict[str, Any]] | None:
    """``count`` pods of the Deployment, each recorded with an IP and its Pod object Ready."""
    found = lab_pods(lab, prefix)
    ds = lab.datastore()
    objs = {name: ds.get("Pod", name, "default") for name in found}
    ready = all(
        o and o.get("status", {}).get("phase") == "Running" and "ip" in found[n]
        for n, o in objs.items()
    )
    pod_objs = [p for p in ds.list("Pod", "default")[0] if p["metadata"]["name"] in found]
    return found if len(found) == count and ready and len(pod_objs) == count else None


def through_every_node(lab: Lab) -> set[str]:
    """GET / on every node's NodePort from the external client; the pods that answered."""
    seen = set()
    for node in lab.plan.nodes:
        body = traffic.http_get(lab.plan.external_netns, node.ip, NODEPORT, "/")
        pod, _, client = body.strip().partition(" saw ")
        assert client == EXTERNAL_CLIENT_IP, (node.name, body)  # Tunnel mode keeps the source
        seen.add(pod)
    return seen


def scale(lab: Lab, replicas: int) -> None:
    patch = f'{{"spec":{{"replicas":{replicas}}}}}'
    tabbyctl(lab, "patch", "deployment", "nginx", "--patch", patch)


def test_seed_deployment_scaling_refusal_and_deletion(lab: Lab) -> None:
    tabbyctl(lab, "apply", "-f", str(SEED))
    first = until("the seed's nginx pod running", lambda: running(lab, "nginx", 1))
    ((name, rec),) = first.items()
    assert lab.pod(name)["image"] == "nginx"  # the tests' (and `lab exec`'s) view of it
    obj = lab.datastore().get("Pod", name, "default")
    assert obj is not None and obj["metadata"]["labels"] == {"app": "nginx"}
    assert obj["metadata"]["ownerReferences"][0]["kind"] == "Deployment"
    wait_for_endpoints(lab, "nginx", 1)
    assert through_every_node(lab) == {name}
    status = subprocess.run(
        [TABBYCTL, "lab", "status", "--name", lab.name], capture_output=True, text=True, timeout=60
    )
    assert f"default/{name}" in status.stdout, status.stdout
    assert re.search(r"kubelet \(Deployments -> pods\): pid \d+ running", status.stdout)
    table = tabbyctl(lab, "get", "deployments")
    assert re.search(r"^default\s+nginx\s+1/1\s+1\s+1\b", table, re.M), table

    scale(lab, 3)
    three = until("3 nginx pods", lambda: running(lab, "nginx", 3))
    assert name in three
    assert sorted(r["node"] for r in three.values()) == [n.name for n in lab.plan.nodes]
    wait_for_endpoints(lab, "nginx", 3)
    assert through_every_node(lab) <= set(three)

    scale(lab, 1)
    one = until("back to 1 nginx pod", lambda: running(lab, "nginx", 1))
    gone = set(three) - set(one)
    assert len(gone) == 2
    for pod in gone:
        assert lab.datastore().get("Pod", pod, "default") is None
        assert lab.plan.pod_netns("default", pod) not in fabric.lab_netns(f"{lab.name}-")
    wait_for_endpoints(lab, "nginx", 1)
    assert through_every_node(lab) == set(one)

    tabbyctl(lab, "apply", "-f", "-", stdin=BAD)

    def refusal() -> str | None:
        dep = lab.datastore().get("Deployment", "cache", "default") or {}
        for c in dep.get("status", {}).get("conditions", []):
            if c["type"] == "ReplicaFailure" and c["status"] == "True":
                return str(c["reason"]) + ": " + str(c["message"])
        return None

    message = until("the cache Deployment refused", refusal, timeout_s=10)
    assert message.startswith("FailedCreate: spec.template.spec.containers[0].image: ")
    assert 'image "redis:7" is not runnable in the lab' in message
    log = pathlib.Path(state.lab_dir(lab.name), "kubelet.log").read_text()
    assert "deployment default/cache: refused: " in log and '"redis:7"' in log
    assert lab_pods(lab, "cache") == {}
    assert not [
        p for p in lab.datastore().list("Pod")[0] if p["metadata"]["name"].startswith("cache")
    ]
    assert not [n for n in fabric.lab_netns(f"{lab.name}-pod-default-cache")]

    tabbyctl(lab, "delete", "deployment", "nginx")
    tabbyctl(lab, "delete", "deployment", "cache")
    until("the nginx pods removed", lambda: not lab_pods(lab, "nginx") or None, timeout_s=15)
    assert not [
        p for p in lab.datastore().list("Pod")[0] if p["metadata"]["name"].startswith("nginx")
    ]
    assert not fabric.lab_netns(f"{lab.name}-pod-default-nginx")

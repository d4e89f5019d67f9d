"""tabbyctl kube-proxy off|on|status against the fake API server (tests/fakeapi).

kube-proxy's DaemonSet is the one kubeadm installs (hand-written from kubeadm's manifest shape:
nodeSelector kubernetes.io/os=linux, hostNetwork, the kube-proxy container). ``off`` must send a
merge patch that adds non-calico=true to the pod template's nodeSelector, exactly seed 001's
patch, and ``on`` must take that key out again, leaving every other field as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakeapi import FakeApiServer
from typer.testing import CliRunner

from tabby.cli.main import app

KUBE_PROXY_DS: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "DaemonSet",
    "metadata": {
        "name": "kube-proxy",
        "namespace": "kube-system",
        "labels": {"k8s-app": "kube-proxy"},
    },
    "spec": {
        "selector": {"matchLabels": {"k8s-app": "kube-proxy"}},
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
        "template": {
            "metadata": {"labels": {"k8s-app": "kube-proxy"}},
            "spec": {
                "hostNetwork": True,
                "priorityClassName": "system-node-critical",
                "serviceAccountName": "kube-proxy",
                "nodeSelector": {"kubernetes.io/os": "linux"},
                "tolerations": [{"operator": "Exists"}],
                "containers": [
                    {
                        "name": "kube-proxy",
                        "image": "registry.k8s.io/kube-proxy:v1.31.0",
                        "command": [
                            "/usr/local/bin/kube-proxy",
                            "--config=/var/lib/kube-proxy/config.conf",
                            "--hostname-override=$(NODE_NAME)",
                        ],
                        "securityContext": {"privileged": True},
                    }
                ],
            },
        },
    },
    "status": {"desiredNumberScheduled": 3, "numberReady": 3},
}


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def url(api: FakeApiServer, tmp_path: Path) -> str:
    return f"kubernetes://{api.kubeconfig(tmp_path / 'kubeconfig')}"


def _run(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def _ds(api: FakeApiServer) -> dict[str, Any]:
    return api.get(api.resource("DaemonSet"), "kube-system", "kube-proxy")


def _without_rv_and_selector(obj: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out["metadata"].pop("resourceVersion")
    out["spec"]["template"]["spec"].pop("nodeSelector")
    return out


def test_off_then_on_patches_only_the_node_selector(api, url):
    api.put_object(KUBE_PROXY_DS)
    original = _ds(api)

    done = _run("kube-proxy", "off", "--datastore", url)
    assert done.exit_code == 0, done.output
    assert "daemonset.apps/kube-proxy patched" in done.output
    off = _ds(api)
    assert off["spec"]["template"]["spec"]["nodeSelector"] == {
        "kubernetes.io/os": "linux",
        "non-calico": "true",
    }
    assert _without_rv_and_selector(off) == _without_rv_and_selector(original)
    patches = [r for r in api.requests if r[1] == "PATCH"]
    assert [r[2] for r in patches] == ["/apis/apps/v1/namespaces/kube-system/daemonsets/kube-proxy"]
    assert "kube-proxy is off" in _run("kube-proxy", "status", "--datastore", url).output

    again = _run("kube-proxy", "off", "--datastore", url)  # idempotent: nothing written
    assert again.exit_code == 0 and "unchanged" in again.output
    assert _ds(api)["metadata"]["resourceVersion"] == off["metadata"]["resourceVersion"]

    done = _run("kube-proxy", "on", "--datastore", url)
    assert done.exit_code == 0, done.output
    back = _ds(api)
    assert back["spec"]["template"]["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert _without_rv_and_selector(back) == _without_rv_and_selector(original)
    assert "kube-proxy is on" in _run("kube-proxy", "status", "--datastore", url).output
    assert "unchanged" in _run("kube-proxy", "on", "--datastore", url).output


def test_other_namespace_and_name(api, url):
    custom = copy.deepcopy(KUBE_PROXY_DS)
    custom["metadata"].update(name="kp", namespace="net")
    api.put_object(custom)
    done = _run("kube-proxy", "off", "--datastore", url, "-n", "net", "--name", "kp")
    assert done.exit_code == 0, done.output
    stored = api.get(api.resource("DaemonSet"), "net", "kp")
    assert stored["spec"]["template"]["spec"]["nodeSelector"]["non-calico"] == "true"


def test_warns_when_bpf_is_off(api, url):
    api.put_object(KUBE_PROXY_DS)
    api.put_object(
        {
            "apiVersion": "crd.projectcalico.org/v1",
            "kind": "FelixConfiguration",
            "metadata": {"name": "default"},
            "spec": {"bpfEnabled": False},
        }
    )
    done = _run("kube-proxy", "off", "--datastore", url)
    assert done.exit_code == 0 and "bpfEnabled false" in done.output


def test_missing_daemonset_and_other_datastores_are_one_line_errors(api, url, tmp_path):
    done = _run("kube-proxy", "off", "--datastore", url)
    assert done.exit_code == 1
    assert "daemonset kube-system/kube-proxy not found" in done.output
    assert "Traceback" not in done.output
    sqlite = f"sqlite://{tmp_path / 'store.db'}"
    done = _run("kube-proxy", "off", "--datastore", sqlite)
    assert done.exit_code == 1 and "needs the Kubernetes datastore" in done.output

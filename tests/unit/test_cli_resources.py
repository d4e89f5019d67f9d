"""tabbyctl apply/get/delete/patch through a throwaway Typer app."""

from __future__ import annotations

import json
import pathlib

import pytest
import typer
import yaml
from typer.testing import CliRunner

from tabby.cli import resources

app = typer.Typer()
resources.register(app)

POOL = """
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: pods}
spec: {cidr: 100.96.0.0/11}
"""
SVC = """
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
"""
POD = """
apiVersion: v1
kind: Pod
metadata: {name: web-1, labels: {app: web}}
spec: {nodeName: node1, containers: [{name: c}]}
status: {podIP: %s}
"""


@pytest.fixture
def tabbyctl(tmp_path, monkeypatch):
    monkeypatch.setenv("TABBY_DATASTORE", f"sqlite://{tmp_path}/store.db")
    runner = CliRunner()

    def run(*args: str, input: str | None = None):
        return runner.invoke(app, list(args), input=input)

    return run


def write(tmp_path, text: str):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return str(path)


def test_apply_get_and_unchanged(tabbyctl, tmp_path):
    manifest = write(tmp_path, "---\n".join([POOL, SVC, POD % "100.96.0.5"]))
    out = tabbyctl("apply", "-f", manifest)
    assert out.exit_code == 0, out.output
    assert out.stdout.splitlines() == [
        "ippool/pods created",
        "service/web created",
        "pod/web-1 created",
    ]
    assert "pod/web-1 unchanged" in tabbyctl("apply", "-f", manifest).stdout
    table = tabbyctl("get", "po").stdout
    assert "NODE" in table and "node1" in table and "100.96.0.5" in table
    assert "80:30080/TCP" in tabbyctl("get", "svc").stdout
    one = yaml.safe_load(tabbyctl("get", "svc", "web", "-o", "yaml").stdout)
    assert one["kind"] == "Service" and one["spec"]["ports"][0]["nodePort"] == 30080
    listed = json.loads(tabbyctl("get", "ippools", "-o", "json").stdout)
    assert listed["kind"] == "List" and listed["items"][0]["metadata"]["name"] == "pods"


def test_seed_deployment_apply_get_and_patch(tabbyctl):
    seed = pathlib.Path(__file__).parents[2] / "examples" / "seed-001-nginx.yaml"
    out = tabbyctl("apply", "-f", str(seed))
    assert out.exit_code == 0, out.output
    assert out.stdout.splitlines() == ["deployment/nginx created", "service/nginx created"]
    table = tabbyctl("get", "deployments", "-o", "wide").stdout.splitlines()
    assert table[0].split() == [
        "NAMESPACE",
        "NAME",
        "READY",
        "UP-TO-DATE",
        "AVAILABLE",
        "CONTAINERS",
        "IMAGES",
        "SELECTOR",
    ]
    assert table[1].split() == ["default", "nginx", "0/1", "0", "0", "nginx", "nginx", "app=nginx"]
    out = tabbyctl("patch", "deploy", "nginx", "--patch", '{"spec":{"replicas":3}}')
    assert out.exit_code == 0, out.output
    assert tabbyctl("get", "deploy").stdout.splitlines()[1].split()[:3] == [
        "default",
        "nginx",
        "0/3",
    ]
    out = tabbyctl("patch", "deploy", "nginx", "--patch", '{"spec":{"replicas":-1}}')
    assert out.exit_code == 1 and "spec.replicas: must be an integer >= 0" in out.output


def test_apply_from_stdin_and_list_kind(tabbyctl):
    doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": [yaml.safe_load(POOL)]})
    out = tabbyctl("apply", "-f", "-", input=doc)
    assert out.exit_code == 0 and "ippool/pods created" in out.stdout


def test_malformed_yaml_names_document_and_line(tabbyctl, tmp_path):
    out = tabbyctl("apply", "-f", write(tmp_path, POOL + "---\nkind: Pod\n  bad: [\n"))
    assert out.exit_code == 1
    assert "document 2, line 8: mapping values" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("apiVersion: v1\nkind: Deploymint\nmetadata: {name: x}\n", 'unknown kind "Deploymint"'),
        (POOL.replace("cidr:", "cidrr:"), "spec.cidrr: unknown field"),
        (POOL.replace("100.96.0.0/11", "100.96.0.0/40"), "spec.cidr: '100.96.0.0/40' is not"),
        (POD % "10.0.0.5", "status.podIP: 10.0.0.5 is outside every IPPool (100.96.0.0/11)"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tabbyctl, tmp_path, doc, message):
    out = tabbyctl("apply", "-f", write(tmp_path, POOL + "---\n" + SVC + "---\n" + doc))
    assert out.exit_code == 1
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "No resources found" in tabbyctl("get", "ippool").stderr


def test_delete(tabbyctl, tmp_path):
    manifest = write(tmp_path, POOL + "---\n" + SVC)
    tabbyctl("apply", "-f", manifest)
    out = tabbyctl("delete", "svc", "nope")
    assert out.exit_code == 1 and 'service "nope" not found' in out.stderr
    assert tabbyctl("delete", "svc", "web").stdout.strip() == 'service "web" deleted'
    out = tabbyctl("delete", "-f", manifest)  # web is gone: nothing deleted
    assert out.exit_code == 1
    assert "pods" in tabbyctl("get", "ippool").stdout


def test_patch_creates_default_felix_configuration_and_warns(tabbyctl):
    felix_default = ("patch", "felixconfiguration", "default")
    out = tabbyctl(*felix_default, "--patch", '{"spec": {"bpfEnabled": true}}')
    assert out.exit_code == 0 and "felixconfiguration/default created" in out.stdout
    out = tabbyctl(*felix_default, '--patch={"spec": {"bpfEnabled": false}}')
    assert out.exit_code == 0 and "patched" in out.stdout
    assert "traffic is disrupted" in out.stderr
    felix = yaml.safe_load(tabbyctl("get", "felixconfiguration", "default", "-o", "yaml").stdout)
    assert felix["spec"]["bpfEnabled"] is False
    out = tabbyctl(*felix_default, "--patch", '{"spec": {"bpfLogLevel": "Loud"}}')
    assert out.exit_code == 1 and "spec.bpfLogLevel" in out.stderr
    out = tabbyctl("patch", "ippool", "missing", "--patch", "{}")
    assert out.exit_code == 1 and "not found" in out.stderr
    assert tabbyctl("patch", "ippool", "x", "--patch", "{nope").exit_code == 1


def test_datastore_errors_are_one_line(tabbyctl, tmp_path):
    out = tabbyctl("get", "pods", "--datastore", "kubernetes://in-cluster")
    assert out.exit_code == 1 and "needs an absolute kubeconfig path" in out.stderr
    assert "Traceback" not in out.output
    out = tabbyctl("get", "pods", "--datastore", "etcd://127.0.0.1:1")  # nothing listens there
    assert out.exit_code == 1 and "etcd://127.0.0.1:1" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.output
    bad = tmp_path / "junk.db"
    bad.write_bytes(b"junk" * 1000)
    out = tabbyctl("get", "pods", "--datastore", f"sqlite://{bad}")
    assert out.exit_code == 1 and len(out.stderr.strip().splitlines()) == 1

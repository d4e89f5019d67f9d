"""deploy/ checked offline: every manifest against the Kubernetes 1.30 schemas that
kubernetes-validate ships (custom resources against the shipped CRDs' openAPIV3Schema), and each
piece against the code it has to fit: the agent's CLI and datastore parsing, the kinds the
Kubernetes datastore reads and writes, tabby-cni's config parser (on the conflist that
deploy/install-cni.sh really writes), the console scripts and the files the Dockerfile copies.
No network, no cluster, no image build (there is no container runtime here)."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import typer.main
import yaml

from tabby import agent
from tabby.bpf import objects
from tabby.cli.agent_cmd import app as agent_app
from tabby.cni import plugin
from tabby.datastore import kubernetes as kube_ds
from tabby.datastore import open_datastore
from tabby.model import KINDS, lookup, validate

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30"  # oldest Kubernetes the manifests target; schemas shipped by the package
INSTALL_CNI = DEPLOY / "install-cni.sh"
READ = {"get", "list", "watch"}
WRITE = {"create", "update", "delete"}
WRITTEN_KINDS = {"IPAMBlock", "IPAMHandle"}  # cni/ipam.py: by tabby-cni and the agent


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((str(path.relative_to(DEPLOY)), doc))
    return out


DOCS = documents()


def crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(group, kind) -> CRD."""
    return {
        (d["spec"]["group"], d["spec"]["names"]["kind"]): d
        for _, d in DOCS
        if d["kind"] == "CustomResourceDefinition"
    }


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in DOCS if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"want exactly one {kind} {name or ''} in deploy/, got {len(found)}"
    return found[0]


def daemonset() -> dict[str, Any]:
    return one("DaemonSet")


def pod_spec() -> dict[str, Any]:
    return daemonset()["spec"]["template"]["spec"]


def container(name: str) -> dict[str, Any]:
    spec = pod_spec()
    (c,) = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name]
    return c


def config_value(configmap: str, key: str) -> str:
    return one("ConfigMap", configmap)["data"][key]


def resolved_args(c: dict[str, Any], node: str = "node-a") -> list[str]:
    """The container's args with $(VAR) expanded as kubelet does from its env."""
    values = {}
    for e in c.get("env", []):
        source = e.get("valueFrom", {})
        if "value" in e:
            values[e["name"]] = e["value"]
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "spec.nodeName"
            values[e["name"]] = node
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            values[e["name"]] = config_value(ref["name"], ref["key"])
    return [re.sub(r"\$\((\w+)\)", lambda m: values[m[1]], a) for a in c.get("args", [])]


# --- schemas -------------------------------------------------------------------------------------


def test_deploy_has_the_pieces():
    kinds = {d["kind"] for _, d in DOCS}
    assert {
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "CustomResourceDefinition",
    } <= kinds
    assert one("ConfigMap", "kubernetes-services-endpoint")["data"].keys() == {
        "KUBERNETES_SERVICE_HOST",
        "KUBERNETES_SERVICE_PORT",
    }


@pytest.mark.parametrize(
    "where,doc",
    [
        (w, d)
        for w, d in DOCS
        if "." not in d["apiVersion"].split("/")[0] or ".k8s.io/" in d["apiVersion"]
    ],
    ids=lambda v: v if isinstance(v, str) else f"{v['kind']}/{v['metadata']['name']}",
)
def test_builtin_kinds_validate_against_kubernetes_schemas(where, doc):
    # strict: unknown fields are errors (a typo'd key would otherwise be dropped by the server)
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        pytest.fail(f"{where}: {doc['kind']}/{doc['metadata']['name']}: {path}: {e.message}")


def test_schemas_cover_the_pinned_version():
    assert K8S_VERSION in {
        ".".join(v.split(".")[:2]) for v in kubernetes_validate.utils.all_versions()
    }


@pytest.mark.parametrize(
    "where,doc",
    [
        (w, d)
        for w, d in DOCS
        if d["apiVersion"].split("/")[0] in {"crd.projectcalico.org", "tabby.dev"}
    ],
    ids=lambda v: v if isinstance(v, str) else f"{v['kind']}/{v['metadata']['name']}",
)
def test_custom_resources_validate_against_shipped_crds(where, doc):
    group, version = doc["apiVersion"].split("/")
    crd = crds()[(group, doc["kind"])]
    served = {v["name"]: v for v in crd["spec"]["versions"] if v["served"]}
    assert version in served, f"{where}: {group} serves {sorted(served)}, not {version}"
    schema = served[version]["schema"]["openAPIV3Schema"]
    jsonschema.validate(doc, schema)
    validate(doc)  # and tabby reads it the same way (model/calico.py)


def test_samples_exist():
    assert {d["kind"] for w, d in DOCS if w.startswith("samples/")} >= {
        "FelixConfiguration",
        "IPPool",
    }


def test_kustomization_lists_crds_and_agent():
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    for res in listed:
        assert (DEPLOY / res).is_file(), res
    assert {f"crds/{p.name}" for p in (DEPLOY / "crds").glob("*.yaml")} | {"tabby.yaml"} <= listed
    # the placeholder ConfigMap must be edited before it is applied
    assert "kubernetes-services-endpoint.yaml" not in listed


# --- the DaemonSet -------------------------------------------------------------------------------


def test_daemonset_is_a_node_agent():
    ds, spec = daemonset(), pod_spec()
    assert ds["metadata"]["namespace"] == one("Namespace")["metadata"]["name"]
    assert spec["hostNetwork"] is True
    assert spec["hostPID"] is True  # the stale-UDP reaper reads cgroup.procs, opens /proc/<pid>
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]  # every taint
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    sa = one("ServiceAccount")
    assert spec["serviceAccountName"] == sa["metadata"]["name"]
    images = {c["image"] for c in spec["containers"] + spec["initContainers"]}
    assert len(images) == 1, images


def test_agent_container_privileged_with_bpffs_cgroup_and_modules():
    spec, c = pod_spec(), container("tabby-agent")
    assert c["securityContext"]["privileged"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    bpffs = mounts[objects.PIN_BASE.rsplit("/", 1)[0]]  # /sys/fs/bpf: pins outlive the pod
    assert bpffs["mountPropagation"] == "Bidirectional"
    assert volumes[bpffs["name"]]["hostPath"]["path"] == "/sys/fs/bpf"
    modules = mounts["/lib/modules"]
    assert modules["readOnly"] and volumes[modules["name"]]["hostPath"]["path"] == "/lib/modules"
    # --cgroup names a group inside the host's cgroup2 hierarchy, never its root
    (cgroup,) = [a.split("=", 1)[1] for a in resolved_args(c) if a.startswith("--cgroup=")]
    (host_cg,) = [
        m for m in c["volumeMounts"] if volumes[m["name"]]["hostPath"]["path"] == "/sys/fs/cgroup"
    ]
    assert cgroup.startswith(host_cg["mountPath"] + "/")
    assert cgroup.rstrip("/") != host_cg["mountPath"]


def test_agent_args_parse_with_the_real_cli():
    c = container("tabby-agent")
    command = typer.main.get_command(agent_app).commands["agent"]  # type: ignore[attr-defined]
    ctx = command.make_context("agent", resolved_args(c, node="node-a"))
    assert ctx.params["node"] == "node-a"
    assert ctx.params["health_port"] == agent.DEFAULT_HEALTH_PORT
    assert ctx.params["netns"] is None  # hostNetwork: the node's namespace is the pod's


def test_probes_hit_the_agent_health_server():
    c = container("tabby-agent")
    (port_arg,) = [a for a in resolved_args(c) if a.startswith("--health-port=")]
    port = int(port_arg.split("=")[1])
    # The agent binds 127.0.0.1 only: with hostNetwork kubelet reaches it there.
    assert c["livenessProbe"]["httpGet"] == {"host": "127.0.0.1", "path": "/healthz", "port": port}
    assert c["readinessProbe"]["httpGet"] == {"host": "127.0.0.1", "path": "/readyz", "port": port}
    assert c["resources"]["requests"].keys() == {"cpu", "memory"}


def test_every_container_reads_the_api_server_endpoint_optionally():
    spec = pod_spec()
    for c in spec["containers"] + spec["initContainers"]:
        assert {
            "configMapRef": {"name": "kubernetes-services-endpoint", "optional": True}
        } in c.get("envFrom", []), c["name"]


@pytest.fixture
def fake_service_account(tmp_path, monkeypatch):
    """A pod's service account directory and the in-cluster environment, for lightkube."""
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("token-1")
    (sa / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    (sa / "namespace").write_text("tabby-system")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "192.0.2.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    return sa


@pytest.fixture
def opened(monkeypatch):
    """open_datastore's Kubernetes branch, stopped before any connection: the configs it made."""
    made: list[tuple[Any, str]] = []

    class Recorder:
        def __init__(self, config: Any, name: str) -> None:
            made.append((config, name))

    monkeypatch.setattr(kube_ds, "KubernetesDatastore", Recorder)
    return made


def test_agent_datastore_is_in_cluster_kubernetes(fake_service_account, monkeypatch, opened):
    (url,) = [
        a.split("=", 1)[1] for a in resolved_args(container("tabby-agent")) if "--datastore" in a
    ]
    real_from_service_account = kube_ds.KubeConfig.from_service_account
    monkeypatch.setattr(
        kube_ds.KubeConfig,
        "from_env",
        classmethod(lambda cls: real_from_service_account(fake_service_account)),
    )
    open_datastore(url)
    ((config, name),) = opened
    assert name == "kubernetes"
    cluster = config.get().cluster
    assert cluster.server == "https://192.0.2.1:6443"  # the ConfigMap's address, not a ClusterIP


# --- RBAC ----------------------------------------------------------------------------------------


def granted() -> dict[tuple[str, str], set[str]]:
    role = one("ClusterRole")
    binding = one("ClusterRoleBinding")
    sa = one("ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {
        "kind": "ServiceAccount",
        "name": sa["metadata"]["name"],
        "namespace": sa["metadata"]["namespace"],
    } in binding["subjects"]
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                out.setdefault((group, res), set()).update(rule["verbs"])
    return out


def test_cluster_role_covers_every_kind_the_datastore_watches():
    assert set(agent.KINDS) <= {k.name for k in KINDS}
    perms = granted()
    for kind in KINDS:  # the Kubernetes datastore's watch runs one informer per watched kind
        if not kind.watched:  # the lab's kinds (Deployment): no grant at all, least privilege
            assert (kube_ds.wire_version(kind).rpartition("/")[0], kind.plural) not in perms
            continue
        group = kube_ds.wire_version(kind).rpartition("/")[0]
        verbs = perms.get((group, kind.plural), set())
        assert verbs >= READ, f"{kind.name}: {group or 'core'}/{kind.plural} needs {READ}"
        wanted = READ | WRITE if kind.name in WRITTEN_KINDS else READ
        assert verbs == wanted, f"{kind.name}: {sorted(verbs)} (least privilege: {sorted(wanted)})"
    known = {(kube_ds.wire_version(k).rpartition("/")[0], k.plural) for k in KINDS}
    assert set(perms) <= known, f"grants for kinds tabby never touches: {set(perms) - known}"


def test_crds_cover_every_custom_kind():
    for kind in KINDS:
        group = kube_ds.wire_version(kind).rpartition("/")[0]
        if "." in group and not group.endswith(".k8s.io"):
            assert (group, lookup(kind.name).name) in crds(), kind.name


# --- the CNI install -----------------------------------------------------------------------------


def run_install(tmp_path: Path, sa: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    (tmp_path / "image").mkdir(exist_ok=True)
    binary = tmp_path / "image" / "tabby-cni"
    binary.write_text("#!/bin/sh\n")
    init = container("install-cni")
    base = {
        "PATH": os.environ["PATH"],
        "CNI_BIN_DIR": str(tmp_path / "host/opt/cni/bin"),
        "CNI_NET_DIR": str(tmp_path / "host/etc/cni/net.d"),
        "TABBY_CNI_BINARY": str(binary),
        "SERVICE_ACCOUNT_DIR": str(sa),
        "NODE_NAME": "node-a",
        "TABBY_CNI_NETWORK_CONFIG": config_value("tabby-config", "cni_network_config"),
        "KUBERNETES_SERVICE_HOST": "192.0.2.1",
        "KUBERNETES_SERVICE_PORT": "6443",
    }
    assert {e["name"] for e in init["env"]} <= set(base)
    return subprocess.run(
        ["sh", str(INSTALL_CNI), *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=10,
    )


def plugin_configs(conflist: dict[str, Any]) -> list[dict[str, Any]]:
    """Each plugin's config as libcni hands it over: the list's name and cniVersion injected."""
    return [
        {**p, "name": conflist["name"], "cniVersion": conflist["cniVersion"]}
        for p in conflist["plugins"]
    ]


def test_install_cni_writes_what_tabby_cni_parses(tmp_path, fake_service_account, opened):
    done = run_install(tmp_path, fake_service_account)
    assert done.returncode == 0, done.stderr
    net = tmp_path / "host/etc/cni/net.d"
    assert os.access(tmp_path / "host/opt/cni/bin/tabby-cni", os.X_OK)
    assert sorted(p.name for p in net.iterdir()) == ["10-tabby.conflist", "tabby-kubeconfig"]
    assert (net / "tabby-kubeconfig").stat().st_mode & 0o077 == 0  # holds a token

    (conf,) = plugin_configs(json.loads((net / "10-tabby.conflist").read_text()))
    assert conf["type"] == "tabby-cni"  # the binary's name in /opt/cni/bin
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": "/var/run/netns/cni-1",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web",
    }
    req = plugin.parse_request(env, json.dumps(conf))
    assert req.config["nodename"] == "node-a"

    # the datastore it names is the kubeconfig written beside it, as the host sees the path
    assert conf["datastore"] == "kubernetes:///etc/cni/net.d/tabby-kubeconfig"
    host_view = "kubernetes://" + str(net / "tabby-kubeconfig")
    open_datastore(host_view)
    ((config, _),) = opened
    single = config.get()
    assert single.cluster.server == "https://192.0.2.1:6443"
    assert single.user.token == "token-1"
    ca = base64.b64decode(single.cluster.certificate_auth_data)
    assert ca == (fake_service_account / "ca.crt").read_bytes()


def test_install_cni_refuses_the_placeholder_address(tmp_path, fake_service_account):
    host = one("ConfigMap", "kubernetes-services-endpoint")["data"]["KUBERNETES_SERVICE_HOST"]
    done = run_install(tmp_path, fake_service_account, KUBERNETES_SERVICE_HOST=host)
    assert done.returncode != 0
    assert "placeholder" in done.stderr
    assert not (tmp_path / "host/etc/cni/net.d/10-tabby.conflist").exists()


def test_token_watch_rewrites_the_kubeconfig(tmp_path, fake_service_account):
    assert run_install(tmp_path, fake_service_account).returncode == 0
    kubeconfig = tmp_path / "host/etc/cni/net.d/tabby-kubeconfig"
    (fake_service_account / "token").write_text("token-2")  # kubelet rotated it
    sidecar = container("cni-token")
    assert sidecar["command"][1:] == ["--watch-token"]
    proc = subprocess.Popen(
        ["sh", str(INSTALL_CNI), "--watch-token"],
        env={
            "PATH": os.environ["PATH"],
            "CNI_NET_DIR": str(kubeconfig.parent),
            "SERVICE_ACCOUNT_DIR": str(fake_service_account),
            "KUBERNETES_SERVICE_HOST": "192.0.2.1",
            "KUBERNETES_SERVICE_PORT": "6443",
            "TOKEN_CHECK_S": "0.1",
        },
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 5
        while "token-2" not in kubeconfig.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(5)
    assert yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"] == "token-2"


# --- the image -----------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = dockerfile()
    last = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last:]


def test_entrypoint_is_the_agent_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (entry,) = [json.loads(rest) for word, rest in final_stage() if word == "ENTRYPOINT"]
    assert entry[0] in scripts, f"{entry[0]} is not a console script of pyproject.toml"
    module, _, attr = scripts[entry[0]].partition(":")
    assert (module, attr) == ("tabby.cli.agent_cmd", "app")
    assert entry[1] in typer.main.get_command(agent_app).commands  # type: ignore[attr-defined]
    assert "tabby-cni" in scripts  # what the CNI stage bundles (tabby.cni.plugin:main)


def test_dockerfile_copies_what_exists_and_what_the_pod_runs():
    env: dict[str, str] = {}
    copied: dict[str, str] = {}
    for word, rest in dockerfile():
        if word == "COPY":
            parts = shlex.split(rest)
            srcs, dest = [p for p in parts[:-1] if not p.startswith("--")], parts[-1]
            if not any(p.startswith("--from=") for p in parts):
                for src in srcs:
                    assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            copied[dest] = srcs[0]
    for word, rest in final_stage():
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    assert env[objects.BPF_DIR_ENV] == "/opt/tabby/bpf"
    assert copied["/opt/tabby/bpf/"] == "/src/build/bpf/"  # `make bpf`'s output directory
    # the init containers' commands and the script's default binary are in the image
    script = copied["/usr/local/bin/tabby-install-cni"]
    assert script == "deploy/install-cni.sh"
    assert container("install-cni")["command"] == ["/usr/local/bin/tabby-install-cni"]
    assert container("cni-token")["command"][0] == "/usr/local/bin/tabby-install-cni"
    default_binary = re.search(r"TABBY_CNI_BINARY:-(\S+)\}", INSTALL_CNI.read_text())
    assert default_binary and default_binary[1] in copied


def test_image_and_pod_can_run_the_kube_proxy_cleanup():
    """The hand-over's cleanup (dataplane/kubeproxy.py) needs the iptables and nft tools in the
    image, and the host's xtables lock so its restores wait for kube-proxy's and kubelet's."""
    from tabby.dataplane import kubeproxy

    installs = " ".join(rest for word, rest in final_stage() if word == "RUN")
    assert re.search(r"apt-get install .*\biptables\b", installs)
    assert re.search(r"apt-get install .*\bnftables\b", installs)
    tools = {t for pair in kubeproxy.IPTABLES_TOOLS for t in pair}
    assert all(t.startswith(("iptables-", "ip6tables-")) for t in tools)  # Debian's iptables
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    mounts = {m["mountPath"]: m for m in container("tabby-agent")["volumeMounts"]}
    lock = mounts["/run/xtables.lock"]
    assert volumes[lock["name"]]["hostPath"] == {
        "path": "/run/xtables.lock",
        "type": "FileOrCreate",
    }

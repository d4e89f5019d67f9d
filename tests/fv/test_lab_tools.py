"""The lab's tools, exercised for real: `tabbyctl lab exec`, the tabby-cni executable, the lab's
EndpointSlice controller process and tabbyctl's resource commands against the lab datastore."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from tabby.calc import names
from tabby.cni.plugin import E_INVALID_ENV, E_IO, E_UNKNOWN_CONTAINER
from tabby.lab import fabric
from tabby.lab import pods as lab_pods
from tabby.lab.cluster import Lab
from tabby.model.core import SERVICE_NAME_LABEL
from tabby.preflight import cgroup2_mount

pytestmark = [pytest.mark.root, pytest.mark.lab]

BIN = os.path.dirname(sys.executable)
TABBYCTL = os.path.join(BIN, "tabbyctl")
T = TypeVar("T")


def tabbyctl(*args: str, stdin: str | None = None, env: dict[str, str] | None = None):
    return subprocess.run(
        [TABBYCTL, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, f"want one line on stderr, got: {out.stderr!r}"
    assert "Traceback" not in out.stderr
    return lines[0]


def eventually(fn: Callable[[], T], ok: Callable[[T], bool], what: str, timeout_s=10.0) -> T:
    """Poll ``fn`` until ``ok`` holds (the controller reacts to watch events, so this is quick)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s}s; last seen {value!r}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pods(lab: Lab) -> dict[str, dict[str, Any]]:
    """web1 (node1) and web2 (node2) labelled app=web; solo (node3) keeps its default app=solo;
    idle (node3) is app=web too but runs `pause`, so it declares no container ports."""
    lab.add_pod("web1", "node1", labels={"app": "web"}, wait=False)
    lab.add_pod("web2", "node2", labels={"app": "web"}, wait=False)
    lab.add_pod("solo", "node3", wait=False)
    lab.add_pod("idle", "node3", image="pause", labels={"app": "web"}, wait=False)
    lab.wait_ready()
    return {n: lab.pod(n) for n in ("web1", "web2", "solo", "idle")}


# --- tabbyctl lab exec -------------------------------------------------------------------------


def test_lab_exec_runs_in_the_pods_own_cgroup(lab, pods):
    out = tabbyctl("lab", "exec", "--name", lab.name, "web1", "--", "cat", "/proc/self/cgroup")
    assert out.returncode == 0, out.stderr
    unified = [line for line in out.stdout.splitlines() if line.startswith("0::")]
    mount = cgroup2_mount()
    assert mount is not None
    expected = "/" + os.path.relpath(pods["web1"]["cgroup"], mount)
    assert expected.endswith("/node1/pod-default-web1")
    assert unified == [f"0::{expected}"]


def test_lab_exec_runs_in_the_pods_network_namespace(lab, pods):
    out = tabbyctl(
        "lab", "exec", "--name", lab.name, "web2", "--", "ip", "-4", "-o", "addr", "show", "dev",
        "eth0",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    addrs = [line.split()[3] for line in out.stdout.splitlines()]
    # the node also has an eth0, with its 172.20.x address: only the pod's /32 may show
    assert addrs == [f"{pods['web2']['ip']}/32"]


def test_lab_exec_passes_a_double_dash_inside_the_command_through(lab, pods):
    out = tabbyctl("lab", "exec", "--name", lab.name, "web1", "--", "echo", "a", "--", "b")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "a -- b\n"


def test_lab_exec_of_an_unknown_pod_is_one_line_and_exit_1(lab, pods):
    out = tabbyctl("lab", "exec", "--name", lab.name, "nosuch", "--", "true")
    line = one_line_error(out)
    assert "default/nosuch" in line and lab.name in line
    assert out.stdout == ""


# --- tabby-cni ---------------------------------------------------------------------------------


def cni(lab: Lab, command: str, cid: str, netns: str, pod: str, node: str = "node1"):
    """The tabby-cni executable run as kubelet runs it: in the node's netns, config on stdin."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": cid,
        "CNI_IFNAME": "eth0",
        "CNI_NETNS": f"/run/netns/{netns}",
        "CNI_ARGS": f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}",
        "CNI_PATH": BIN,
    }
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/{lab.plan.node(node).netns}", lab_pods.cni_binary()],
        input=json.dumps(lab_pods.cni_config(lab.name, node)),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def node_links(lab: Lab, node: str = "node1") -> set[str]:
    out = subprocess.run(
        ["nsenter", f"--net=/run/netns/{lab.plan.node(node).netns}", "ip", "-o", "link"],
        capture_output=True,
        text=True,
        check=True,
    )
    return {line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines()}


def handle_holdings(lab: Lab, handle: str) -> list[str]:
    return [
        ip
        for block in lab.datastore().list("IPAMBlock")[0]
        for ip, owner in (block["spec"].get("allocations") or {}).items()
        if owner == handle
    ]


def assert_cni_error(out: subprocess.CompletedProcess[str], code: int) -> dict[str, Any]:
    """The spec's error result: non-zero exit, {cniVersion, code, msg[, details]} on stdout."""
    assert out.returncode != 0
    err = json.loads(out.stdout)
    assert set(err) <= {"cniVersion", "code", "msg", "details"}
    assert err["cniVersion"] == "1.0.0" and isinstance(err["msg"], str) and err["msg"]
    assert err["code"] == code, err
    return dict(err)


class Sandbox:
    """A pod sandbox that is not a lab pod: a netns of the lab's prefix and a fresh container id."""

    def __init__(self, lab: Lab) -> None:
        tag = uuid.uuid4().hex[:6]
        self.lab, self.pod = lab, f"cni-{tag}"
        self.netns, self.cid = f"{lab.name}-cni-{tag}", f"{lab.name}-cni-{tag}"
        self.handle = f"k8s-pod-network.{self.cid}"
        self.host = names.host_ifname("default", self.pod)

    def __call__(self, command: str) -> subprocess.CompletedProcess[str]:
        return cni(self.lab, command, self.cid, self.netns, self.pod)


@pytest.fixture
def sandbox(lab: Lab, pods) -> Iterator[Sandbox]:
    box = Sandbox(lab)
    fabric.add_netns(box.netns)
    try:
        yield box
    finally:
        box("DEL")
        fabric.del_netns(box.netns)
        assert handle_holdings(lab, box.handle) == []
        assert box.host not in node_links(lab)


def test_cni_check_of_a_wired_lab_pod_succeeds(lab, pods):
    rec = pods["web1"]
    out = cni(lab, "CHECK", rec["container_id"], rec["netns"], "web1")
    assert (out.returncode, out.stdout.strip()) == (0, ""), out.stdout + out.stderr
    # the library wrapper the lab uses agrees
    assert (
        lab_pods.run_cni(
            lab.plan, "node1", "CHECK", rec["container_id"], "default", "web1", rec["netns"]
        )
        == {}
    )


def test_cni_add_twice_for_one_container_returns_the_same_ip(lab, sandbox):
    first = sandbox("ADD")
    assert first.returncode == 0, first.stdout + first.stderr
    second = sandbox("ADD")
    assert second.returncode == 0, second.stdout + second.stderr
    ip1 = json.loads(first.stdout)["ips"][0]["address"]
    ip2 = json.loads(second.stdout)["ips"][0]["address"]
    assert ip1 == ip2 and ip1.endswith("/32")
    assert handle_holdings(lab, sandbox.handle) == [ip1.split("/")[0]], "one address per handle"
    assert json.loads(second.stdout)["interfaces"][0]["name"] == sandbox.host
    assert sandbox.host in node_links(lab)
    assert sandbox("CHECK").returncode == 0


def test_cni_check_fails_once_the_host_veth_is_gone(lab, sandbox):
    assert sandbox("ADD").returncode == 0
    assert sandbox("CHECK").returncode == 0
    node_ns = f"/run/netns/{lab.plan.node('node1').netns}"
    subprocess.run(["nsenter", f"--net={node_ns}", "ip", "link", "del", sandbox.host], check=True)
    # the address is still held, so not "unknown container" (3, DEL unneeded): DEL is needed
    err = assert_cni_error(sandbox("CHECK"), E_IO)
    assert sandbox.host in err["msg"]


def test_cni_check_with_a_missing_netns_is_the_spec_error(lab, pods):
    rec = pods["web1"]
    out = cni(lab, "CHECK", rec["container_id"], f"{lab.name}-no-such-ns", "web1")
    err = assert_cni_error(out, E_INVALID_ENV)
    assert "no such network namespace" in err["msg"]
    assert "Traceback" not in out.stderr


def test_cni_del_twice_is_idempotent_and_releases_the_address(lab, sandbox):
    add = sandbox("ADD")
    assert add.returncode == 0, add.stdout + add.stderr
    ip = json.loads(add.stdout)["ips"][0]["address"].split("/")[0]
    assert handle_holdings(lab, sandbox.handle) == [ip]
    first = sandbox("DEL")
    assert (first.returncode, first.stdout.strip()) == (0, ""), first.stdout + first.stderr
    assert handle_holdings(lab, sandbox.handle) == []
    assert sandbox.host not in node_links(lab)
    second = sandbox("DEL")
    assert (second.returncode, second.stdout.strip()) == (0, ""), second.stdout + second.stderr
    # after DEL, CHECK knows nothing of the container: 3, nothing left to clean up
    assert_cni_error(sandbox("CHECK"), E_UNKNOWN_CONTAINER)


# --- the lab's EndpointSlice controller --------------------------------------------------------


def slice_endpoints(lab: Lab, service: str) -> dict[str, set[tuple[str, int, str]]]:
    """address -> {(port name, port, protocol)} over every slice labelled for ``service``."""
    out: dict[str, set[tuple[str, int, str]]] = {}
    for s in lab.datastore().list("EndpointSlice", "default")[0]:
        if s["metadata"].get("labels", {}).get(SERVICE_NAME_LABEL) != service:
            continue
        ports = {(p.get("name", ""), p["port"], p["protocol"]) for p in s.get("ports", [])}
        for ep in s.get("endpoints", []):
            for addr in ep["addresses"]:
                out.setdefault(addr, set()).update(ports)
    return out


def test_controller_keeps_endpointslices_in_step_with_pods(lab, pods):
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "websvc", "namespace": "default"},
        "spec": {
            "selector": {"app": "web"},
            "ports": [
                {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                {"name": "udp", "port": 81, "targetPort": "udp", "protocol": "UDP"},
            ],
        },
    }
    ports = {("http", 8080, "TCP"), ("udp", 8081, "UDP")}
    ds = lab.datastore()
    ds.apply([service])
    try:
        web = {pods["web1"]["ip"]: ports, pods["web2"]["ip"]: ports}
        # idle matches the selector but declares no port named http/udp; solo does not match
        eventually(lambda: slice_endpoints(lab, "websvc"), lambda s: s == web, "slice lists web1+2")

        ip3 = lab.add_pod("web3", "node3", labels={"app": "web"}, wait=False)
        eventually(
            lambda: slice_endpoints(lab, "websvc"),
            lambda s: s == {**web, ip3: ports},
            "a new pod joins the slice",
        )
        lab.del_pod("web3", wait=False)
        eventually(
            lambda: slice_endpoints(lab, "websvc"), lambda s: s == web, "a deleted pod leaves"
        )
    finally:
        ds.delete("Service", "websvc", "default")
    eventually(lambda: slice_endpoints(lab, "websvc"), lambda s: s == {}, "slices go with the svc")
    lab.wait_ready()


# --- tabbyctl against the lab datastore --------------------------------------------------------


def test_get_pods_wide_lists_node_and_ip(lab, pods):
    out = tabbyctl("get", "pods", "-o", "wide", "--datastore", lab.url)
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    cols = header.split()
    assert cols[:5] == ["NAMESPACE", "NAME", "STATUS", "IP", "NODE"] and "LABELS" in cols
    table = {r.split()[1]: r.split() for r in rows}
    assert set(table) == set(pods)
    for name, rec in pods.items():
        assert table[name][0] == "default"
        assert table[name][3:5] == [rec["ip"], rec["node"]]


def test_get_pods_json_is_a_kubectl_list(lab, pods):
    out = tabbyctl("get", "pods", "-o", "json", env={"TABBY_DATASTORE": lab.url})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert (data["apiVersion"], data["kind"]) == ("v1", "List")
    got = {
        i["metadata"]["name"]: (i["kind"], i["spec"]["nodeName"], i["status"]["podIP"])
        for i in data["items"]
    }
    assert got == {n: ("Pod", r["node"], r["ip"]) for n, r in pods.items()}


def test_patch_felixconfiguration_reaches_the_agents(lab, pods):
    ds = lab.datastore()
    before = ds.revision()

    def patch(level: str) -> int:
        change = json.dumps({"spec": {"bpfLogLevel": level}})
        out = tabbyctl("patch", "felixconfiguration", "default", "--patch", change,
                       "--datastore", lab.url)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "felixconfiguration/default patched"
        cfg = ds.get("FelixConfiguration", "default")
        assert cfg is not None and cfg["spec"]["bpfLogLevel"] == level
        assert cfg["spec"]["bpfEnabled"] is True, "a merge patch keeps the other fields"
        return lab.wait_ready(ds.revision(), timeout_s=30)

    try:
        debug_rev = patch("Debug")
        assert debug_rev > before
    finally:
        off_rev = patch("Off")
    assert off_rev > debug_rev
    for node in lab.plan.nodes:
        assert int(lab.readyz(node)["revision"]) >= off_rev


def test_apply_malformed_yaml_is_one_line_and_writes_nothing(lab, pods):
    before = lab.datastore().revision()
    out = tabbyctl(
        "apply", "-f", "-", "--datastore", lab.url,
        stdin="apiVersion: v1\nkind: Service\nmetadata: {name: broken\n",
    )  # fmt: skip
    line = one_line_error(out)
    assert line.startswith("error: <stdin>: document 1")
    assert out.stdout == ""
    assert lab.datastore().revision() == before


def test_apply_unknown_field_is_one_line_and_writes_nothing(lab, pods):
    before = lab.datastore().revision()
    manifest = (
        "apiVersion: v1\nkind: Service\nmetadata: {name: fine, namespace: default}\n"
        "spec: {selector: {app: web}, ports: [{port: 80}]}\n"
        "---\n"
        "apiVersion: v1\nkind: Service\nmetadata: {name: odd, namespace: default}\n"
        "spec: {ports: [{port: 80}], bogusField: 1}\n"
    )
    out = tabbyctl("apply", "-f", "-", "--datastore", lab.url, stdin=manifest)
    line = one_line_error(out)
    assert "bogusField" in line and "unknown field" in line
    assert out.stdout == ""
    ds = lab.datastore()
    assert ds.revision() == before, "apply is all or nothing: the valid first document too"
    assert ds.get("Service", "fine", "default") is None

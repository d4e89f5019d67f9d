"""Service admission in the embedded datastore: cluster IP and node port allocation, checks,
immutability, type changes, atomicity, and allocation racing across processes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer
import yaml
from typer.testing import CliRunner

from tabby.cli import resources
from tabby.datastore import DatastoreError, open_datastore
from tabby.datastore.embedded import EmbeddedDatastore
from tabby.model import ValidationError, validate

# Dynamic allocation starts above the static band (kube-apiserver, KEP-3070/3668):
FIRST_IP = "100.64.1.1"  # 100.64.0.0/13: network + 1 + 256
FIRST_PORT = 30086  # 30000 + 2768 // 32


def svc(name: str, ports: list[dict] | None = None, ns: str = "default", **spec) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"ports": [{"port": 80}] if ports is None else ports, **spec},
    }


@pytest.fixture
def ds(tmp_path):
    store = EmbeddedDatastore(tmp_path / "s.db")
    yield store
    store.close()


def spec_of(ds, name: str, ns: str = "default") -> dict:
    obj = ds.get("Service", name, ns)
    assert obj is not None
    return obj["spec"]


def node_ports(spec: dict) -> list[int | None]:
    return [p.get("nodePort") for p in spec["ports"]]


def rejected(ds, *objs) -> str:
    with pytest.raises(ValidationError) as err:
        ds.apply(list(objs))
    return str(err.value)


# --- cluster IPs -------------------------------------------------------------------------------


def test_cluster_ip_allocated_and_clusterips_follow(ds):
    ds.apply([svc("a"), svc("b", clusterIP="")])
    assert spec_of(ds, "a")["clusterIP"] == FIRST_IP
    assert spec_of(ds, "a")["clusterIPs"] == [FIRST_IP]
    assert spec_of(ds, "b")["clusterIPs"] == ["100.64.1.2"]
    created = ds.create(svc("c"))
    assert created["spec"]["clusterIP"] == "100.64.1.3"


def test_first_address_is_kept_for_default_kubernetes(ds):
    msg = rejected(ds, svc("web", clusterIP="100.64.0.1"))
    assert "spec.clusterIP: 100.64.0.1 is reserved for default/kubernetes" in msg
    ds.apply([svc("kubernetes", ports=[{"name": "https", "port": 443}])])
    assert spec_of(ds, "kubernetes")["clusterIP"] == "100.64.0.1"


def test_explicit_ip_must_be_free_and_in_the_cidr(ds):
    ds.apply([svc("web", clusterIP="100.64.0.10")])
    assert spec_of(ds, "web")["clusterIPs"] == ["100.64.0.10"]
    msg = rejected(ds, svc("dns", ns="kube-system", clusterIP="100.64.0.10"))
    assert msg == (
        "Service kube-system/dns: spec.clusterIP: 100.64.0.10 is already allocated to default/web"
    )
    for outside in ("10.0.0.10", "100.64.0.0", "100.71.255.255", "100.72.0.1", "fd00::1"):
        msg = rejected(ds, svc("x", clusterIP=outside))
        assert f"spec.clusterIP: {outside} is not in the service CIDR 100.64.0.0/13" in msg
    assert "single-stack" in rejected(ds, svc("x", clusterIPs=["100.64.0.11", "fd00::1"]))


def test_dynamic_allocation_skips_explicit_and_deleted_ips_are_reused(ds):
    ds.apply([svc("fixed", clusterIP=FIRST_IP)])
    ds.apply([svc("a")])
    assert spec_of(ds, "a")["clusterIP"] == "100.64.1.2"
    ds.delete("Service", "fixed")
    ds.apply([svc("b")])
    assert spec_of(ds, "b")["clusterIP"] == FIRST_IP


def test_cluster_ip_is_immutable_and_kept_when_left_out(ds):
    ds.apply([svc("web")])
    assert ds.apply_with_outcomes([svc("web")])[1] == ["unchanged"]
    assert ds.apply_with_outcomes([svc("web", clusterIP="")])[1] == ["unchanged"]
    msg = rejected(ds, svc("web", clusterIP="100.64.0.20"))
    assert f"spec.clusterIP: field is immutable (it is {FIRST_IP})" in msg
    with pytest.raises(ValidationError, match="spec.clusterIPs.0.: must equal spec.clusterIP"):
        ds.patch("Service", "web", "default", {"spec": {"clusterIP": "100.64.0.20"}})
    change = {"clusterIP": "100.64.0.20", "clusterIPs": ["100.64.0.20"]}
    with pytest.raises(ValidationError, match="immutable"):
        ds.patch("Service", "web", "default", {"spec": change})
    with pytest.raises(ValidationError, match="immutable"):
        ds.patch("Service", "web", "default", {"spec": {"clusterIP": "None", "clusterIPs": None}})
    stored = ds.get("Service", "web", "default")
    new = svc("web", ports=[{"port": 8080}])
    new["metadata"]["resourceVersion"] = stored["metadata"]["resourceVersion"]
    assert ds.update(new)["spec"]["clusterIP"] == FIRST_IP


def test_headless_holds_no_address(ds):
    ds.apply([svc("h", clusterIP="None", selector={"app": "h"}), svc("a")])
    assert spec_of(ds, "h")["clusterIPs"] == ["None"]
    assert spec_of(ds, "a")["clusterIP"] == FIRST_IP
    assert ds.apply_with_outcomes([svc("h", selector={"app": "h"})])[1] == ["unchanged"]
    msg = rejected(ds, svc("np", clusterIP="None", type="NodePort"))
    assert "spec.clusterIP: may not be None (headless) for type NodePort" in msg


def test_small_cidr_runs_out_with_a_clear_error(tmp_path):
    ds = EmbeddedDatastore(tmp_path / "s.db", service_cidr="10.0.0.0/29")  # .1 kept: .2-.6
    ds.apply([svc(f"s{i}") for i in range(5)])
    assert {spec_of(ds, f"s{i}")["clusterIP"] for i in range(5)} == {
        f"10.0.0.{i}" for i in range(2, 7)
    }
    assert "spec.clusterIP: no free address left in 10.0.0.0/29" in rejected(ds, svc("s5"))


def test_service_cidr_from_the_url(tmp_path):
    ds = open_datastore(f"sqlite://{tmp_path}/s.db?service-cidr=10.96.0.0/12")
    ds.apply([svc("a")])
    assert spec_of(ds, "a")["clusterIP"] == "10.96.1.1"
    with pytest.raises(DatastoreError, match="unknown option 'service-cdir'"):
        open_datastore(f"sqlite://{tmp_path}/s.db?service-cdir=10.96.0.0/12")
    with pytest.raises(DatastoreError, match="service CIDR"):
        open_datastore(f"sqlite://{tmp_path}/s.db?service-cidr=10.96.0.1/12")


# --- node ports --------------------------------------------------------------------------------


def test_node_ports_allocated(ds):
    two = [{"name": "http", "port": 80}, {"name": "https", "port": 443}]
    ds.apply([svc("a", type="NodePort", ports=two), svc("b", type="LoadBalancer")])
    assert node_ports(spec_of(ds, "a")) == [FIRST_PORT, FIRST_PORT + 1]
    assert node_ports(spec_of(ds, "b")) == [FIRST_PORT + 2]
    assert "healthCheckNodePort" not in spec_of(ds, "b")  # externalTrafficPolicy Cluster
    ds.apply([svc("c", type="LoadBalancer", allocateLoadBalancerNodePorts=False)])
    assert node_ports(spec_of(ds, "c")) == [None]


def test_explicit_node_port_clashes_with_another_service_whatever_the_protocol(ds):
    ds.apply([svc("a", type="NodePort", ports=[{"port": 80, "nodePort": 30080}])])
    msg = rejected(ds, svc("b", type="NodePort", ports=[{"port": 81, "nodePort": 30080}]))
    assert msg == (
        "Service default/b: spec.ports[0].nodePort: 30080 is already allocated to default/a"
    )
    # kube-apiserver keeps one node-port pool for every protocol: UDP cannot take it either.
    udp = [{"port": 80, "protocol": "UDP", "nodePort": 30080}]
    assert "already allocated to default/a" in rejected(ds, svc("b", type="NodePort", ports=udp))


def test_one_port_number_shares_its_node_port_across_protocols(ds):
    dns = [
        {"name": "dns", "port": 53, "protocol": "UDP"},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
    ]
    ds.apply([svc("dns", type="NodePort", ports=dns)])
    assert node_ports(spec_of(ds, "dns")) == [FIRST_PORT, FIRST_PORT]
    explicit = [{**p, "nodePort": 30053} for p in dns]
    ds.apply([svc("dns2", type="NodePort", ports=explicit)])
    assert node_ports(spec_of(ds, "dns2")) == [30053, 30053]
    other = [{"name": "a", "port": 80, "nodePort": 30054}, {"name": "b", "port": 81}]
    other[1]["nodePort"] = 30054
    msg = rejected(ds, svc("x", type="NodePort", ports=other))
    assert "spec.ports[1].nodePort: 30054 is already used by spec.ports[0]" in msg
    same = [{"name": "a", "port": 80}, {"name": "b", "port": 80}]
    msg = rejected(ds, svc("x", type="NodePort", ports=same))
    assert "spec.ports[1]: duplicate port 80/TCP (as spec.ports[0])" in msg


def test_update_keeps_node_ports_of_ports_that_remain(ds):
    ports = [{"name": "http", "port": 80}, {"name": "https", "port": 443}]
    ds.apply([svc("a", type="NodePort", ports=ports)])
    http, https = node_ports(spec_of(ds, "a"))
    assert ds.apply_with_outcomes([svc("a", type="NodePort", ports=ports)])[1] == ["unchanged"]
    # https renamed (matched by port number and protocol), http dropped: its node port is free
    ds.apply([svc("a", type="NodePort", ports=[{"name": "tls", "port": 443}])])
    assert node_ports(spec_of(ds, "a")) == [https]
    ds.apply([svc("b", type="NodePort", ports=[{"port": 80, "nodePort": http}])])
    added = [{"name": "tls", "port": 443}, {"name": "metrics", "port": 9090}]
    ds.apply([svc("a", type="NodePort", ports=added)])
    assert node_ports(spec_of(ds, "a")) == [https, https + 1]
    kept = spec_of(ds, "a")["ports"]
    labelled = ds.patch("Service", "a", "default", {"metadata": {"labels": {"x": "y"}}})
    assert labelled["spec"]["ports"] == kept


def test_type_change_to_cluster_ip_drops_node_ports(ds):
    lb = {"type": "LoadBalancer", "externalTrafficPolicy": "Local"}
    ds.apply([svc("a", type="NodePort"), svc("b", **lb)])
    ip_a, ip_b = spec_of(ds, "a")["clusterIP"], spec_of(ds, "b")["clusterIP"]
    ds.apply([svc("a")])  # apply: the manifest has no nodePort
    assert node_ports(spec_of(ds, "a")) == [None]
    assert spec_of(ds, "a")["clusterIP"] == ip_a
    patched = ds.patch("Service", "b", "default", {"spec": {"type": "ClusterIP"}})["spec"]
    assert node_ports(patched) == [None] and patched["clusterIP"] == ip_b
    assert "externalTrafficPolicy" not in patched and "healthCheckNodePort" not in patched
    ds.apply([svc("c", type="NodePort", ports=[{"port": 80, "nodePort": FIRST_PORT}])])  # freed


def test_type_change_to_external_name_releases_the_address(ds):
    ds.apply([svc("a")])
    ds.patch("Service", "a", "default", {"spec": {"type": "ExternalName", "externalName": "x.y"}})
    assert "clusterIP" not in spec_of(ds, "a")
    ds.apply([svc("b", clusterIP=FIRST_IP)])
    msg = rejected(ds, svc("e", type="ExternalName", externalName="x.y", clusterIP="100.64.0.9"))
    assert "spec.clusterIP: may not be set for type ExternalName" in msg
    ds.patch("Service", "a", "default", {"spec": {"type": "ClusterIP", "externalName": None}})
    assert spec_of(ds, "a")["clusterIP"] == "100.64.1.2"


# --- health-check node port --------------------------------------------------------------------


def test_health_check_node_port_only_for_load_balancer_with_local_policy(ds):
    local = {"externalTrafficPolicy": "Local"}
    ds.apply([svc("np", type="NodePort", **local), svc("lb", type="LoadBalancer", **local)])
    assert "healthCheckNodePort" not in spec_of(ds, "np")  # kube-apiserver's rule
    assert spec_of(ds, "lb")["healthCheckNodePort"] == FIRST_PORT + 2
    ds.apply([svc("lb", type="LoadBalancer", **local)])  # an update keeps it
    assert spec_of(ds, "lb")["healthCheckNodePort"] == FIRST_PORT + 2
    no_ports = {"type": "LoadBalancer", "allocateLoadBalancerNodePorts": False, **local}
    ds.apply([svc("lb2", **no_ports)])
    assert node_ports(spec_of(ds, "lb2")) == [None]
    assert spec_of(ds, "lb2")["healthCheckNodePort"] == FIRST_PORT + 3
    msg = rejected(ds, svc("x", type="NodePort", healthCheckNodePort=30500))
    assert "spec.healthCheckNodePort: only for type LoadBalancer with externalTrafficPolicy" in msg


def test_health_check_node_port_clashes(ds):
    lb = {"type": "LoadBalancer", "externalTrafficPolicy": "Local"}
    ds.apply([svc("a", type="NodePort", ports=[{"port": 80, "nodePort": 30080}])])
    msg = rejected(ds, svc("b", healthCheckNodePort=30080, **lb))
    assert "spec.healthCheckNodePort: 30080 is already allocated to default/a" in msg
    own = [{"port": 80, "nodePort": 30081}]
    msg = rejected(ds, svc("b", ports=own, healthCheckNodePort=30081, **lb))
    assert "spec.healthCheckNodePort: 30081 is already used by spec.ports[0]" in msg
    msg = rejected(ds, svc("b", healthCheckNodePort=8080, **lb))
    assert "spec.healthCheckNodePort: 8080 is not in the node port range 30000-32767" in msg
    # an explicit health-check port is not handed to the Service's own ports
    ds.apply([svc("c", healthCheckNodePort=FIRST_PORT, **lb)])
    assert node_ports(spec_of(ds, "c")) == [FIRST_PORT + 1]
    assert spec_of(ds, "c")["healthCheckNodePort"] == FIRST_PORT


# --- atomicity and races -----------------------------------------------------------------------


def test_one_rejected_service_leaves_nothing_written(ds):
    ds.apply([svc("web", clusterIP="100.64.0.10")])
    before = ds.revision()
    pool = {
        "apiVersion": "projectcalico.org/v3",
        "kind": "IPPool",
        "metadata": {"name": "pods"},
        "spec": {"cidr": "100.96.0.0/11"},
    }
    batch = [pool, svc("good"), svc("bad", clusterIP="100.64.0.10"), svc("later")]
    assert "already allocated to default/web" in rejected(ds, *batch)
    assert ds.revision() == before
    assert ds.get("Service", "good", "default") is None and ds.list("IPPool")[0] == []
    ds.apply([svc("good")])  # nothing was held by the rolled-back write
    assert spec_of(ds, "good")["clusterIP"] == FIRST_IP


WRITER = """
import sys, time
from tabby.datastore.embedded import EmbeddedDatastore
ds = EmbeddedDatastore(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()  # both start together, so their writes interleave
for i in range(int(sys.argv[3])):
    ds.apply([{"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": f"{sys.argv[2]}-{i}"},
               "spec": {"type": "NodePort", "ports": [{"port": 80}]}}])
    time.sleep(0.002)  # let the other writer in between (SQLite's busy wait backs off)
"""


def test_two_processes_never_hand_out_the_same_address_or_port(ds):
    count = 50
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(ds.path), name, str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("left", "right")
    ]
    try:
        for w in writers:
            assert w.stdout is not None and w.stdout.readline().strip() == "ready"
        for w in writers:
            assert w.stdin is not None
            w.stdin.write("go\n")
            w.stdin.flush()
        assert [w.wait(timeout=120) for w in writers] == [0, 0]
    finally:
        for w in writers:
            w.kill()
    services, _ = ds.list("Service")
    assert len(services) == 2 * count
    ips = {s["spec"]["clusterIP"] for s in services}
    ports = {s["spec"]["ports"][0]["nodePort"] for s in services}
    assert len(ips) == len(ports) == 2 * count
    by_revision = sorted(services, key=lambda s: int(s["metadata"]["resourceVersion"]))
    turns = sum(
        a["metadata"]["name"][:4] != b["metadata"]["name"][:4]
        for a, b in zip(by_revision, by_revision[1:], strict=False)
    )
    print(f"writers took turns {turns} times")
    assert turns > 0


# --- model validation the admission relies on --------------------------------------------------


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (0, "spec.ports[0].targetPort: must be an integer 1-65535"),
        (65536, "spec.ports[0].targetPort: must be an integer 1-65535"),
        ("0", "spec.ports[0].targetPort: must be an integer 1-65535"),
        ("a--b", "spec.ports[0].targetPort: 'a--b' is not a valid port name"),
        ("-http", "spec.ports[0].targetPort: '-http' is not a valid port name"),
        ("HTTP", "spec.ports[0].targetPort: 'HTTP' is not a valid port name"),
        ("a-very-long-name", "spec.ports[0].targetPort: 'a-very-long-name' is not a valid"),
        (True, "spec.ports[0].targetPort: must be a port number 1-65535 or a port name"),
    ],
)
def test_bad_target_port_is_rejected_naming_the_field(target, message):
    with pytest.raises(ValidationError) as err:
        validate(svc("web", ports=[{"port": 80, "targetPort": target}]))
    assert message in str(err.value)


def test_selectorless_service_with_hand_made_endpointslice(ds):
    slice_ = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "ext-1", "labels": {"kubernetes.io/service-name": "ext"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["192.0.2.10"]}],
        "ports": [{"name": "", "port": 8080}],
    }
    ds.apply([svc("ext", ports=[{"port": 80, "targetPort": 8080}]), slice_])
    assert "selector" not in spec_of(ds, "ext") and spec_of(ds, "ext")["clusterIP"] == FIRST_IP
    assert ds.get("EndpointSlice", "ext-1", "default") is not None


# --- tabbyctl ----------------------------------------------------------------------------------


def test_tabbyctl_get_shows_allocated_values(tmp_path, monkeypatch):
    monkeypatch.setenv("TABBY_DATASTORE", f"sqlite://{tmp_path}/store.db")
    app = typer.Typer()
    resources.register(app)
    runner = CliRunner()
    manifest = tmp_path / "svc.yaml"
    manifest.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
        "spec: {type: NodePort, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n"
    )
    out = runner.invoke(app, ["apply", "-f", str(manifest)])
    assert out.exit_code == 0 and "service/web created" in out.stdout, out.output
    shown = yaml.safe_load(runner.invoke(app, ["get", "service", "web", "-o", "yaml"]).stdout)
    assert shown["spec"]["clusterIP"] == FIRST_IP and shown["spec"]["clusterIPs"] == [FIRST_IP]
    assert shown["spec"]["ports"][0]["nodePort"] == FIRST_PORT
    assert "service/web unchanged" in runner.invoke(app, ["apply", "-f", str(manifest)]).stdout
    assert f"80:{FIRST_PORT}/TCP" in runner.invoke(app, ["get", "svc"]).stdout


# --- dual-stack service CIDR ---------------------------------------------------------------------


@pytest.fixture
def ds2(tmp_path):
    store = EmbeddedDatastore(tmp_path / "d.db", service_cidr="100.64.0.0/13,fd00:64::/108")
    yield store
    store.close()


def test_dual_stack_cidr_gives_each_service_the_families_it_asks_for(ds2):
    ds2.apply([
        svc("v4"),
        svc("v6", ipFamilies=["IPv6"]),
        svc("both", ipFamilyPolicy="PreferDualStack"),
        svc("six-first", ipFamilies=["IPv6", "IPv4"], ipFamilyPolicy="RequireDualStack"),
        svc("pinned", clusterIPs=["100.64.0.20", "fd00:64::20"], ipFamilyPolicy="RequireDualStack"),
    ])  # fmt: skip
    assert spec_of(ds2, "v4")["clusterIPs"] == [FIRST_IP]
    v6 = spec_of(ds2, "v6")
    assert v6["clusterIP"] == v6["clusterIPs"][0] and v6["clusterIP"].startswith("fd00:64::")
    four, six = spec_of(ds2, "both")["clusterIPs"]
    assert "." in four and six.startswith("fd00:64::") and six != v6["clusterIP"]
    first, second = spec_of(ds2, "six-first")["clusterIPs"]
    assert ":" in first and "." in second
    assert spec_of(ds2, "pinned")["clusterIPs"] == ["100.64.0.20", "fd00:64::20"]
    msg = rejected(ds2, svc("dup", clusterIP="fd00:64::20"))
    assert "spec.clusterIP: fd00:64::20 is already allocated to default/pinned" in msg


def test_an_unconfigured_family_names_the_field(ds, tmp_path):
    msg = rejected(ds, svc("x", ipFamilies=["IPv6"]))
    assert "spec.ipFamilies[0]: IPv6 is not configured (service CIDR 100.64.0.0/13)" in msg
    msg = rejected(ds, svc("y", ipFamilyPolicy="RequireDualStack"))
    assert "spec.ipFamilyPolicy: RequireDualStack: the service CIDR is single-stack" in msg
    assert spec_of_applied(ds, svc("z", ipFamilyPolicy="PreferDualStack"))["clusterIPs"] == [
        FIRST_IP
    ], "PreferDualStack on a single-stack CIDR: one address"
    with pytest.raises(DatastoreError, match="one IPv4 and one IPv6"):
        EmbeddedDatastore(tmp_path / "bad.db", service_cidr="fd00:1::/108,fd00:2::/108")


def spec_of_applied(ds, obj: dict) -> dict:
    ds.apply([obj])
    return spec_of(ds, obj["metadata"]["name"])

"""kOps cluster specs: every validation rule on the example manifest and broken variants, the
rendering (applied to an embedded datastore and read back), the CLI, and the lab plan a spec means.
"""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from tabby.calc import mtu
from tabby.cli.main import app
from tabby.datastore import open_datastore
from tabby.lab import topology
from tabby.lab.cluster import base_resources, spec_resources
from tabby.model import kops

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "kops-demo-cluster.yaml"
CALICO = "spec.networking.calico"


def example() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(EXAMPLE.read_text()))


def variant(calico: dict[str, Any] | None = None, **spec: Any) -> list[dict[str, Any]]:
    """The example with ``spec.networking.calico`` replaced and top-level spec fields set
    (a value of None removes the field)."""
    docs = example()
    cl = docs[0]["spec"]
    if calico is not None:
        cl["networking"]["calico"] = calico
    for key, value in spec.items():
        if value is None:
            cl.pop(key, None)
        else:
            cl[key] = value
    return docs


def errors(docs: list[Any]) -> dict[str, str]:
    return {e.path: e.message for e in kops.parse(docs).errors}


def warnings(docs: list[Any]) -> dict[str, str]:
    return {w.path: w.message for w in kops.parse(docs).warnings}


def calico(docs: list[Any]) -> kops.CalicoSpec:
    result = kops.parse(docs)
    assert result.ok, result.errors
    assert result.cluster is not None
    return result.cluster.calico


BPF = {"bpfEnabled": True}  # with the example's kubeProxy.enabled: false


# --- the example ------------------------------------------------------------------------------


def test_the_example_validates_with_its_warnings():
    result = kops.parse(example())
    assert result.ok, [str(e) for e in result.errors]
    c = result.cluster
    assert c is not None
    assert (c.name, c.nodes, c.cloud_provider) == ("demo.k8s.local", 2, "aws")
    assert (c.pod_cidr, c.service_cidr) == ("100.96.0.0/11", "100.64.0.0/13")  # kOps' defaults
    assert c.calico.encapsulation == "vxlan" and c.calico.backend == "vxlan"
    assert (c.calico.vxlan_mode, c.calico.ipip_mode) == ("CrossSubnet", "Never")
    w = warnings(example())
    assert "disruptive" in w[f"{CALICO}.bpfEnabled"]
    assert "no effect off AWS" in w[f"{CALICO}.awsSrcDstCheck"]
    # DSR with awsSrcDstCheck: Disable, as seed 004 asks: nothing to warn about
    assert f"{CALICO}.bpfExternalServiceMode" not in w
    assert all(str(p).startswith("Cluster demo.k8s.local: ") for p in result.warnings)


def test_fields_kops_has_but_tabby_does_not_model_are_accepted_as_is():
    docs = variant(somethingNew={"a": 1}, additionalPolicies={"node": "[]"})
    assert errors(docs) == {}


def test_dsr_without_awssrcdstcheck_disable_warns_that_sources_are_checked():
    w = warnings(variant({**BPF, "bpfExternalServiceMode": "DSR"}))
    assert "awsSrcDstCheck: Disable" in w[f"{CALICO}.bpfExternalServiceMode"]
    tunnel = warnings(variant({**BPF, "bpfExternalServiceMode": "Tunnel"}))
    assert f"{CALICO}.bpfExternalServiceMode" not in tunnel


# --- encapsulation ----------------------------------------------------------------------------


def test_encapsulation_defaults_to_ipip_cross_subnet_with_the_bgp_backend():
    c = calico(variant({**BPF}))
    assert (c.encapsulation, c.ipip_mode, c.vxlan_mode, c.backend) == (
        "ipip",
        "CrossSubnet",
        "Never",
        "bird",
    )
    assert f"{CALICO}.encapsulationMode" not in warnings(variant({**BPF})), "BIRD runs now"


def test_vxlan_defaults_to_cross_subnet():
    c = calico(variant({**BPF, "encapsulationMode": "vxlan"}))
    assert (c.vxlan_mode, c.ipip_mode, c.backend) == ("CrossSubnet", "Never", "vxlan")


@pytest.mark.parametrize("mode", ["Never", "Always", "CrossSubnet"])
def test_every_encapsulation_mode_is_accepted(mode):
    assert (
        calico(variant({**BPF, "encapsulationMode": "vxlan", "vxlanMode": mode})).vxlan_mode == mode
    )
    assert calico(variant({**BPF, "ipipMode": mode})).ipip_mode == mode


@pytest.mark.parametrize(
    "field,value",
    [
        ("encapsulationMode", "gre"),
        ("encapsulationMode", "VXLAN"),
        ("ipipMode", "Sometimes"),
        ("vxlanMode", "always"),
    ],
)
def test_bad_encapsulation_values_name_the_field(field, value):
    err = errors(variant({**BPF, "encapsulationMode": "vxlan", field: value}))
    assert f"{CALICO}.{field}" in err and "must be one of" in err[f"{CALICO}.{field}"]


def test_ip_in_ip_needs_the_bgp_backend_which_vxlan_does_not_run():
    err = errors(variant({**BPF, "encapsulationMode": "vxlan", "ipipMode": "Always"}))
    assert "BGP" in err[f"{CALICO}.ipipMode"]
    assert errors(variant({**BPF, "encapsulationMode": "vxlan", "ipipMode": "Never"})) == {}


def test_vxlan_mode_with_ipip_encapsulation_is_an_error():
    err = errors(variant({**BPF, "encapsulationMode": "ipip", "vxlanMode": "Always"}))
    assert "encapsulationMode: vxlan" in err[f"{CALICO}.vxlanMode"]


def test_never_warns_that_routes_need_bgp():
    w = warnings(variant({**BPF, "encapsulationMode": "vxlan", "vxlanMode": "Never"}))
    assert "BGP" in w[f"{CALICO}.vxlanMode"]


def test_never_with_the_bird_backend_routes_over_bgp_without_a_warning():
    w = warnings(variant({**BPF, "ipipMode": "Never"}))
    assert f"{CALICO}.ipipMode" not in w and f"{CALICO}.encapsulationMode" not in w
    assert calico(variant({**BPF, "ipipMode": "Never"})).backend == "bird"


def test_deprecated_cross_subnet_flag():
    c = calico(variant({**BPF, "crossSubnet": False}))
    assert c.ipip_mode == "Always"
    assert "deprecated" in warnings(variant({**BPF, "crossSubnet": True}))[f"{CALICO}.crossSubnet"]


IPV6 = {"nonMasqueradeCIDR": "::/0", "podCIDR": "2001:db8:1::/64", "networkCIDR": None}


def test_ipv6_clusters_use_no_encapsulation():
    c = calico(variant({**BPF}, **IPV6))
    assert (c.encapsulation, c.ipip_mode, c.vxlan_mode) == ("none", "Never", "Never")
    for field, value in (
        ("encapsulationMode", "vxlan"),
        ("vxlanMode", "CrossSubnet"),
        ("ipipMode", "Always"),
    ):
        err = errors(variant({**BPF, field: value}, **IPV6))
        assert "IPv6 clusters use no encapsulation" in err[f"{CALICO}.{field}"]


def test_wireguard_is_ipv4_only():
    err = errors(variant({**BPF, "wireguardEnabled": True}, **IPV6))
    assert "IPv4 only" in err[f"{CALICO}.wireguardEnabled"]
    c = calico(variant({**BPF, "encapsulationMode": "vxlan", "wireguardEnabled": True}))
    assert c.wireguard
    w = warnings(variant({**BPF, "wireguardEnabled": True}))
    assert "NOT" not in w[f"{CALICO}.wireguardEnabled"]  # a warning, not an error
    assert "unencrypted" in w[f"{CALICO}.wireguardEnabled"]


# --- eBPF dataplane and kube-proxy --------------------------------------------------------------


def test_bpf_needs_kube_proxy_disabled():
    for kube_proxy in (None, {"enabled": True}, {}):
        err = errors(variant(kubeProxy=kube_proxy))
        assert "spec.kubeProxy.enabled" in err, kube_proxy
    assert errors(variant(kubeProxy={"enabled": "no"}))["spec.kubeProxy.enabled"].startswith(
        "must be a boolean"
    )


def test_no_bpf_and_no_kube_proxy_warns():
    w = warnings(variant({"encapsulationMode": "vxlan"}))
    assert "nothing implements Services" in w["spec.kubeProxy.enabled"]


@pytest.mark.parametrize(
    "field,good,bad",
    [
        ("bpfExternalServiceMode", "Tunnel", "Direct"),
        ("bpfLogLevel", "Debug", "Verbose"),
        ("awsSrcDstCheck", "DoNothing", "Off"),
    ],
)
def test_bpf_and_cloud_enums(field, good, bad):
    assert errors(variant({**BPF, "encapsulationMode": "vxlan", field: good})) == {}
    assert f"{CALICO}.{field}" in errors(variant({**BPF, "encapsulationMode": "vxlan", field: bad}))


def test_aws_src_dst_check_off_aws_says_it_has_no_effect():
    w = warnings(variant({**BPF, "awsSrcDstCheck": "Disable"}, cloudProvider="gce"))
    assert (
        "no effect off AWS" in w[f"{CALICO}.awsSrcDstCheck"]
        and "gce" in w[f"{CALICO}.awsSrcDstCheck"]
    )


# --- MTU, Typha -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, "1500", 1.5, True, 100, 70000])
def test_mtu_must_be_positive_or_empty(value):
    assert f"{CALICO}.mtu" in errors(variant({**BPF, "mtu": value}))


def test_mtu_empty_is_auto_and_a_value_overrides_every_encapsulation():
    assert calico(variant({**BPF, "mtu": None})).mtu is None
    result = kops.parse(variant({**BPF, "encapsulationMode": "vxlan", "mtu": 8981}))
    assert result.cluster is not None
    felix = kops.render(result.cluster)[0]["spec"]
    assert felix["vxlanMTU"] == felix["ipipMTU"] == felix["wireguardMTU"] == 8981


def nodes_group(size: int) -> dict[str, Any]:
    g = copy.deepcopy(example()[2])
    g["spec"]["minSize"] = g["spec"]["maxSize"] = size
    return g


@pytest.mark.parametrize(
    "size,expect", [(40, None), (60, "recommended above 50"), (150, "strongly recommended")]
)
def test_typha_recommendations_by_node_count(size, expect):
    docs = example()[:2] + [nodes_group(size)]
    got = warnings(docs).get(f"{CALICO}.typhaReplicas")
    assert (got is None) if expect is None else (expect in got)
    docs[0]["spec"]["networking"]["calico"]["typhaReplicas"] = 3
    assert "recommended" not in (warnings(docs).get(f"{CALICO}.typhaReplicas") or "")
    docs[0]["spec"]["networking"]["calico"]["typhaReplicas"] = -1
    assert f"{CALICO}.typhaReplicas" in errors(docs)


# --- field names ------------------------------------------------------------------------------


def test_unknown_calico_fields_are_errors_naming_them():
    err = errors(variant({**BPF, "encapsulationMode": "vxlan", "bgpMesh": True}))
    assert err == {f"{CALICO}.bgpMesh": "unknown field (not a kOps Calico setting)"}


def test_kops_docs_spelling_ipipmode_is_read_case_insensitively():
    docs = variant({**BPF, "IPIPMode": "Always"})
    assert calico(docs).ipip_mode == "Always"
    assert "ipipMode" in warnings(docs)[f"{CALICO}.IPIPMode"]


def test_kops_fields_without_effect_are_accepted_with_a_warning():
    docs = variant({**BPF, "chainInsertMode": "append", "cpuRequest": "100m"})
    assert "no effect" in warnings(docs)[f"{CALICO}.chainInsertMode"]


def test_networking_must_be_calico():
    assert "spec.networking.calico" in errors(variant(networking={"cilium": {}}))
    err = errors(variant(networking={"calico": {**BPF}, "cilium": {}}))
    assert "spec.networking.cilium" in err


# --- cluster-wide fields and instance groups --------------------------------------------------


def test_cidrs_are_checked_against_each_other():
    err = errors(variant(podCIDR="10.0.0.0/16"))
    assert "inside nonMasqueradeCIDR" in err["spec.podCIDR"]
    err = errors(variant(subnets=[{"name": "a", "cidr": "10.1.0.0/19"}]))
    assert "outside networkCIDR" in err["spec.subnets[0].cidr"]
    assert (
        "overlaps" in errors(variant(nonMasqueradeCIDR="172.20.0.0/12"))["spec.nonMasqueradeCIDR"]
    )
    assert "not a valid CIDR" in errors(variant(networkCIDR="172.20.0.0/33"))["spec.networkCIDR"]


def test_instance_groups_are_checked():
    docs = example()
    docs[2]["spec"]["subnets"] = ["us-east-1z"]
    docs[1]["spec"]["role"] = "Worker"
    docs[1]["spec"]["maxSize"] = 0
    problems = {str(e) for e in kops.parse(docs).errors}
    assert any(p.startswith("InstanceGroup nodes-us-east-1a: spec.subnets[0]") for p in problems)
    assert any(p.startswith("InstanceGroup master-us-east-1a: spec.role") for p in problems)
    assert any(p.startswith("InstanceGroup master-us-east-1a: spec.maxSize") for p in problems)


def test_documents_need_one_cluster_of_the_kops_api():
    assert kops.parse(example()[1:]).errors[0].message.startswith("needs exactly one")
    docs = example()
    docs[1]["apiVersion"] = "kops.k8s.io/v1alpha3"
    assert [str(e) for e in kops.parse(docs).errors] == [
        "document 2: apiVersion: must be kops.k8s.io/v1alpha2, got 'kops.k8s.io/v1alpha3'"
    ]


# --- rendering --------------------------------------------------------------------------------


def test_render_applies_to_a_datastore_and_reads_back(tmp_path):
    result = kops.parse(example())
    assert result.cluster is not None
    ds = open_datastore(f"sqlite://{tmp_path}/store.db")
    ds.apply(kops.render(result.cluster))
    felix = ds.get("FelixConfiguration", "default")
    pool = ds.get("IPPool", "default-ipv4-ippool")
    assert felix is not None and pool is not None
    assert felix["spec"]["bpfEnabled"] is True
    assert felix["spec"]["bpfExternalServiceMode"] == "DSR"
    assert felix["spec"]["awsSrcDstCheck"] == "Disable"
    assert "vxlanMTU" not in felix["spec"]  # mtu empty: auto
    assert pool["spec"]["cidr"] == "100.96.0.0/11"
    assert (pool["spec"]["vxlanMode"], pool["spec"]["ipipMode"]) == ("CrossSubnet", "Never")
    settings = kops.agent_settings(result.cluster)
    assert settings["backend"] == "vxlan" and settings["nodes"] == 2


def test_cli_validate_and_render_pipe_into_apply(tmp_path, monkeypatch):
    runner = CliRunner()
    ok = runner.invoke(app, ["cluster", "validate", "-f", str(EXAMPLE)])
    assert ok.exit_code == 0, ok.output
    assert "valid: Cluster demo.k8s.local" in ok.output and "warning:" in ok.output
    bad = tmp_path / "bad.yaml"
    docs = variant({**BPF, "encapsulationMode": "gre"})
    bad.write_text(yaml.safe_dump_all(docs))
    out = runner.invoke(app, ["cluster", "validate", "-f", str(bad)])
    assert out.exit_code == 1 and f"{CALICO}.encapsulationMode" in out.output
    rendered = runner.invoke(app, ["cluster", "render", "-f", str(EXAMPLE)])
    assert rendered.exit_code == 0
    yaml_text = rendered.stdout
    assert yaml_text.startswith("# rendered from") and "backend: vxlan" in yaml_text
    monkeypatch.setenv("TABBY_DATASTORE", f"sqlite://{tmp_path}/store.db")
    applied = runner.invoke(app, ["apply", "-f", "-"], input=yaml_text)
    assert applied.exit_code == 0, applied.output
    got = runner.invoke(app, ["get", "ippools", "-o", "yaml"])
    assert "vxlanMode: CrossSubnet" in got.stdout


# --- the lab from a spec ----------------------------------------------------------------------


def cluster_of(docs: list[Any]) -> kops.KopsCluster:
    result = kops.parse(docs)
    assert result.ok, [str(e) for e in result.errors]
    assert result.cluster is not None
    return result.cluster


def two_subnets(nodes: int = 2, b_cidr: str = "172.20.64.0/19") -> list[dict[str, Any]]:
    """The example over two subnets: the master in a; the nodes group over b and a."""
    docs = example()
    docs[0]["spec"]["subnets"].append(
        {"cidr": b_cidr, "name": "us-east-1b", "type": "Public", "zone": "us-east-1b"}
    )
    docs[2]["spec"]["subnets"] = ["us-east-1b", "us-east-1a"]
    docs[2]["spec"]["minSize"] = docs[2]["spec"]["maxSize"] = nodes
    return docs


def test_lab_plan_from_the_example():
    sp = topology.from_spec("t", cluster_of(example()), fabric_mtu=9001)
    assert [n.subnet for n in sp.plan.nodes] == ["172.20.32.0/19", "172.20.32.0/19"]
    assert [s.cidr for s in sp.plan.subnets] == ["172.20.32.0/19"]
    assert sp.plan.fabric_mtu == 9001 and sp.warnings == ()


def test_lab_plan_spreads_groups_over_their_subnets():
    sp = topology.from_spec("t", cluster_of(two_subnets()))
    assert [n.subnet for n in sp.plan.nodes] == [
        "172.20.32.0/19",
        "172.20.64.0/19",
        "172.20.32.0/19",
    ]
    assert sp.subnet_names == {"172.20.32.0/19": "us-east-1a", "172.20.64.0/19": "us-east-1b"}


def test_lab_never_uses_the_hosts_net_and_bounds_the_node_count():
    docs = two_subnets(nodes=20, b_cidr="192.0.2.0/24")
    docs[0]["spec"]["networkCIDR"] = None
    sp = topology.from_spec("t", cluster_of(docs))
    assert len(sp.plan.nodes) == topology.MAX_NODES
    assert all(not n.subnet.startswith("192.0.2.") for n in sp.plan.nodes)
    text = " ".join(sp.warnings)
    assert "192.0.2.0/24" in text and f"first {topology.MAX_NODES}" in text


def test_an_ipv6_spec_makes_a_dual_stack_lab_with_its_pool_unencapsulated():
    cluster = cluster_of(variant({**BPF}, **IPV6))
    sp = topology.from_spec("t", cluster)
    assert sp.plan.ipv6 and all(n.ip6 and n.gateway6 for n in sp.plan.nodes)
    assert any("dual-stack" in w for w in sp.warnings)
    node = sp.plan.nodes[0]
    assert node.ip6 is not None and ipaddress.ip_address(node.ip6).is_private  # a ULA
    objs, _ = spec_resources(cluster)
    pools = {o["spec"]["cidr"]: o["spec"] for o in objs if o["kind"] == "IPPool"}
    assert set(pools) == {"2001:db8:1::/64", topology.POOL_CIDR}
    v6 = pools["2001:db8:1::/64"]
    assert (v6["blockSize"], v6["ipipMode"], v6["vxlanMode"]) == (122, "Never", "Never")
    assert pools[topology.POOL_CIDR]["vxlanMode"] == "Never", "IPv4 routed over BGP as well"
    nodes = [o for o in base_resources(sp.plan, objs) if o["kind"] == "Node"]
    addrs = [a["address"] for a in nodes[0]["status"]["addresses"] if a["type"] == "InternalIP"]
    assert addrs == [node.ip, node.ip6]


def test_an_ipv6_spec_without_pod_cidr_gets_the_labs_ula_pool():
    spec = {k: v for k, v in IPV6.items() if k != "podCIDR"}
    objs, _ = spec_resources(cluster_of(variant({**BPF}, **spec)))
    assert topology.POOL6_CIDR in {o["spec"]["cidr"] for o in objs if o["kind"] == "IPPool"}


def test_an_ipv6_spec_with_an_ipv4_pod_cidr_names_the_field():
    err = errors(variant({**BPF}, **{**IPV6, "podCIDR": "100.96.0.0/11"}))
    assert "needs IPv6" in err["spec.podCIDR"]


def test_the_ipv6_example_validates_and_renders_an_ipv6_pool():
    path = EXAMPLE.parent / "kops-ipv6-cluster.yaml"
    result = kops.parse(list(yaml.safe_load_all(path.read_text())))
    assert result.ok and result.cluster is not None and result.cluster.ipv6
    pools = [o for o in kops.render(result.cluster) if o["kind"] == "IPPool"]
    assert [p["metadata"]["name"] for p in pools] == ["default-ipv6-ippool"]
    assert pools[0]["spec"]["natOutgoing"] is False, "Calico's IPv6 default"


@pytest.mark.parametrize("cidr", ["192.0.2.0/25", "203.0.113.0/24", "172.20.0.0/29", "fd00::/64"])
def test_subnets_that_do_not_fit_the_lab(cidr):
    assert topology.subnet_problem(cidr) is not None
    with pytest.raises(topology.TopologyError):
        topology.plan("t", 2, subnets=[cidr])


def test_lab_resources_from_an_ipip_spec_keep_ipip():
    objs, warns = spec_resources(cluster_of(variant({**BPF})))
    pool = next(o for o in objs if o["kind"] == "IPPool")
    assert (pool["spec"]["ipipMode"], pool["spec"]["vxlanMode"]) == ("CrossSubnet", "Never")
    assert not any("IP-in-IP" in w for w in warns)
    plan = topology.from_spec("t", cluster_of(example())).plan
    kinds = [o["kind"] for o in base_resources(plan, objs)]
    assert kinds.count("IPPool") == 1 and kinds.count("Node") == 2


# --- MTU arithmetic ---------------------------------------------------------------------------


def _pool(**modes: str) -> dict[str, Any]:
    return {"spec": {"cidr": "100.96.0.0/11", **modes}}


@pytest.mark.parametrize(
    "felix,pools,want",
    [
        ({}, [_pool(vxlanMode="Always")], 8951),
        ({}, [_pool(vxlanMode="CrossSubnet")], 8951),
        ({}, [_pool(ipipMode="Always")], 8981),
        ({"wireguardEnabled": True}, [_pool(vxlanMode="Always")], 8941),
        ({}, [_pool()], 9001),
        ({"vxlanMTU": 8000}, [_pool(vxlanMode="Always")], 8000),
        ({}, [{"spec": {"vxlanMode": "Always", "disabled": True}}], 9001),
    ],
)
def test_workload_mtu_as_calico_computes_it(felix, pools, want):
    assert mtu.workload_mtu(9001, felix, pools) == want

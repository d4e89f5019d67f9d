"""Validation: defaults, normalisation, and bad input naming the field."""

from __future__ import annotations

import copy

import pytest

from tabby.lab import apishapes
from tabby.model import ValidationError, lookup, validate
from tabby.model.errors import UnknownKind


def service(**spec):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": spec}


def pool(**spec):
    return {
        "apiVersion": "projectcalico.org/v3",
        "kind": "IPPool",
        "metadata": {"name": "pool"},
        "spec": spec,
    }


def error_of(obj) -> str:
    with pytest.raises(ValidationError) as exc:
        validate(obj)
    return str(exc.value)


def test_service_defaults():
    out = validate(service(selector={"app": "web"}, ports=[{"port": 80}]))
    assert out["metadata"]["namespace"] == "default"
    assert out["spec"]["type"] == "ClusterIP"
    assert out["spec"]["ports"] == [{"port": 80, "protocol": "TCP", "targetPort": 80}]


def test_validate_does_not_modify_input():
    obj = service(ports=[{"port": 80}])
    validate(obj)
    assert obj == service(ports=[{"port": 80}])


def test_bad_port_names_the_field():
    msg = error_of(service(ports=[{"port": 0}]))
    assert msg == "Service default/web: spec.ports[0].port: must be an integer 1-65535"


def test_unknown_field_is_named_at_any_depth():
    assert "spec.ports[0].prot: unknown field" in error_of(service(ports=[{"port": 1, "prot": 1}]))
    assert error_of({**service(ports=[{"port": 1}]), "extra": 1}).endswith("extra: unknown field")
    bad_meta = service(ports=[{"port": 1}])
    bad_meta["metadata"]["labelz"] = {}
    assert "metadata.labelz: unknown field" in error_of(bad_meta)


def test_protocol_and_nodeport_rules():
    assert "spec.ports[0].protocol" in error_of(service(ports=[{"port": 1, "protocol": "ICMP"}]))
    msg = error_of(service(ports=[{"port": 1, "nodePort": 30001}]))
    assert "spec.ports[0].nodePort: only allowed for type NodePort" in msg
    msg = error_of(service(type="NodePort", ports=[{"port": 1, "nodePort": 80}]))
    assert "must be an integer 30000-32767" in msg


def test_unknown_kind_is_clear():
    with pytest.raises(UnknownKind, match='unknown kind "StatefulSet"'):
        validate({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "x"}})


def test_wrong_api_version():
    obj = pool(cidr="10.0.0.0/8")
    obj["apiVersion"] = "v1"
    assert "apiVersion: IPPool needs projectcalico.org/v3" in error_of(obj)


def test_ippool_defaults_and_cidr_normalised():
    spec = validate(pool(cidr="100.96.0.1/11"))["spec"]
    assert spec["cidr"] == "100.96.0.0/11"
    assert (spec["blockSize"], spec["ipipMode"], spec["vxlanMode"]) == (26, "Never", "Never")
    assert spec["natOutgoing"] is False
    assert validate(pool(cidr="fd00::/48"))["spec"]["blockSize"] == 122


def test_ippool_errors():
    assert "spec.cidr: '100.96.0.0/33' is not a valid CIDR" in error_of(pool(cidr="100.96.0.0/33"))
    assert "spec.cidr: required" in error_of(pool())
    assert "spec.blockSize" in error_of(pool(cidr="100.96.0.0/11", blockSize=8))
    msg = error_of(pool(cidr="100.96.0.0/11", ipipMode="Always", vxlanMode="CrossSubnet"))
    assert "cannot both be enabled" in msg
    assert "spec.vxlanMode: must be one of" in error_of(pool(cidr="10.0.0.0/8", vxlanMode="On"))


def test_felix_configuration_defaults_and_enums():
    felix = {
        "apiVersion": "projectcalico.org/v3",
        "kind": "FelixConfiguration",
        "metadata": {"name": "default"},
    }
    spec = validate(felix)["spec"]
    assert spec == {"bpfEnabled": True, "vxlanVNI": 4096, "vxlanPort": 4789}
    bad = {**felix, "spec": {"bpfExternalServiceMode": "Direct"}}
    assert "spec.bpfExternalServiceMode: must be one of Tunnel|DSR" in error_of(bad)
    bad = {**felix, "spec": {"bpfRedirectToPeer": "L2Only"}}
    assert "spec.bpfRedirectToPeer: must be one of Enabled|Disabled" in error_of(bad)
    assert "spec.bpfRedirectToPeer: must be one of" in error_of(
        {**felix, "spec": {"bpfRedirectToPeer": True}}
    )
    ok = validate({**felix, "spec": {"bpfRedirectToPeer": "Disabled"}})
    assert ok["spec"]["bpfRedirectToPeer"] == "Disabled"
    assert "spec.bpfDataIfacePattern" in error_of({**felix, "spec": {"bpfDataIfacePattern": "("}})
    assert "spec.vxlanVNI" in error_of({**felix, "spec": {"vxlanVNI": 1 << 24}})


def test_pod_ip_checks_and_pod_ips_filled():
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns1"},
        "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80}]}]},
        "status": {"podIP": "100.96.0.5", "anything": {"free": "form"}},
    }
    out = validate(pod)
    assert out["status"]["podIPs"] == [{"ip": "100.96.0.5"}]
    assert out["spec"]["containers"][0]["ports"][0]["protocol"] == "TCP"
    pod["status"]["podIP"] = "100.96.0.500"
    assert error_of(pod).startswith("Pod ns1/p: status.podIP: '100.96.0.500' is not a valid IP")


def test_pods_and_nodes_as_kubectl_exports_them_are_accepted():
    """`kubectl get pod -o yaml` from a real cluster, applied to a lab: what the API server
    adds (managedFields, a container's terminationMessagePath, the scheduler's defaults) is
    known, so accepted; a field Kubernetes does not have is still refused by name."""
    pod = apishapes.pod("default", "web-1", "node1", "100.96.0.5", {"app": "web"})
    out = validate(copy.deepcopy(pod))
    assert out["metadata"]["managedFields"] == pod["metadata"]["managedFields"]
    assert out["spec"]["containers"][0]["terminationMessagePolicy"] == "File"
    assert validate(apishapes.node("node1", "172.20.32.11", {}, {}))["kind"] == "Node"
    pod["spec"]["containers"][0]["terminationMesagePath"] = "/dev/termination-log"
    assert "spec.containers[0].terminationMesagePath: unknown field" in error_of(pod)


def test_cluster_scoped_kind_drops_namespace():
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n", "namespace": "x"}}
    out = validate(node)
    assert "namespace" not in out["metadata"]


def test_node_addresses():
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "n1"},
        "spec": {"podCIDR": "100.96.0.0/26"},
        "status": {"addresses": [{"type": "InternalIP", "address": "not-an-ip"}]},
    }
    assert "status.addresses[0].address" in error_of(node)


def test_endpointslice_needs_service_label_and_matching_family():
    es = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "web-1"},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["fd00::1"]}],
    }
    assert 'metadata.labels["kubernetes.io/service-name"]: required' in error_of(es)
    es["metadata"]["labels"] = {"kubernetes.io/service-name": "web"}
    assert "endpoints[0].addresses[0]: fd00::1 is not an IPv4 address" in error_of(es)


def test_network_policy_shape():
    np = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "deny"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [
                {
                    "from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                    "ports": [{"port": 5432}, {"port": "pg"}, {"port": 1000, "endPort": 2000}],
                }
            ],
        },
    }
    out = validate(np)
    assert out["spec"]["policyTypes"] == ["Ingress"]
    assert out["spec"]["ingress"][0]["ports"][1] == {"port": "pg", "protocol": "TCP"}
    np["spec"]["ingress"][0]["from"][0]["ipBlock"]["except"] = ["192.168.0.0/16"]
    assert "spec.ingress[0].from[0].ipBlock.except[0]: 192.168.0.0/16 is not inside" in error_of(np)
    np["spec"]["ingress"][0]["from"] = [
        {"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}
    ]
    assert "matchExpressions[0].values: must be non-empty for operator In" in error_of(np)


def test_ipam_block_allocations_inside_block():
    block = {
        "apiVersion": "tabby.dev/v1",
        "kind": "IPAMBlock",
        "metadata": {"name": "100-96-0-0-26"},
        "spec": {
            "cidr": "100.96.0.0/26",
            "affinity": "host:node1",
            "allocations": {"100.96.1.1": "c1"},
        },
    }
    assert 'spec.allocations["100.96.1.1"]: 100.96.1.1 is outside the block' in error_of(block)
    block["spec"]["affinity"] = "node1"
    assert 'spec.affinity: must be "host:<node name>"' in error_of(block)


def test_kind_aliases_case_insensitive():
    assert lookup("SVC").name == "Service"
    assert lookup("netpol").name == "NetworkPolicy"
    assert lookup("felixconfigurations").name == "FelixConfiguration"
    assert lookup("no").name == "Node"
    assert lookup("deploy").name == "Deployment"
    with pytest.raises(UnknownKind, match="known kinds"):
        lookup("statefulsets")


def test_maglev_options_are_calicos_with_their_ranges():
    felix = {
        "apiVersion": "projectcalico.org/v3",
        "kind": "FelixConfiguration",
        "metadata": {"name": "default"},
    }
    ok = {**felix, "spec": {"bpfMaglevMaxServices": 50, "bpfMaglevMaxEndpointsPerService": 20}}
    assert validate(ok)["spec"]["bpfMaglevMaxEndpointsPerService"] == 20
    assert "spec.bpfMaglevMaxServices" in error_of({**felix, "spec": {"bpfMaglevMaxServices": 0}})
    big = {**felix, "spec": {"bpfMaglevMaxEndpointsPerService": 3001}}
    assert "spec.bpfMaglevMaxEndpointsPerService" in error_of(big)


@pytest.mark.parametrize("field", ["ipipMode", "vxlanMode"])
@pytest.mark.parametrize("mode", ["Always", "CrossSubnet"])
def test_an_ipv6_pool_is_never_encapsulated(field, mode):
    msg = error_of(pool(cidr="fd00:10:96::/48", **{field: mode}))
    assert f"spec.{field}: {mode}: an IPv6 pool is not encapsulated (use Never)" in msg
    out = validate(pool(cidr="fd00:10:96::/48"))["spec"]
    assert (out["blockSize"], out["ipipMode"], out["vxlanMode"]) == (122, "Never", "Never")

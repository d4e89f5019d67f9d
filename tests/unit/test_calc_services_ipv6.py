"""calc.services for IPv6 ClusterIPs: the IPv6 frontends and backend sets (``ServiceNAT.ipv6``)
come from the IPv6 EndpointSlices only, and leave the IPv4 ones as they were."""

from __future__ import annotations

from tabby.calc.services import NAT_DROP_EMPTY, NAT_EXTERNAL, service_nat


def service(cluster_ips: list[str], **spec: object) -> dict:
    return {
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "clusterIP": cluster_ips[0],
            "clusterIPs": cluster_ips,
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ],
            **spec,
        },
    }


def endpoint_slice(family: str, addrs: dict[str, str]) -> dict:
    return {
        "addressType": family,
        "ports": [
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "dns", "port": 8081, "protocol": "UDP"},
        ],
        "endpoints": [
            {"addresses": [a], "conditions": {"ready": True}, "nodeName": n}
            for a, n in addrs.items()
        ],
    }


SLICES = [
    endpoint_slice("IPv4", {"100.96.0.65": "n2", "100.96.0.129": "n3"}),
    endpoint_slice("IPv6", {"fd00:96::41": "n2", "fd00:96::81": "n3"}),
]


def test_a_dual_stack_service_has_both_families_apart():
    nat = service_nat(service(["100.64.1.1", "fd00:64::1"]), SLICES, "n1", "172.20.32.11")
    assert {f.addr for f in nat.frontends} == {"100.64.1.1"}
    assert all("." in b[0] for bs in nat.backend_sets.values() for b in bs)
    assert nat.ipv6 is not None
    assert {(f.addr, f.port, f.protocol) for f in nat.ipv6.frontends} == {
        ("fd00:64::1", 80, "TCP"),
        ("fd00:64::1", 53, "UDP"),
    }
    sets = {f.protocol: nat.ipv6.backend_sets[f.backend_set] for f in nat.ipv6.frontends}
    assert sets == {
        "TCP": (("fd00:96::41", 8080), ("fd00:96::81", 8080)),
        "UDP": (("fd00:96::41", 8081), ("fd00:96::81", 8081)),
    }


def test_an_ipv6_only_service_and_internal_traffic_policy_local():
    nat = service_nat(service(["fd00:64::1"]), SLICES, "n2", None)
    assert nat.frontends == () and nat.ipv6 is not None and len(nat.ipv6.frontends) == 2
    local = service_nat(service(["fd00:64::1"], internalTrafficPolicy="Local"), SLICES, "n2", None)
    assert local.ipv6 is not None
    for f in local.ipv6.frontends:
        assert f.flags & NAT_DROP_EMPTY
        assert [b[0] for b in local.ipv6.backend_sets[f.backend_set]] == ["fd00:96::41"]


def test_an_ipv4_service_has_no_ipv6_part_and_ipv6_nodeports_are_on_the_nodes_ipv6():
    assert service_nat(service(["100.64.1.1"]), SLICES, "n1", None).ipv6 is None
    nodeport = service(["fd00:64::1"], type="NodePort")
    nodeport["spec"]["ports"][0]["nodePort"] = 30080
    nat = service_nat(nodeport, SLICES, "n1", "172.20.32.11", "fd00:20:1::11")
    assert nat.ipv6 is not None
    np = [f for f in nat.ipv6.frontends if f.kind == "NodePort"]
    assert [(f.addr, f.port, f.protocol) for f in np] == [("fd00:20:1::11", 30080, "TCP")]
    assert np[0].flags & NAT_EXTERNAL
    assert nat.ipv6.backend_sets[np[0].backend_set] == (
        ("fd00:96::41", 8080),
        ("fd00:96::81", 8080),
    )
    without = service_nat(nodeport, SLICES, "n1", "172.20.32.11")
    assert without.ipv6 is not None and all(f.kind == "ClusterIP" for f in without.ipv6.frontends)
    lb = service(["fd00:64::1"], type="LoadBalancer")
    nat = service_nat(lb, SLICES, "n1", "172.20.32.11", "fd00:20:1::11")
    assert any("not LoadBalancer or externalIPs" in w for w in nat.warnings)


def test_ipv6_nodeport_with_external_traffic_policy_local_uses_the_nodes_endpoints():
    svc = service(["fd00:64::1"], type="NodePort", externalTrafficPolicy="Local")
    svc["spec"]["ports"][0]["nodePort"] = 30080
    nat = service_nat(svc, SLICES, "n3", "172.20.32.13", "fd00:20:1::13")
    assert nat.ipv6 is not None
    (np,) = [f for f in nat.ipv6.frontends if f.kind == "NodePort"]
    assert np.flags & NAT_DROP_EMPTY and np.flags & NAT_EXTERNAL
    assert nat.ipv6.backend_sets[np.backend_set] == (("fd00:96::81", 8080),), "n3's only"
    cluster = [f for f in nat.ipv6.frontends if f.kind == "ClusterIP" and f.protocol == "TCP"]
    assert len(nat.ipv6.backend_sets[cluster[0].backend_set]) == 2, "ClusterIP: cluster-wide"

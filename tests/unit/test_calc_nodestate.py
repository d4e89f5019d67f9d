"""calc.nodestate: resources in, one node's desired routes/endpoints out; order never matters."""

from __future__ import annotations

import itertools

import pytest

from tabby.calc import names
from tabby.calc.nodestate import (
    RT_ENCAP_IPIP,
    RT_ENCAP_VXLAN,
    RT_LOCAL_HOST,
    RT_LOCAL_WL,
    RT_REMOTE_HOST,
    RT_REMOTE_WL,
    RT_TUNNEL_ADDR,
    KernelRoute,
    compute,
)


def node(name, ip, prefix=19):
    return {
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"projectcalico.org/IPv4Address": f"{ip}/{prefix}"},
        },
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    }


def pool(mode="Always"):
    return {
        "kind": "IPPool",
        "metadata": {"name": "p"},
        "spec": {"cidr": "100.96.0.0/11", "blockSize": 26, "vxlanMode": mode},
    }


def block(cidr, owner, allocations=None):
    return {
        "kind": "IPAMBlock",
        "metadata": {"name": names.block_name(cidr)},
        "spec": {"cidr": cidr, "affinity": f"host:{owner}", "allocations": allocations or {}},
    }


def pod(name, node_name, ip, ns="default"):
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeName": node_name},
        "status": {"podIP": ip},
    }


def resources(objs):
    out: dict = {}
    for o in objs:
        key = (o["metadata"].get("namespace", ""), o["metadata"]["name"])
        out.setdefault(o["kind"], {})[key] = o
    return out


OBJS = [
    node("n1", "172.20.32.11"),
    node("n2", "172.20.64.12"),
    node("n3", "172.20.32.13"),
    pool(),
    block("100.96.0.0/26", "n1", {"100.96.0.0": names.tunnel_handle("n1"), "100.96.0.1": "c1"}),
    block("100.96.0.64/26", "n2"),
    block("100.96.0.128/26", "n3"),
    pod("a", "n1", "100.96.0.1"),
    pod("b", "n2", "100.96.0.65"),
    pod("h", "n1", None),
]


def test_local_pods_remote_blocks_nodes_and_tunnel_address():
    st = compute(resources(OBJS), "n1")
    assert st.routes["100.96.0.1/32"].flags == RT_LOCAL_WL
    assert st.routes["100.96.0.1/32"].ifname == names.host_ifname("default", "a")
    assert st.routes["100.96.0.64/26"].flags == RT_REMOTE_WL | RT_ENCAP_VXLAN
    assert st.routes["100.96.0.64/26"].next_hop == "172.20.64.12"
    assert st.routes["172.20.32.11/32"].flags == RT_LOCAL_HOST
    assert st.routes["172.20.64.12/32"].flags == RT_REMOTE_HOST
    assert st.routes["100.96.0.0/32"].flags == RT_LOCAL_HOST | RT_TUNNEL_ADDR
    assert "100.96.0.0/26" not in st.routes, "own block: pods are /32s"
    assert st.tunnel_ip == "100.96.0.0" and st.needs_vxlan
    assert set(st.endpoints) == {names.host_ifname("default", "a")}, "pod without IP not wired"
    assert set(st.kernel_routes) == {"100.96.0.64/26", "100.96.0.128/26"}


def test_result_does_not_depend_on_event_order():
    base = compute(resources(OBJS), "n1")
    for perm in itertools.islice(itertools.permutations(OBJS), 0, 200, 7):
        st = compute(resources(perm), "n1")
        assert st.routes == base.routes and st.endpoints == base.endpoints


def test_cross_subnet_encapsulates_only_across_subnets():
    objs = [o for o in OBJS if o["kind"] != "IPPool"] + [pool("CrossSubnet")]
    st = compute(resources(objs), "n1")
    assert st.routes["100.96.0.64/26"].flags & RT_ENCAP_VXLAN  # n2: other subnet
    assert not st.routes["100.96.0.128/26"].flags & RT_ENCAP_VXLAN  # n3: same subnet
    assert st.kernel_routes["100.96.0.128/26"].encap == "none"
    assert st.kernel_routes["100.96.0.128/26"].gateway == "172.20.32.13"


def test_never_mode_routes_directly_and_needs_no_tunnel():
    objs = [o for o in OBJS if o["kind"] != "IPPool"] + [pool("Never")]
    st = compute(resources(objs), "n1")
    assert not st.needs_vxlan
    assert st.routes["100.96.0.64/26"].flags == RT_REMOTE_WL


def test_bpf_enabled_and_vni_come_from_felixconfiguration():
    fc = {
        "kind": "FelixConfiguration",
        "metadata": {"name": "default"},
        "spec": {"bpfEnabled": False, "vxlanVNI": 77},
    }
    st = compute(resources(OBJS + [fc]), "n1")
    assert st.bpf_enabled is False and st.vni == 77


def test_block_of_an_unknown_node_is_a_warning_not_a_route():
    st = compute(resources(OBJS + [block("100.96.1.0/26", "ghost")]), "n1")
    assert "100.96.1.0/26" not in st.routes
    assert any("ghost" in w for w in st.warnings)


def test_empty_inputs():
    st = compute({}, "n1")
    assert st.routes == {} and st.endpoints == {} and st.node_ip is None


@pytest.mark.parametrize("mode", ["CrossSubnet", "Always"])
def test_ipip_blocks_are_routed_with_the_ipip_flag_and_a_kernel_route_via_the_peer(mode):
    ipip = {
        "kind": "IPPool",
        "metadata": {"name": "p"},
        "spec": {"cidr": "100.96.0.0/11", "ipipMode": mode, "vxlanMode": "Never"},
    }
    fc = {"kind": "FelixConfiguration", "metadata": {"name": "default"}, "spec": {"ipipMTU": 1400}}
    st = compute(resources([o for o in OBJS if o["kind"] != "IPPool"] + [ipip, fc]), "n1")
    n2 = st.routes["100.96.0.64/26"]  # n2: across the router, IP-in-IP in both modes
    assert (n2.flags, n2.next_hop) == (RT_REMOTE_WL | RT_ENCAP_IPIP, "172.20.64.12")
    assert st.kernel_routes["100.96.0.64/26"] == KernelRoute(
        "100.96.0.64/26", "ipip", "172.20.64.12"
    )
    n3 = st.routes["100.96.0.128/26"]  # n3: same subnet, plain only in CrossSubnet
    want = RT_REMOTE_WL if mode == "CrossSubnet" else RT_REMOTE_WL | RT_ENCAP_IPIP
    assert n3.flags == want
    assert st.kernel_routes["100.96.0.128/26"].encap == (
        "none" if mode == "CrossSubnet" else "ipip"
    )
    assert not any("IP-in-IP" in w for w in st.warnings)
    assert not st.needs_vxlan and st.ipip_mtu == 1400


def test_vxlan_mtu_and_wireguard_come_from_felixconfiguration():
    fc = {
        "kind": "FelixConfiguration",
        "metadata": {"name": "default"},
        "spec": {"vxlanMTU": 8000, "wireguardEnabled": True},
    }
    st = compute(resources(OBJS + [fc]), "n1")
    assert st.vxlan_mtu == 8000 and st.wireguard is True
    assert compute(resources(OBJS), "n1").vxlan_mtu == 0


def test_dsr_warns_when_replies_carry_sources_of_other_subnets():
    def felix(mode):
        return {
            "kind": "FelixConfiguration",
            "metadata": {"name": "default"},
            "spec": {"bpfExternalServiceMode": mode},
        }

    two_subnets = [node("n1", "172.20.32.10"), node("n2", "172.20.64.10")]
    one_subnet = [node("n1", "172.20.32.10"), node("n2", "172.20.32.11")]
    st = compute(resources(two_subnets + [felix("DSR")]), "n1")
    assert st.ext_mode == "DSR"
    assert [w for w in st.warnings if "172.20.64.0/19" in w and "awsSrcDstCheck" in w]
    assert compute(resources(two_subnets + [felix("Tunnel")]), "n1").warnings == []
    assert compute(resources(one_subnet + [felix("DSR")]), "n1").warnings == []
    assert compute(resources(two_subnets), "n1").ext_mode == "Tunnel"


def test_redirect_to_peer_is_enabled_unless_disabled():
    def felix(mode):
        return {
            "kind": "FelixConfiguration",
            "metadata": {"name": "default"},
            "spec": {"bpfRedirectToPeer": mode},
        }

    nodes = [node("n1", "172.20.32.10")]
    assert compute(resources(nodes), "n1").redirect is True
    assert compute(resources(nodes + [felix("Enabled")]), "n1").redirect is True
    assert compute(resources(nodes + [felix("Disabled")]), "n1").redirect is False


def test_maglev_options_come_from_felixconfiguration():
    fc = {
        "kind": "FelixConfiguration",
        "metadata": {"name": "default"},
        "spec": {"bpfMaglevMaxServices": 7, "bpfMaglevMaxEndpointsPerService": 3},
    }
    st = compute(resources(OBJS + [fc]), "n1")
    assert (st.maglev_max_services, st.maglev_max_endpoints) == (7, 3)
    default = compute(resources(OBJS), "n1")
    assert (default.maglev_max_services, default.maglev_max_endpoints) == (100, 10)


def test_dual_stack_ipv6_blocks_and_addresses_leave_ipv4_state_alone_and_policy_covers_ipv6():
    n1 = node("n1", "172.20.32.11")
    n1["status"]["addresses"].insert(0, {"type": "InternalIP", "address": "fd00:20:1::11"})
    a = pod("a", "n1", "100.96.0.1")
    a["status"]["podIPs"] = [{"ip": "100.96.0.1"}, {"ip": "fd00:96::1"}]
    a["metadata"]["labels"] = {"app": "a"}
    pool6 = {"kind": "IPPool", "metadata": {"name": "p6"}, "spec": {"cidr": "fd00:96::/48"}}
    objs = [n1, *OBJS[1:6], block("fd00:96::40/122", "n2"), pool6, a]
    state = compute(resources(objs), "n1")
    assert state.routes["172.20.32.11/32"].flags == RT_LOCAL_HOST, "the IPv4 InternalIP"
    assert not [r for r in (*state.routes, *state.kernel_routes) if ":" in r], "BIRD's job"
    assert not [w for w in state.warnings if "IPv6" in w], "no policy: nothing to say"
    deny = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "deny", "namespace": "default"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }
    state = compute(resources([*objs, deny]), "n1")
    assert not [w for w in state.warnings if "IPv6" in w], "IPv6 is enforced: no warning"
    ep = state.policies["100.96.0.1"]
    assert ep.ip6 == "fd00:96::1" and ep.ingress.isolated, "one policy for both addresses"


def test_bpf_map_sizes_come_from_felixconfiguration_and_size_their_maps():
    from tabby.bpf import mapsizes
    from tabby.model import ValidationError, validate

    fc = validate(
        {
            "apiVersion": "projectcalico.org/v3",
            "kind": "FelixConfiguration",
            "metadata": {"name": "default"},
            "spec": {"bpfMapSizeNATFrontend": 4096, "bpfMapSizeConntrack": 1000000},
        }
    )
    st = compute(resources(OBJS + [fc]), "n1")
    assert st.map_sizes == (("bpfMapSizeConntrack", 1000000), ("bpfMapSizeNATFrontend", 4096))
    sizes = {m: size for m, (_field, size) in mapsizes.wanted(st.map_sizes).items()}
    # Calico's fields size the IPv4 and IPv6 maps alike; the others keep the build's sizes
    assert sizes["tby_nat_fe"] == sizes["tby_nat_fe6"] == 4096
    assert sizes["tby_ct"] == sizes["tby_ct6"] == 1000000
    assert sizes["tby_nat_be"] == 524288 and sizes["tby_routes"] == 65536
    assert compute(resources(OBJS), "n1").map_sizes == ()
    every = {f: 100 + i for i, f in enumerate(mapsizes.FIELDS)}  # each one the model knows
    fc["spec"] = every
    st = compute(resources(OBJS + [validate(fc)]), "n1")
    assert {f for f, _size in mapsizes.wanted(st.map_sizes).values()} == set(every)
    assert all(size < 110 for _f, size in mapsizes.wanted(st.map_sizes).values())
    with pytest.raises(ValidationError, match="bpfMapSizeRoute"):
        validate({**fc, "spec": {"bpfMapSizeRoute": 0}})

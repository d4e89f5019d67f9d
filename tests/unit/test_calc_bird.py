"""calc.bird: the datastore -> one node's bird.conf (mesh, route reflectors, peers, filters).

The rendered text is also handed to the real BIRD's parser (``bird -p``): a config BIRD refuses
would leave a node without routes.
"""

from __future__ import annotations

import itertools
import subprocess

import pytest

from tabby.calc import bird
from tabby.calc.nodestate import compute


def node(name, ip, labels=None, **annotations):
    return {
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels or {},
            "annotations": {"projectcalico.org/IPv4Address": f"{ip}/19", **annotations},
        },
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    }


def pool(name, cidr, ipip="Never", vxlan="Never"):
    return {
        "kind": "IPPool",
        "metadata": {"name": name},
        "spec": {"cidr": cidr, "blockSize": 26, "ipipMode": ipip, "vxlanMode": vxlan},
    }


def block(cidr, owner):
    return {
        "kind": "IPAMBlock",
        "metadata": {"name": cidr},
        "spec": {"cidr": cidr, "affinity": f"host:{owner}"},
    }


def peer(name, **spec):
    return {"kind": "BGPPeer", "metadata": {"name": name}, "spec": spec}


def resources(*objs):
    out: dict = {}
    for o in objs:
        ns = o["metadata"].get("namespace", "")
        out.setdefault(o["kind"], {})[(ns, o["metadata"]["name"])] = o
    return out


NODES = [node("n1", "172.20.32.11"), node("n2", "172.20.64.12"), node("n3", "172.20.32.13")]
POOLS = [pool("plain", "100.96.0.0/16"), pool("wrapped", "100.97.0.0/16", vxlan="Always")]
BLOCKS = [block("100.96.0.0/26", "n1"), block("100.97.0.0/26", "n1"), block("100.96.0.64/26", "n2")]


def config(name="default", **spec):
    return {"kind": "BGPConfiguration", "metadata": {"name": name}, "spec": spec}


def test_full_mesh_by_default_announcing_own_blocks_only():
    cfg = bird.render(resources(*NODES, *POOLS, *BLOCKS), "n1")
    assert cfg is not None
    assert [(p.name, p.type, p.as_number) for p in cfg.peers] == [
        ("Mesh_172_20_32_13", "node-to-node mesh", 64512),
        ("Mesh_172_20_64_12", "node-to-node mesh", 64512),
    ]
    assert cfg.router_id == "172.20.32.11"
    assert cfg.blocks == ["100.96.0.0/26", "100.97.0.0/26"]
    assert cfg.pools == ["100.96.0.0/16", "100.97.0.0/16"]
    assert cfg.plain_pools == ["100.96.0.0/16"], "only unencapsulated pools go to the kernel"
    text = cfg.text
    assert "route 100.96.0.0/26 blackhole;" in text and "100.96.0.64/26" not in text
    assert "if net ~ [ 100.96.0.0/16+ ] && (proto" in text.split("tabby_kernel_programming")[1]


def test_order_of_resources_never_changes_the_text():
    objs = [*NODES, *POOLS, *BLOCKS, peer("tor", peerIP="172.20.32.1", asNumber=65000)]
    texts = {
        bird.render(resources(*perm), "n2").text  # type: ignore[union-attr]
        for perm in itertools.islice(itertools.permutations(objs), 0, 200, 7)
    }
    assert len(texts) == 1


def test_lab_timers_and_peer_ip_with_port():
    objs = [
        *NODES,
        config(nodeMeshKeepaliveTime="3s", nodeMeshMaxRestartTime="30s", asNumber=65001),
        peer("tor", peerIP="172.20.32.1:1179", asNumber=65000, keepaliveTime="1m"),
    ]
    cfg = bird.render(resources(*objs), "n1")
    assert cfg is not None
    by = {p.address: p for p in cfg.peers}
    assert (by["172.20.32.13"].keepalive_s, by["172.20.32.13"].restart_s) == (3, 30)
    assert (by["172.20.32.1"].name, by["172.20.32.1"].port) == ("Global_172_20_32_1", 1179)
    assert (by["172.20.32.1"].as_number, by["172.20.32.1"].keepalive_s) == (65000, 60)
    assert "hold time 9;\n  keepalive time 3;" in cfg.text
    assert "local 172.20.32.11 as 65001;" in cfg.text


def test_route_reflectors_replace_the_mesh():
    rr = node("n1", "172.20.32.11", {"route-reflector": "true"},
              **{"projectcalico.org/RouteReflectorClusterID": "244.0.0.1"})  # fmt: skip
    objs = [
        rr, *NODES[1:], *POOLS,
        config(nodeToNodeMeshEnabled=False),
        peer("to-rr", nodeSelector="all()", peerSelector="route-reflector == 'true'"),
    ]  # fmt: skip
    client = bird.render(resources(*objs), "n2")
    assert client is not None
    assert [(p.name, p.rr_client) for p in client.peers] == [("Node_172_20_32_11", False)]
    reflector = bird.render(resources(*objs), "n1")
    assert reflector is not None
    assert [(p.address, p.rr_client) for p in reflector.peers] == [
        ("172.20.32.13", True),
        ("172.20.64.12", True),
    ], "the reflector peers back with every node the BGPPeer is for"
    assert "rr client;\n  rr cluster id 244.0.0.1;" in reflector.text


def test_peer_for_one_node_and_node_selector():
    objs = [
        node("n1", "172.20.32.11", {"rack": "a"}), *NODES[1:],
        config(nodeToNodeMeshEnabled=False),
        peer("only-n2", node="n2", peerIP="10.9.9.9", asNumber=65000),
        peer("rack-a", nodeSelector="rack == 'a'", peerIP="10.8.8.8", asNumber=65000),
    ]  # fmt: skip
    n1, n2 = bird.render(resources(*objs), "n1"), bird.render(resources(*objs), "n2")
    assert n1 is not None and n2 is not None
    assert [(p.name, p.type) for p in n1.peers] == [("Node_10_8_8_8", "node specific")]
    assert [p.name for p in n2.peers] == ["Node_10_9_9_9"]


def test_bad_annotations_warn_and_fall_back():
    bad = node("n1", "172.20.32.11", **{
        "projectcalico.org/ASNumber": "lots",
        "projectcalico.org/RouteReflectorClusterID": "not-an-ip",
    })  # fmt: skip
    cfg = bird.render(resources(bad, *NODES[1:]), "n1")
    assert cfg is not None
    assert cfg.as_number == 64512 and cfg.cluster_id is None
    assert len(cfg.warnings) == 2 and all("Node n1" in w for w in cfg.warnings)


def test_a_node_without_address_gets_no_config():
    assert bird.render(resources(*NODES), "nope") is None


def test_nodestate_leaves_plain_pool_blocks_to_bgp():
    objs = resources(*NODES, *POOLS, block("100.96.0.64/26", "n2"), block("100.97.0.64/26", "n2"))
    without, with_bgp = compute(objs, "n1"), compute(objs, "n1", bgp=True)
    assert set(without.kernel_routes) == {"100.96.0.64/26", "100.97.0.64/26"}
    assert set(with_bgp.kernel_routes) == {"100.97.0.64/26"}, "VXLAN pool: still tabby's"
    assert "100.96.0.64/26" not in with_bgp.routes and "100.97.0.64/26" in with_bgp.routes


def dual(name, ip, ip6):
    obj = node(name, ip)
    obj["status"]["addresses"].append({"type": "InternalIP", "address": ip6})
    return obj


NODES6 = [
    dual("n1", "172.20.32.11", "fd00:20:1::11"),
    dual("n2", "172.20.64.12", "fd00:20:2::12"),
    node("n3", "172.20.32.13"),  # IPv4 only: no IPv6 session with it
]
POOL6 = pool("v6", "fd00:96::/48")
BLOCKS6 = [block("fd00:96::/122", "n1"), block("fd00:96::40/122", "n2")]


def test_ipv6_sessions_pools_and_blocks_beside_ipv4():
    objs = [*NODES6, *POOLS, POOL6, *BLOCKS, *BLOCKS6, peer("tor6", peerIP="fd00:20:1::1",
            asNumber=64512)]  # fmt: skip
    cfg = bird.render(resources(*objs), "n1")
    assert cfg is not None and cfg.ip6 == "fd00:20:1::11" and cfg.router_id == "172.20.32.11"
    assert [(p.name, p.type) for p in cfg.peers] == [
        ("Mesh_172_20_32_13", "node-to-node mesh"),
        ("Mesh_172_20_64_12", "node-to-node mesh"),
        ("Global_fd00_20_1__1", "global"),
        ("Mesh_fd00_20_2__12", "node-to-node mesh"),
    ]
    assert cfg.pools6 == ["fd00:96::/48"] and cfg.blocks6 == ["fd00:96::/122"]
    assert cfg.pools == ["100.96.0.0/16", "100.97.0.0/16"], "IPv4 filters keep IPv4 only"
    text = cfg.text
    assert "route fd00:96::/122 blackhole;" in text and "fd00:96::40/122" not in text
    assert "protocol bgp Mesh_fd00_20_2__12 from tabby_peer6" in text
    assert "local fd00:20:1::11 as 64512;" in text
    # a node without IPv6 gets no IPv6 half, and no IPv6 peer
    n3 = bird.render(resources(*objs), "n3")
    assert n3 is not None and n3.ip6 is None and all(":" not in p.address for p in n3.peers)
    assert "ipv6" not in n3.text


@pytest.mark.parametrize("case", ["mesh", "reflector", "no pools", "dual-stack"])
def test_real_bird_accepts_the_config(tmp_path, case):
    objs = [*NODES, *POOLS, *BLOCKS, peer("tor", peerIP="172.20.32.1", asNumber=64512)]
    if case == "dual-stack":
        objs = [*NODES6, *POOLS, POOL6, *BLOCKS, *BLOCKS6, peer("tor6", peerIP="fd00:20:1::1",
                asNumber=64512)]  # fmt: skip
    if case == "reflector":
        objs[0] = node(
            "n1", "172.20.32.11", **{"projectcalico.org/RouteReflectorClusterID": "1.2.3.4"}
        )
        objs += [config(nodeToNodeMeshEnabled=False, listenPort=1179),
                 peer("rr", nodeSelector="all()", peerSelector="all()")]  # fmt: skip
    if case == "no pools":
        objs = NODES
    cfg = bird.render(resources(*objs), "n1")
    assert cfg is not None
    path = tmp_path / "bird.conf"
    path.write_text(cfg.text)
    done = subprocess.run(["bird", "-p", "-c", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

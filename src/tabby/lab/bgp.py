"""The lab's BGP side (the BIRD backend): the fabric router's BIRD and the lab's BGP resources.

The fabric router is the network the cluster runs on, as a top-of-rack router would be: it runs
its own BIRD 2 in the fabric namespace (started by the lab, recorded by PID), peers over iBGP
(AS 64512) with every node, learns their pod blocks and writes them to its kernel, so pods of a
pool without encapsulation are routed across it with plain routes. It announces nothing. The
nodes peer with it through a global BGPPeer (``fabric-router``), as Calico users declare a ToR.

An IPv6 lab's router also peers with every node over IPv6 (``ipv6`` channel, the nodes'
ULAs) and learns their IPv6 blocks; the nodes declare it as a second global BGPPeer
(``fabric-router-v6``), as Calico users declare an IPv6 ToR.

Lab timers are short (keepalive 3 s, hold 9 s, graceful restart 30 s), so a dead node's blocks
are withdrawn within about 10 s, and a restarting BIRD keeps its peers' routes meanwhile.
"""

from __future__ import annotations

import os
from typing import Any

from tabby.lab.topology import LabPlan

AS_NUMBER = 64512
KEEPALIVE_S = 3
RESTART_S = 30
ROUTER_PEER = "fabric-router"
ROUTER_PEER6 = "fabric-router-v6"


def router_ip(plan: LabPlan) -> str:
    """The router's address the nodes peer with (first subnet's gateway; multihop from others)."""
    return plan.subnets[0].gateway


def router_ip6(plan: LabPlan) -> str:
    return plan.subnets[0].gateway6


def node_bird_dir(lab_dir: str, node: str) -> str:
    return os.path.join(lab_dir, f"bird-{node}")


def router_bird_dir(lab_dir: str) -> str:
    return os.path.join(lab_dir, "bird-fabric")


def resources(plan: LabPlan) -> list[dict[str, Any]]:
    """BGPConfiguration default (mesh on, the lab's timers) and the router as a global peer
    (one per family in an IPv6 lab)."""
    peer6 = {
        "apiVersion": "projectcalico.org/v3",
        "kind": "BGPPeer",
        "metadata": {"name": ROUTER_PEER6},
        "spec": {
            "peerIP": router_ip6(plan),
            "asNumber": AS_NUMBER,
            "keepaliveTime": f"{KEEPALIVE_S}s",
            "maxRestartTime": f"{RESTART_S}s",
        },
    }
    return [
        {
            "apiVersion": "projectcalico.org/v3",
            "kind": "BGPConfiguration",
            "metadata": {"name": "default"},
            "spec": {
                "nodeToNodeMeshEnabled": True,
                "asNumber": AS_NUMBER,
                "nodeMeshKeepaliveTime": f"{KEEPALIVE_S}s",
                "nodeMeshMaxRestartTime": f"{RESTART_S}s",
            },
        },
        {
            "apiVersion": "projectcalico.org/v3",
            "kind": "BGPPeer",
            "metadata": {"name": ROUTER_PEER},
            "spec": {
                "peerIP": router_ip(plan),
                "asNumber": AS_NUMBER,
                "keepaliveTime": f"{KEEPALIVE_S}s",
                "maxRestartTime": f"{RESTART_S}s",
            },
        },
        *([peer6] if plan.ipv6 else []),
    ]


def router_config(plan: LabPlan) -> str:
    """The fabric router's bird.conf: one passive-enough iBGP session per node, learn only."""
    rid = router_ip(plan)
    out = [
        f"# The fabric router of lab {plan.name} (written by tabby's lab).",
        f"router id {rid};",
        "log stderr { info, remote, warning, error, auth, fatal, bug };",
        "protocol device { scan time 2; }",
        f'protocol direct {{ ipv4; {"ipv6; " if plan.ipv6 else ""}interface "rt-*"; }}',
        "protocol kernel {",
        "  scan time 2;",
        "  graceful restart;",
        "  merge paths on;",
        "  ipv4 { import none; export where source = RTS_BGP; };",
        "}",
        *_template("node", rid, "ipv4"),
    ]
    if plan.ipv6:
        out += [
            "protocol kernel {",
            "  scan time 2;",
            "  graceful restart;",
            "  merge paths on;",
            "  ipv6 { import none; export where source = RTS_BGP; };",
            "}",
            *_template("node6", router_ip6(plan), "ipv6"),
        ]
    for node in plan.nodes:
        out += [
            f"protocol bgp {node.name} from node {{",
            f'  description "node {node.name}";',
            f"  neighbor {node.ip} as {AS_NUMBER};",
            "}",
        ]
        if node.ip6:
            out += [
                f"protocol bgp {node.name}_v6 from node6 {{",
                f'  description "node {node.name} (IPv6)";',
                f"  neighbor {node.ip6} as {AS_NUMBER};",
                "}",
            ]
    return "\n".join(out) + "\n"


def _template(name: str, local: str, channel: str) -> list[str]:
    return [
        f"template bgp {name} {{",
        f"  local {local} as {AS_NUMBER};",
        "  multihop;",
        f"  hold time {KEEPALIVE_S * 3};",
        f"  keepalive time {KEEPALIVE_S};",
        "  connect delay time 1;",
        "  connect retry time 2;",
        "  error wait time 1, 10;",
        "  graceful restart on;",
        f"  graceful restart time {RESTART_S};",
        f"  {channel} {{ gateway recursive; import all; export none; }};",
        "}",
    ]


def router_argv(directory: str) -> list[str]:
    return [
        "bird",
        "-f",
        "-c",
        os.path.join(directory, "bird.conf"),
        "-s",
        os.path.join(directory, "bird.ctl"),
    ]

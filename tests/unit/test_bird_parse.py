"""What tabby reads back from birdc: learnt routes (for the route map) and sessions (node
status), parsed from BIRD 2.0.12's own output as captured in a lab."""

from __future__ import annotations

from tabby.dataplane.bird import parse_learned, parse_sessions

RESET = "Connection reset by peer"

ROUTES = """BIRD 2.0.12 ready.
Table master4:
100.96.0.64/26       unicast [Mesh_172_20_64_12 05:24:32.748] * (100) [i]
	via 172.20.32.1 on eth0
	Type: BGP univ
	BGP.origin: IGP
	BGP.as_path:
	BGP.next_hop: 172.20.64.12
	BGP.local_pref: 100
100.96.0.128/26      unicast [Node_172_20_32_11 05:26:23.485 from 172.20.32.11] * (100/?) [i]
	via 172.20.32.13 on eth0
	Type: BGP univ
	BGP.next_hop: 172.20.32.13
	BGP.originator_id: 172.20.32.13
	BGP.cluster_list: 244.0.0.1
100.96.0.0/26        blackhole [tabby_blocks 05:24:18.441] * (200)
	Type: static univ
"""

PROTOCOLS = """BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
device1    Device     ---        up     05:24:18.441
kernel1    Kernel     master4    up     05:24:18.441
Global_172_20_32_1 BGP        ---        up     05:24:18.441  Established
  Description:    global
  BGP state:          Established
    Neighbor address: 172.20.32.1
  Channel ipv4
    Routes:         0 imported, 3 exported, 0 preferred
Node_172_20_64_12 BGP        ---        start  05:25:57.684  Active        Socket: @RESET@
  Description:    node specific
  BGP state:          Active
    Neighbor address: 172.20.64.12
""".replace("@RESET@", RESET)


def test_learnt_routes_carry_the_owning_node_not_the_router():
    assert parse_learned(ROUTES) == {
        "100.96.0.64/26": "172.20.64.12",  # the kernel sends it via the router
        "100.96.0.128/26": "172.20.32.13",  # reflected: the originator stays the next hop
    }


def test_sessions_are_the_bgp_protocols():
    rows = parse_sessions(PROTOCOLS)
    assert [(r.peer, r.type, r.state, r.info, r.imported, r.exported) for r in rows] == [
        ("172.20.32.1", "global", "up", "Established", 0, 3),
        (
            "172.20.64.12",
            "node specific",
            "start",
            "Active        Socket: Connection reset by peer",
            0,
            0,
        ),
    ]
    assert parse_sessions("BIRD 2.0.12 ready.\n") == []

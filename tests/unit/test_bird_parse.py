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


def serve_once(tmp_path, replies: dict[str, bytes]) -> str:
    """A one-connection stand-in for BIRD's control socket: greets, answers one command with
    the canned bytes BIRD 2.0.12 sent for it (codes, '-' continuations, ' ' text lines)."""
    import socket
    import threading

    path = str(tmp_path / "bird.ctl")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            conn.sendall(b"0001 BIRD 2.0.12 ready.\n")
            command = conn.makefile("rb").readline().decode().strip()
            conn.sendall(replies[command])

    threading.Thread(target=run, daemon=True).start()
    return path


def test_control_socket_reply_as_birdc_prints_it(tmp_path):
    from tabby.dataplane.bird import control

    path = serve_once(
        tmp_path,
        {
            "show route export kernel1 where source = RTS_BGP all": (
                b"1007-Table master4:\n"
                b"1007-100.96.0.64/26       unicast [Mesh_172_20_64_12 05:47:05.575] * (100) [i]\n"
                b" \tvia 172.20.32.1 on eth0\n"
                b"1012-\tType: BGP univ\n"
                b" \tBGP.next_hop: 172.20.64.12\n"
                b"0000 \n"
            )
        },
    )
    text = control(path, "show route export kernel1 where source = RTS_BGP all")
    assert text.splitlines()[0] == "Table master4:"
    assert parse_learned(text) == {"100.96.0.64/26": "172.20.64.12"}


def test_control_socket_errors_are_bird_errors(tmp_path):
    import pytest

    from tabby.dataplane.bird import BirdError, control

    path = serve_once(tmp_path, {"show nonsense": b"9001 syntax error, unexpected CF_SYM\n"})
    with pytest.raises(BirdError, match="syntax error"):
        control(path, "show nonsense")
    with pytest.raises(BirdError):
        control(str(tmp_path / "absent.ctl"), "show status")

"""The netpol-matrix harness without a lab: cases files, the concurrent prober (on loopback only),
matrices and the summary line."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from tabby.lab import netpol

CASES = Path(__file__).parents[1] / "fv" / "netpol" / "cases.json"


def test_the_shipped_cases_load_and_cover_the_features() -> None:
    cases = netpol.load_cases(str(CASES))
    assert len(cases) >= 40
    tags = {t for c in cases for t in c["tags"]}
    for feature in (
        "ingress",
        "egress",
        "namespace-selector",
        "pod-selector",
        "match-expressions",
        "ip-block",
        "except",
        "named-port",
        "end-port",
        "update",
        "relabel",
        "create-pod",
        "delete-pod",
        "sctp",
        "policy-types",
        "conntrack",
    ):
        assert feature in tags, feature
    for c in cases:
        for step in c["steps"]:
            for probe in step["probes"]:
                cols = probe["expected"]["columns"]
                assert all(len(r) == len(cols) for r in probe["expected"]["rows"].values())


def test_bad_files_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(netpol.CaseError, match="format"):
        netpol.load_cases(str(bad))
    bad.write_text(json.dumps({"format": netpol.FORMAT, "cases": [{"id": "x"}]}))
    with pytest.raises(netpol.CaseError, match=r"cases\[0\]\.steps"):
        netpol.load_cases(str(bad))


def test_prober_tells_open_from_closed_on_loopback() -> None:
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    closed_tcp = socket.socket()
    closed_tcp.bind(("127.0.0.1", 0))  # bound, never listening: refused
    closed_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed_udp.bind(("127.0.0.1", 0))
    closed_udp_port = closed_udp.getsockname()[1]
    closed_udp.close()  # nobody there: ICMP port unreachable

    def echo() -> None:
        data, peer = udp.recvfrom(100)
        udp.sendto(data, peer)

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    try:
        got = netpol._probe_sockets(
            [
                ("tcp-open", "127.0.0.1", tcp.getsockname()[1], "TCP"),
                ("tcp-closed", "127.0.0.1", closed_tcp.getsockname()[1], "TCP"),
                ("udp-open", "127.0.0.1", udp.getsockname()[1], "UDP"),
                ("udp-closed", "127.0.0.1", closed_udp_port, "UDP"),
            ],
            timeout_s=1.0,
        )
    finally:
        for s in (tcp, udp, closed_tcp):
            s.close()
    assert got == {"tcp-open": True, "tcp-closed": False, "udp-open": True, "udp-closed": False}


def test_render_marks_wrong_cells_and_summary_counts() -> None:
    cols = ["x/a", "x/b"]
    o = netpol.ProbeOutcome(
        "s", 80, "TCP", "pod", {"x/a": ".X", "x/b": ".."}, {"x/a": "..", "x/b": ".."}, cols
    )
    assert o.wrong == 1
    r = netpol.CaseResult("c1", "failed", [o])
    text = netpol.render(r)
    assert "1 WRONG" in text and "x/a  .X  .. <-" in text
    line = netpol.summary(
        [r, netpol.CaseResult("c2", "passed"), netpol.CaseResult("c3", "not-run", why="needs sctp")]
    )
    assert line == "netpol-matrix: 1 passed, 1 failed, 1 not-run of 3 cases; failed: c1"

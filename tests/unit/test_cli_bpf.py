"""tabbyctl bpf nat|conntrack|counters|routes against real pinned maps filled by the test."""

from __future__ import annotations

import ctypes
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tabby.bpf import libbpf
from tabby.bpf.maps.conntrack import CONNTRACK_SPEC, CtKey, CtType, CtValue, TcpFlags
from tabby.bpf.maps.counters import COUNTERS_SPEC, Reason
from tabby.bpf.maps.nat import (
    BACKENDS_SPEC,
    FRONTENDS_SPEC,
    BackendKey,
    BackendValue,
    FrontendKey,
    FrontendValue,
    NatFlags,
)
from tabby.bpf.maps.routes import ROUTES_SPEC
from tabby.bpf.objects import DatapathConfig, DatapathObjects
from tabby.cli import bpf

app = typer.Typer()
app.add_typer(bpf.app, name="bpf")
runner = CliRunner()


def tabbyctl(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["bpf", *args])
    return result.exit_code, result.output


# --- without maps ---------------------------------------------------------------------------------


def test_missing_lab_pins_is_one_line_error() -> None:
    code, out = tabbyctl("nat", "dump", "--lab", "nolab-xyz", "--node", "node7")
    assert code == 1
    assert "no tabby pins at /sys/fs/bpf/tabby/nolab-xyz-node7" in out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1


def test_missing_pin_root_is_one_line_error(tmp_path: Path) -> None:
    code, out = tabbyctl("counters", "--pin-root", str(tmp_path / "absent"))
    assert code == 1 and "no tabby pins at" in out and len(out.strip().splitlines()) == 1


def test_missing_map_is_named(tmp_path: Path) -> None:
    code, out = tabbyctl("conntrack", "dump", "--pin-root", str(tmp_path))
    assert code == 1 and "map tby_ct is not pinned" in out


def test_bad_options_are_one_line_errors(tmp_path: Path) -> None:
    assert tabbyctl("counters", "-o", "yaml", "--pin-root", str(tmp_path))[0] == 1
    code, out = tabbyctl("conntrack", "dump", "--proto", "SCTP", "--pin-root", str(tmp_path))
    assert code == 1 and "--proto must be TCP or UDP" in out
    code, out = tabbyctl("conntrack", "dump", "--ip", "nope", "--pin-root", str(tmp_path))
    assert code == 1 and "--ip must be an IPv4 address" in out


def test_flag_names() -> None:
    assert bpf.flag_names(0, 0) == []
    assert bpf.flag_names(int(NatFlags.AFFINITY | NatFlags.EXTERNAL), 10800) == [
        "affinity(10800s)",
        "external",
    ]
    assert bpf.flag_names(1 << 20, 0) == ["0x100000"]


# --- against a loaded datapath -------------------------------------------------------------------

FRONTENDS = [
    # (vip, port, proto, id, backends, flags, affinity_s)
    (
        "100.64.0.10",
        80,
        "TCP",
        7,
        [("100.96.1.2", 8080), ("100.96.2.3", 8080)],
        NatFlags.AFFINITY,
        10800,
    ),
    ("100.64.0.2", 53, "UDP", 3, [("100.96.1.9", 53)], NatFlags(0), 0),
    ("100.64.0.10", 443, "TCP", 8, [], NatFlags.DROP_EMPTY, 0),
]


@pytest.fixture
def node_pins(pin_root: str, bpf_dir: Path) -> Iterator[str]:
    with DatapathObjects(pin_root, DatapathConfig.build(), bpf_dir) as dp:
        fe, be = dp.map(FRONTENDS_SPEC), dp.map(BACKENDS_SPEC)
        for vip, port, proto, set_id, backends, flags, aff in FRONTENDS:
            for ordinal, (addr, bport) in enumerate(backends):
                be.update(BackendKey(id=set_id, ordinal=ordinal), BackendValue.make(addr, bport))
            fe.update(
                FrontendKey.make(vip, port, proto),
                FrontendValue(id=set_id, count=len(backends), flags=flags, affinity_s=aff),
            )
        # A frontend whose set misses an ordinal (half-written): shown, not hidden.
        fe.update(FrontendKey.make("100.64.0.20", 8080, "TCP"), FrontendValue(id=9, count=2))
        be.update(BackendKey(id=9, ordinal=0), BackendValue.make("100.96.3.4", 80))

        now = time.monotonic_ns()
        ct = dp.map(CONNTRACK_SPEC)
        tcp, udp = socket.IPPROTO_TCP, socket.IPPROTO_UDP
        fwd = CtValue(
            created_ns=now - 30 * 10**9,
            seen_ns=now - 2 * 10**9,
            type=CtType.NAT_FWD,
            tcp=TcpFlags.SYN | TcpFlags.SYNACK,
        )
        fwd.nat_addr, fwd.nat_port = BackendValue.make("100.96.1.2", 8080).addr, 8080
        rev = CtValue(created_ns=now - 30 * 10**9, seen_ns=now - 10**9, type=CtType.NAT_REV)
        rev.nat_addr, rev.nat_port = FrontendKey.make("100.64.0.10", 80, "TCP").addr, 80
        ct.update(CtKey.make("100.96.5.5", 40000, "100.64.0.10", 80, tcp), fwd)
        ct.update(CtKey.make("100.96.1.2", 8080, "100.96.5.5", 40000, tcp), rev)
        dns = CtValue(created_ns=now - 10**9, seen_ns=now - 10**9, type=CtType.NAT_FWD)
        dns.nat_addr, dns.nat_port = BackendValue.make("100.96.1.9", 53).addr, 53
        ct.update(CtKey.make("100.96.5.5", 5353, "100.64.0.2", 53, udp), dns)

        counters = dp.map(COUNTERS_SPEC)
        ncpus = libbpf.possible_cpus()
        per_cpu = ctypes.c_uint64 * ncpus

        def count(reason: Reason, total: int) -> None:
            slots = [0] * ncpus  # spread over the first and last CPU: the CLI sums them
            slots[-1] += total // 2
            slots[0] += total - total // 2
            counters.update(ctypes.c_uint32(reason), per_cpu(*slots))

        count(Reason.NAT_NEW, 5)
        count(Reason.NAT_FWD, 41)
        count(Reason.DROP_SPOOF, 3)
        yield pin_root


@pytest.mark.root
def test_nat_dump_json(node_pins: str) -> None:
    code, out = tabbyctl("nat", "dump", "--pin-root", node_pins, "-o", "json")
    assert code == 0, out
    rows = json.loads(out)
    assert [r["frontend"] for r in rows] == [
        "100.64.0.2:53/UDP",
        "100.64.0.10:80/TCP",
        "100.64.0.10:443/TCP",
        "100.64.0.20:8080/TCP",
    ]
    web = rows[1]
    assert web == {
        "frontend": "100.64.0.10:80/TCP",
        "addr": "100.64.0.10",
        "port": 80,
        "protocol": "TCP",
        "id": 7,
        "count": 2,
        "flags": ["affinity(10800s)"],
        "affinity_s": 10800,
        "backends": [
            {"ordinal": 0, "addr": "100.96.1.2", "port": 8080},
            {"ordinal": 1, "addr": "100.96.2.3", "port": 8080},
        ],
    }
    assert rows[2]["backends"] == [] and rows[2]["flags"] == ["drop_empty"]
    assert rows[3]["backends"][1] == {"ordinal": 1, "addr": None, "port": None}


@pytest.mark.root
def test_nat_dump_table_and_text(node_pins: str) -> None:
    code, out = tabbyctl("nat", "dump", "--pin-root", node_pins)
    assert code == 0, out
    for text in ("100.64.0.10:80/TCP", "affinity(10800s)", "100.96.2.3:8080", "<missing>"):
        assert text in out
    code, out = tabbyctl("nat", "dump", "--pin-root", node_pins, "-o", "text")
    assert code == 0, out
    lines = out.splitlines()
    i = lines.index("100.64.0.10:80/TCP id 7 count 2 flags affinity(10800s)")
    assert lines[i + 1 : i + 3] == ["\t7:0\t100.96.1.2:8080", "\t7:1\t100.96.2.3:8080"]


@pytest.mark.root
def test_conntrack_dump(node_pins: str) -> None:
    code, out = tabbyctl("conntrack", "dump", "--pin-root", node_pins, "-o", "json")
    assert code == 0, out
    rows = json.loads(out)
    assert len(rows) == 3
    fwd = next(r for r in rows if r["type"] == "FWD" and r["proto"] == "TCP")
    assert fwd["src"] == "100.96.5.5" and fwd["sport"] == 40000
    assert (fwd["dst"], fwd["dport"]) == ("100.64.0.10", 80)
    assert (fwd["nat_addr"], fwd["nat_port"]) == ("100.96.1.2", 8080)
    assert fwd["snat_addr"] is None and fwd["tcp_flags"] == ["SYN", "SYNACK"]
    assert 29 < fwd["age_s"] < 120 and 1 < fwd["idle_s"] < 90
    rev = next(r for r in rows if r["type"] == "REV")
    assert (rev["nat_addr"], rev["nat_port"]) == ("100.64.0.10", 80)

    def count(*filters: str) -> int:
        code, out = tabbyctl("conntrack", "dump", "--pin-root", node_pins, "-o", "json", *filters)
        assert code == 0, out
        return len(json.loads(out))

    assert count("--proto", "udp") == 1
    assert count("--proto", "TCP") == 2
    assert count("--ip", "100.96.1.2") == 2  # the REV key and the FWD's NAT address
    assert count("--port", "53") == 1
    assert count("--ip", "100.64.0.10", "--type", "REV") == 1
    assert count("--ip", "192.0.2.1") == 0

    code, out = tabbyctl("conntrack", "dump", "--pin-root", node_pins)
    assert code == 0, out
    for text in ("100.96.5.5:40000", "100.64.0.10:80", "FWD", "REV", "SYN,SYNACK"):
        assert text in out


@pytest.mark.root
def test_counters(node_pins: str) -> None:
    code, out = tabbyctl("counters", "--pin-root", node_pins, "-o", "json")
    assert code == 0, out
    assert json.loads(out) == {"drop_spoof": 3, "nat_new": 5, "nat_fwd": 41}
    code, out = tabbyctl("counters", "--pin-root", node_pins, "-o", "json", "--all")
    every = json.loads(out)
    assert list(every) == [r.label for r in Reason] and every["pass_wl_out"] == 0
    code, out = tabbyctl("counters", "--pin-root", node_pins)
    assert code == 0, out
    assert "drop_spoof" in out and "41" in out and "pass_wl_out" not in out


@pytest.mark.root
def test_nat_maglev_shows_each_table_and_where_a_client_lands(pin_root: str, bpf_dir: Path) -> None:
    from tabby.bpf.maps.maglev import MAGLEV_SPEC, flow_hash
    from tabby.bpf.maps.nat import SOURCE_RANGES_SPEC
    from tabby.calc import maglev
    from tabby.calc.services import MAGLEV_ANNOTATION, service_nat
    from tabby.dataplane.nat import NatManager

    pods = ["100.96.1.2", "100.96.2.3", "100.96.3.4"]
    svc = {
        "metadata": {
            "namespace": "default",
            "name": "web",
            "annotations": {MAGLEV_ANNOTATION: "maglev"},
        },
        "spec": {
            "clusterIP": "100.64.0.10",
            "externalIPs": ["198.51.100.7"],
            "ports": [{"port": 80}],
        },
    }
    eps = {
        "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"port": 80}],
        "endpoints": [{"addresses": [a]} for a in pods],
    }
    with DatapathObjects(pin_root, DatapathConfig.build(), bpf_dir) as dp:
        specs = (FRONTENDS_SPEC, BACKENDS_SPEC, SOURCE_RANGES_SPEC, MAGLEV_SPEC)
        nat = NatManager(*(dp.map(s) for s in specs))
        assert not nat.apply({"default/web": service_nat(svc, [eps], "n1", "172.20.32.11")}).errors
        code, out = tabbyctl(
            "nat", "maglev", "--pin-root", pin_root, "-o", "json", "--client", "203.0.113.10:40000"
        )
        assert code == 0, out
        (row,) = json.loads(out)
        m = maglev.table_size()
        assert row["frontends"] == ["198.51.100.7:80/TCP"] and row["slots"] == row["filled"] == m
        assert [b["backend"] for b in row["backends"]] == [f"{a}:80" for a in pods]
        assert {b["slots"] for b in row["backends"]} <= {m // 3, m // 3 + 1}
        table = maglev.backend_table([(a, 80) for a in pods], m)
        want = table[flow_hash("203.0.113.10", "198.51.100.7", 40000, 80, 6) % m]
        assert row["picks"] == {"198.51.100.7:80/TCP": f"{want[0]}:{want[1]}"}
        code, out = tabbyctl("nat", "maglev", "--pin-root", pin_root)
        assert code == 0 and "198.51.100.7:80/TCP" in out and "33.3%" in out, out
        code, out = tabbyctl("nat", "dump", "--pin-root", pin_root, "-o", "json")
        flags = {r["frontend"]: r["flags"] for r in json.loads(out)}
        assert flags["198.51.100.7:80/TCP"] == ["external", "maglev"]
        assert flags["100.64.0.10:80/TCP"] == []
    code, out = tabbyctl("nat", "maglev", "--pin-root", pin_root, "--client", "nope")
    assert code == 1 and "--client must be IPv4:PORT" in out


@pytest.mark.root
def test_routes_show_a_local_pods_frame_addresses(pin_root: str, bpf_dir: Path) -> None:
    from tabby.bpf.maps.routes import WL_DEVS_SPEC, RoutesMap, RouteValue, WlDevValue

    pod = WlDevValue.make("7e:6f:71:79:dc:1f", "ee:ee:00:00:00:01", 1450)

    with DatapathObjects(pin_root, DatapathConfig.build(), bpf_dir) as dp:
        routes = RoutesMap(dp.map(ROUTES_SPEC))
        routes.upsert("100.96.1.0/26", RouteValue.remote_workload("172.20.64.12", "vxlan"))
        routes.upsert("100.96.0.5/32", RouteValue.local_workload(31, netnsid=4))
        routes.upsert("100.96.0.6/32", RouteValue.local_workload(32))  # its MAC not read
        devs = dp.map(WL_DEVS_SPEC)
        devs.update(ctypes.c_uint32(31), pod)
        code, out = tabbyctl("routes", "--pin-root", pin_root, "-o", "json")
        assert code == 0, out
        rows = json.loads(out)
        assert [r["cidr"] for r in rows] == ["100.96.0.5/32", "100.96.0.6/32", "100.96.1.0/26"]
        assert rows[0] == {
            "cidr": "100.96.0.5/32",
            "flags": ["local-wl", "netns"],
            "ifindex": 31,
            "next_hop": None,
            "netnsid": 4,
            "pod_mac": "7e:6f:71:79:dc:1f",
            "gateway_mac": "ee:ee:00:00:00:01",
            "mtu": 1450,
        }
        assert "pod_mac" not in rows[1]
        assert rows[2]["flags"] == ["remote-wl", "encap-vxlan"]
        assert rows[2]["next_hop"] == "172.20.64.12"
        code, out = tabbyctl("routes", "--pin-root", pin_root)
        assert code == 0 and "7e:6f:71:79:dc:1f" in out and "172.20.64.12" in out, out

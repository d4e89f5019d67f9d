"""The conntrack sweep (tby_ct_gc) under BPF_PROG_TEST_RUN, table-driven.

Each case writes NAT pairs (or single halves) into a real tby_ct with seen_ns set relative to
CLOCK_MONOTONIC (what bpf_ktime_get_ns() reads), runs one sweep, and checks which halves remain
and what the sweep reported. The sweep judges ADVANCE_S seconds in the future (its cb[0] input)
and entries are stamped relative to that moment: "idle 3601 s" must not need an hour of uptime.
The NAT maps hold one TCP and one UDP service; "removed" backends are addresses that simply are
not among a frontend's ordinals.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tabby.bpf import libbpf
from tabby.bpf.maps.conntrack import (
    CONNTRACK_SPEC,
    CtFlags,
    CtKey,
    CtType,
    CtValue,
    TcpFlags,
)
from tabby.bpf.maps.ctgc import CT_GC_STATS_SPEC, TIMEOUTS_S
from tabby.bpf.maps.nat import (
    BACKENDS_SPEC,
    FRONTENDS_SPEC,
    PROTOCOLS,
    BackendKey,
    BackendValue,
    FrontendKey,
    FrontendValue,
)
from tabby.bpf.objects import DatapathConfig, DatapathObjects, default_bpf_dir
from tabby.dataplane.conntrack import ConntrackGC, GcStats, read_entries

REPO = Path(__file__).resolve().parents[2]
TIMEOUTS_H = REPO / "bpf/include/tabby/ct_timeouts.h"

TCP_FE = ("10.96.0.10", 80)
UDP_FE = ("10.96.0.53", 53)
GONE_FE = ("10.96.0.99", 53)  # never in tby_nat_fe
TCP_BACKENDS = [("100.96.0.5", 8080), ("100.96.0.9", 8080)]
UDP_BACKENDS = [("100.96.0.5", 5353), ("100.96.0.9", 5353)]
REMOVED = ("100.96.0.70", 5353)  # was a backend, is no longer one
CLIENT = "100.96.0.20"
SNAT = "172.20.32.10"

ADVANCE_S = 3700  # > every idle time below
S = TcpFlags.SYN
EST = TcpFlags.SYN | TcpFlags.SYNACK
DSR = CtFlags.TUNNEL | CtFlags.DSR


@dataclass(frozen=True)
class Flow:
    """One NAT pair as the datapath would write it; ``halves`` says which exist."""

    proto: str
    cport: int
    frontend: tuple[str, int]
    backend: tuple[str, int]
    idle_s: float = 1.0  # of the FWD half
    rev_idle_s: float | None = None  # default: same as the FWD half
    fwd_tcp: int = 0
    rev_tcp: int = 0
    snat_port: int = 0  # != 0: the forward packet was SNATed to SNAT:snat_port
    halves: str = "both"  # "both" | "fwd" | "rev"
    fwd_flags: int = 0  # CtFlags of the FWD half
    proto_num: int = 0  # overrides proto (ICMP, SCTP...)

    @property
    def pnum(self) -> int:
        return self.proto_num or PROTOCOLS[self.proto]

    def fwd_key(self) -> CtKey:
        return CtKey.make(CLIENT, self.cport, *self.frontend, self.pnum)

    def rev_key(self) -> CtKey:
        src, sport = (SNAT, self.snat_port) if self.snat_port else (CLIENT, self.cport)
        return CtKey.make(src, sport, *self.backend, self.pnum)

    def entries(self, now_ns: int) -> list[tuple[CtKey, CtValue]]:
        def seen(idle_s: float) -> int:
            return now_ns - int(idle_s * 1e9)

        rev_idle = self.idle_s if self.rev_idle_s is None else self.rev_idle_s
        fwd = CtValue(
            created_ns=seen(max(self.idle_s, rev_idle) + 1),
            seen_ns=seen(self.idle_s),
            type=CtType.NAT_FWD,
            tcp=self.fwd_tcp,
            flags=self.fwd_flags,
            nat_addr=_ip(self.backend[0]),
            nat_port=self.backend[1],
            nat_saddr=_ip(SNAT) if self.snat_port else 0,
            nat_sport=self.snat_port,
        )
        rev = CtValue(
            created_ns=fwd.created_ns,
            seen_ns=seen(rev_idle),
            type=CtType.NAT_REV,
            tcp=self.rev_tcp,
            nat_addr=_ip(self.frontend[0]),
            nat_port=self.frontend[1],
            nat_saddr=_ip(CLIENT) if self.snat_port else 0,
            nat_sport=self.cport if self.snat_port else 0,
        )
        out = []
        if self.halves in ("both", "fwd"):
            out.append((self.fwd_key(), fwd))
        if self.halves in ("both", "rev"):
            out.append((self.rev_key(), rev))
        return out


def _ip(addr: str) -> int:
    return int.from_bytes(bytes(int(b) for b in addr.split(".")), "big")


@dataclass(frozen=True)
class Case:
    description: str
    flow: Flow
    outcome: str  # "kept" | "expired" | "stale_udp"
    extra: Callable[[int], list[tuple[CtKey, CtValue]]] = lambda now: []  # written, must stay

    def __str__(self) -> str:
        return self.description


def tcp(cport: int, **kw: object) -> Flow:
    return Flow("TCP", cport, TCP_FE, TCP_BACKENDS[0], **kw)  # type: ignore[arg-type]


def udp(cport: int, **kw: object) -> Flow:
    kw.setdefault("backend", UDP_BACKENDS[1])
    return Flow("UDP", cport, kw.pop("frontend", UDP_FE), **kw)  # type: ignore[arg-type]


def judged_at() -> int:
    """The moment the next sweep judges against (CLOCK_MONOTONIC + ADVANCE_S), in ns."""
    return time.monotonic_ns() + ADVANCE_S * 10**9


def _foreign_rev(now: int) -> list[tuple[CtKey, CtValue]]:
    """A REV under the key case 'foreign REV' computes, but naming another frontend and client."""
    key = CtKey.make(CLIENT, 41000, *TCP_BACKENDS[0], PROTOCOLS["TCP"])
    val = CtValue(
        created_ns=now, seen_ns=now, type=CtType.NAT_REV, tcp=EST,
        nat_addr=_ip("10.96.0.11"), nat_port=80,
    )  # fmt: skip
    return [(key, val)]


CASES = [
    Case("tcp established, fresh", tcp(40001, fwd_tcp=S, rev_tcp=EST), "kept"),
    Case("tcp established, idle 3599 s", tcp(40002, idle_s=3599, fwd_tcp=S, rev_tcp=EST), "kept"),
    Case("tcp established, idle 3601 s", tcp(40003, idle_s=3601, fwd_tcp=S, rev_tcp=EST),
         "expired"),
    Case("tcp established, one half idle 3601 s, other fresh",
         tcp(40004, idle_s=3601, rev_idle_s=5, fwd_tcp=S, rev_tcp=EST), "kept"),
    Case("tcp syn only, idle 19 s", tcp(40005, idle_s=19, fwd_tcp=S), "kept"),
    Case("tcp syn only, idle 21 s", tcp(40006, idle_s=21, fwd_tcp=S), "expired"),
    Case("tcp no flags, idle 21 s", tcp(40007, idle_s=21), "expired"),
    Case("tcp fin both ways, idle 29 s",
         tcp(40008, idle_s=29, fwd_tcp=S | TcpFlags.FIN_FWD, rev_tcp=EST | TcpFlags.FIN_REV),
         "kept"),
    Case("tcp fin both ways, idle 31 s",
         tcp(40009, idle_s=31, fwd_tcp=S | TcpFlags.FIN_FWD, rev_tcp=EST | TcpFlags.FIN_REV),
         "expired"),
    Case("tcp fin one way, idle 31 s (still established)",
         tcp(40010, idle_s=31, fwd_tcp=S | TcpFlags.FIN_FWD, rev_tcp=EST), "kept"),
    # a DSR ingress node sees the client's packets only (its SYNACK bit: the client's ACK)
    Case("dsr ingress, client fin, idle 31 s",
         tcp(40019, idle_s=31, fwd_tcp=EST | TcpFlags.FIN_FWD, fwd_flags=DSR), "expired"),
    Case("dsr ingress, client fin, idle 29 s",
         tcp(40020, idle_s=29, fwd_tcp=EST | TcpFlags.FIN_FWD, fwd_flags=DSR), "kept"),
    Case("dsr ingress, no fin, idle 31 s (established)",
         tcp(40021, idle_s=31, fwd_tcp=EST, fwd_flags=DSR), "kept"),
    Case("tunnel ingress (not dsr), client fin, idle 31 s (replies seen: still established)",
         tcp(40022, idle_s=31, fwd_tcp=EST | TcpFlags.FIN_FWD, fwd_flags=CtFlags.TUNNEL),
         "kept"),
    Case("tcp rst, idle 39 s", tcp(40011, idle_s=39, fwd_tcp=S | TcpFlags.RST, rev_tcp=EST),
         "kept"),
    Case("tcp rst, idle 41 s", tcp(40012, idle_s=41, fwd_tcp=S, rev_tcp=EST | TcpFlags.RST),
         "expired"),
    Case("tcp fresh to a removed backend stays",
         Flow("TCP", 40013, TCP_FE, ("100.96.0.70", 8080), fwd_tcp=S, rev_tcp=EST), "kept"),
    Case("tcp fresh, frontend gone, stays",
         Flow("TCP", 40014, ("10.96.0.99", 80), TCP_BACKENDS[0], fwd_tcp=S, rev_tcp=EST), "kept"),
    Case("tcp snat established, idle 3601 s",
         tcp(40015, idle_s=3601, fwd_tcp=S, rev_tcp=EST, snat_port=61000), "expired"),
    Case("tcp snat established, fresh", tcp(40016, fwd_tcp=S, rev_tcp=EST, snat_port=61001),
         "kept"),
    Case("udp fresh, live backend", udp(50001), "kept"),
    Case("udp fresh, live backend at ordinal 0", udp(50002, backend=UDP_BACKENDS[0]), "kept"),
    Case("udp idle 59 s", udp(50003, idle_s=59), "kept"),
    Case("udp idle 61 s", udp(50004, idle_s=61), "expired"),
    Case("udp fresh, backend removed from its frontend", udp(50005, backend=REMOVED),
         "stale_udp"),
    Case("udp fresh, frontend gone", udp(50006, frontend=GONE_FE), "stale_udp"),
    Case("udp snat fresh, backend removed", udp(50007, backend=REMOVED, snat_port=62000),
         "stale_udp"),
    Case("udp snat fresh, live backend", udp(50008, snat_port=62001), "kept"),
    Case("orphan rev, fresh", udp(50009, halves="rev"), "kept"),
    Case("orphan rev, udp idle 61 s", udp(50010, idle_s=61, halves="rev"), "expired"),
    Case("orphan rev, tcp syn idle 21 s", tcp(40017, idle_s=21, fwd_tcp=S, halves="rev"),
         "expired"),
    Case("orphan fwd, tcp established idle 3601 s",
         tcp(40018, idle_s=3601, fwd_tcp=EST, halves="fwd"), "expired"),
    Case("orphan fwd, udp fresh, backend removed", udp(50011, backend=REMOVED, halves="fwd"),
         "stale_udp"),
    Case("other protocol idle 61 s", Flow("", 0, ("10.96.0.12", 0), ("100.96.0.5", 0),
                                          idle_s=61, proto_num=132), "expired"),
    Case("other protocol idle 59 s", Flow("", 1, ("10.96.0.12", 0), ("100.96.0.5", 0),
                                          idle_s=59, proto_num=132), "kept"),
    Case("a REV that names another frontend is not the partner: FWD expires alone",
         tcp(41000, idle_s=3601, fwd_tcp=EST, halves="fwd"), "expired", extra=_foreign_rev),
]  # fmt: skip


class Sweeper:
    """ct_gc.o alone on a throw-away pin root, with the NAT maps of the module docstring."""

    def __init__(self, obj: libbpf.Object) -> None:
        self.obj = obj
        self.ct = CONNTRACK_SPEC.open_in(obj)
        self.gc = ConntrackGC.of_object(obj)
        fe, be = FRONTENDS_SPEC.open_in(obj), BACKENDS_SPEC.open_in(obj)
        for set_id, (addr, port), proto, backends in (
            (1, TCP_FE, "TCP", TCP_BACKENDS),
            (2, UDP_FE, "UDP", UDP_BACKENDS),
        ):
            for ordinal, (baddr, bport) in enumerate(backends):
                be.update(BackendKey(set_id, ordinal), BackendValue.make(baddr, bport))
            fe.update(FrontendKey.make(addr, port, proto), FrontendValue(set_id, len(backends)))
        # a stale ordinal beyond count must not count as a live backend
        be.update(BackendKey(2, len(UDP_BACKENDS)), BackendValue.make(*REMOVED))

    def write(self, entries: list[tuple[CtKey, CtValue]]) -> None:
        keys, vals = [k for k, _ in entries], [v for _, v in entries]
        assert self.ct.update_batch(keys, vals) == len(entries)

    def keys(self) -> set[bytes]:
        return {bytes(k) for k, _ in self.ct.lookup_batch()}


@pytest.fixture
def sweeper(pin_root: str) -> Iterator[Sweeper]:
    path = default_bpf_dir() / "ct_gc.o"
    if not path.is_file():
        subprocess.run(["make", "-s", str(path.relative_to(REPO))], cwd=REPO, check=True)
    obj = libbpf.Object(str(path), pin_root=pin_root)
    try:
        obj.set_rodata(DatapathConfig.build())
        obj.load()
        yield Sweeper(obj)
    finally:
        obj.close()


def _expected(cases: list[Case]) -> tuple[set[bytes], dict[str, int]]:
    """(keys that must remain, expected counters) for cases written together."""
    remain: set[bytes] = set()
    counts = {"kept": 0, "expired": 0, "stale_udp": 0, "orphans": 0, "decisions": 0}
    for case in cases:
        halves = case.flow.entries(0)
        extra = case.extra(0)
        counts[case.outcome] += len(halves)
        remain |= {bytes(k) for k, _ in extra}
        counts["kept"] += len(extra)
        if case.outcome == "kept":
            remain |= {bytes(k) for k, _ in halves}
        else:
            counts["decisions"] += 1  # one visit deletes the whole pair
            if case.outcome == "expired" and len(halves) == 1:
                counts["orphans"] += 1
    return remain, counts


def _check(sweeper: Sweeper, cases: list[Case]) -> GcStats:
    now = judged_at()
    keys = [bytes(k) for c in cases for k, _ in c.flow.entries(now) + c.extra(now)]
    assert len(keys) == len(set(keys)), "two cases write the same key"
    for case in cases:
        sweeper.write(case.flow.entries(now) + case.extra(now))
    stats = sweeper.gc.sweep(ADVANCE_S)
    remain, counts = _expected(cases)
    assert sweeper.keys() == remain
    assert (stats.kept, stats.expired, stats.stale_udp, stats.orphans) == (
        counts["kept"],
        counts["expired"],
        counts["stale_udp"],
        counts["orphans"],
    )
    # kept halves are all visited; a deleted pair's REV only if the walk met it before its FWD
    deleted = counts["expired"] + counts["stale_udp"]
    assert counts["kept"] + counts["decisions"] <= stats.scanned <= counts["kept"] + deleted
    return stats


@pytest.mark.root
@pytest.mark.parametrize("case", CASES, ids=str)
def test_sweep_case(sweeper: Sweeper, case: Case) -> None:
    _check(sweeper, [case])


@pytest.mark.root
def test_sweep_all_cases_at_once(sweeper: Sweeper) -> None:
    stats = _check(sweeper, CASES)
    assert stats.cpu_s >= 0 and stats.wall_s > 0
    again = sweeper.gc.sweep(ADVANCE_S)  # a second sweep finds nothing more to do
    assert (again.scanned, again.kept, again.expired, again.stale_udp) == (
        stats.kept,
        stats.kept,
        0,
        0,
    )


@pytest.mark.root
def test_empty_map_sweeps_to_zero(sweeper: Sweeper) -> None:
    stats = sweeper.gc.sweep()
    assert (stats.scanned, stats.kept, stats.deleted) == (0, 0, 0)


@pytest.mark.root
def test_backend_removed_later_makes_udp_stale(sweeper: Sweeper) -> None:
    """What the agent does after a NAT apply: shrink the set, sweep, the flow is gone."""
    flow = udp(50100)
    sweeper.write(flow.entries(judged_at()))
    assert sweeper.gc.sweep(ADVANCE_S).deleted == 0
    fe = FRONTENDS_SPEC.open_in(sweeper.obj)
    fe.update(FrontendKey.make(*UDP_FE, "UDP"), FrontendValue(2, 1))  # ordinal 1 dropped
    stats = sweeper.gc.sweep(ADVANCE_S)
    assert (stats.stale_udp, sweeper.keys()) == (2, set())


@pytest.mark.root
def test_read_entries_decodes_and_filters(sweeper: Sweeper) -> None:
    now = judged_at()
    sweeper.write(udp(50200, idle_s=3).entries(now) + tcp(40200, fwd_tcp=EST).entries(now))
    entries = read_entries(sweeper.ct, now_ns=now)
    assert len(entries) == 4
    udp_fwd = read_entries(sweeper.ct, proto="udp", kind=CtType.NAT_FWD, now_ns=now)
    assert [(e.key, e.type, e.nat) for e in udp_fwd] == [
        (f"UDP {CLIENT}:50200 -> {UDP_FE[0]}:{UDP_FE[1]}", "NAT_FWD", "100.96.0.9:5353")
    ]
    assert udp_fwd[0].idle_s == pytest.approx(3.0)
    assert len(read_entries(sweeper.ct, addr=TCP_BACKENDS[0][0], now_ns=now)) == 2
    assert len(read_entries(sweeper.ct, port=40200, now_ns=now)) == 2


@pytest.mark.root
def test_sweep_through_the_node_datapath(bpf_dir: Path, pin_root: str) -> None:
    """ct_gc.o is an entry object: DatapathObjects loads it on the node's shared maps."""
    with DatapathObjects(pin_root, DatapathConfig.build(), bpf_dir) as dp:
        now = judged_at()
        ct = dp.map(CONNTRACK_SPEC)
        for key, val in udp(50300, idle_s=61).entries(now) + udp(50301).entries(now):
            ct.update(key, val)
        stats = ConntrackGC.of(dp).sweep(ADVANCE_S)
        assert (stats.expired, stats.stale_udp, stats.kept) == (2, 2, 0)  # no frontends: stale


def test_timeouts_match_ct_timeouts_h() -> None:
    defines = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"#define TBY_CT_TIMEOUT_(\w+)_S (\d+)", TIMEOUTS_H.read_text())
    }
    assert defines == TIMEOUTS_S


def test_stats_slot_is_one_u64_block() -> None:
    assert ctypes.sizeof(CT_GC_STATS_SPEC.value_type) == 6 * 8


@pytest.mark.root
def test_policy_only_flows_expire_by_timeout_and_are_no_orphans(sweeper: Sweeper) -> None:
    """TBY_CT_PLAIN entries (verdicts of flows no NAT touched) are single by design."""
    now = judged_at()
    fresh = CtKey.make(CLIENT, 42000, "100.96.0.5", 80, PROTOCOLS["UDP"])
    idle = CtKey.make(CLIENT, 42001, "100.96.0.5", 80, PROTOCOLS["UDP"])
    sweeper.write(
        [
            (fresh, CtValue(created_ns=now, seen_ns=now, type=CtType.PLAIN, pol=2)),
            (idle, CtValue(created_ns=now, seen_ns=now - 61 * 10**9, type=CtType.PLAIN, pol=2)),
        ]
    )
    stats = sweeper.gc.sweep(ADVANCE_S)
    assert sweeper.keys() == {bytes(fresh)}
    assert (stats.kept, stats.expired, stats.orphans) == (1, 1, 0)

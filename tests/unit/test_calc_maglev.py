"""calc.maglev: the standard Maglev table (balance, 1/N disruption, same on every node), and the
Maglev part of the NAT manager (dataplane/maglev.py): which sets get a table under the cap."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tabby.calc import maglev
from tabby.calc.services import MAGLEV_ANNOTATION, NAT_EXTERNAL, NAT_MAGLEV, service_nat
from tabby.dataplane.maglev import MaglevConfig, MaglevTables

M = maglev.table_size()


def backends(n: int, start: int = 0) -> list[tuple[str, int]]:
    return [(f"100.96.{i // 200}.{i % 200 + 1}", 8080) for i in range(start, start + n)]


def test_table_size_is_the_prime_above_100_per_endpoint():
    assert M == 1009 and maglev.table_size(1) == 101 and maglev.table_size(100) == 10007
    with pytest.raises(ValueError, match="not a prime"):
        maglev.table([("10.0.0.1", 80)], 1000)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 64])
def test_every_backend_gets_its_share_of_slots_within_one(n):
    counts = Counter(maglev.backend_table(backends(n), M))
    assert set(counts) == set(backends(n))
    assert max(counts.values()) - min(counts.values()) <= 1
    assert sum(counts.values()) == M


def test_the_table_depends_on_the_backends_only_not_their_order():
    bs = backends(9)
    shuffled = bs[:]
    random.Random(7).shuffle(shuffled)
    assert maglev.backend_table(bs, M) == maglev.backend_table(shuffled, M)
    assert maglev.backend_table([], M) == ()


@pytest.mark.parametrize("n", [3, 4, 5, 10])
def test_removing_one_of_n_backends_moves_about_one_nth_of_the_slots(n):
    bs = backends(n)
    gone = bs[n // 2]
    before = maglev.backend_table(bs, M)
    after = maglev.backend_table([b for b in bs if b != gone], M)
    moved = [i for i in range(M) if before[i] != after[i]]
    # every slot of the removed backend moves; of the others only a few percent
    assert {i for i in range(M) if before[i] == gone} <= set(moved)
    others = [i for i in moved if before[i] != gone]
    assert len(others) < 0.05 * M, len(others)
    assert len(moved) / M < 1 / n + 0.05


def test_adding_a_backend_takes_slots_mostly_from_the_others_evenly():
    before = maglev.backend_table(backends(4), M)
    after = maglev.backend_table(backends(5), M)
    moved = sum(1 for a, b in zip(before, after, strict=True) if a != b)
    assert moved / M < 1 / 5 + 0.05


def _svc(name: str, annotated: bool = True, **spec):
    meta = {"namespace": "default", "name": name}
    if annotated:
        meta["annotations"] = {MAGLEV_ANNOTATION: "maglev"}
    body = {
        "clusterIP": "100.64.0.9",
        "type": "LoadBalancer",
        "externalIPs": ["198.51.100.9"],
        "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080}],
        **spec,
    }
    return {"metadata": meta, "spec": body}


def _slices(name: str, n: int = 3):
    return [
        {
            "metadata": {
                "namespace": "default",
                "name": f"{name}-1",
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "ports": [{"port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a]} for a, _ in backends(n)],
        }
    ]


def test_the_annotation_marks_external_frontends_only():
    nat = service_nat(_svc("web"), _slices("web"), "node1", "172.20.32.11")
    flags = {f.kind: f.flags for f in nat.frontends}
    assert flags["ClusterIP"] & NAT_MAGLEV == 0
    for kind in ("NodePort", "ExternalIP"):
        assert flags[kind] & (NAT_MAGLEV | NAT_EXTERNAL) == NAT_MAGLEV | NAT_EXTERNAL, kind
    plain = service_nat(_svc("web", annotated=False), _slices("web"), "node1", "172.20.32.11")
    assert not any(f.flags & NAT_MAGLEV for f in plain.frontends)


def test_an_unknown_strategy_is_a_warning_and_no_maglev():
    svc = _svc("web")
    svc["metadata"]["annotations"][MAGLEV_ANNOTATION] = "random"
    nat = service_nat(svc, _slices("web"), "node1", "172.20.32.11")
    assert not any(f.flags & NAT_MAGLEV for f in nat.frontends)
    assert any("'random' unknown" in w for w in nat.warnings)


class _EmptyMap:
    def lookup_batch_raw(self):
        return b"", b"", 0


def _tables(cap: int) -> MaglevTables:
    t = MaglevTables(_EmptyMap())  # type: ignore[arg-type]
    t.configure(MaglevConfig(max_services=cap))
    return t


def _want(t: MaglevTables, name: str) -> str:
    nat = service_nat(_svc(name), _slices(name), "node1", "172.20.32.11")
    t.track(nat.key, nat)
    return next(f.backend_set for f in nat.frontends if f.flags & NAT_MAGLEV)


def test_over_the_cap_the_new_service_is_refused_and_the_programmed_one_kept():
    t = _tables(cap=1)
    late = _want(t, "zz")
    assert t.admit() == set()
    plan = t.plan({late: (1, tuple(backends(3)))})
    assert len(plan.writes) == M and t.flags(late, NAT_MAGLEV) == NAT_MAGLEV
    early = _want(t, "aa")  # sorts first, but "zz" already has its table
    assert t.admit() == {"default/aa"}  # refused: its frontends are written without the flag
    assert t.flags(early, NAT_MAGLEV | NAT_EXTERNAL) == NAT_EXTERNAL
    assert t.plan({late: (1, tuple(backends(3)))}).writes == {}
    assert any("default/aa: over bpfMaglevMaxServices (1" in w for w in t.warnings())
    t.track("default/zz", None)  # the programmed one goes: the refused one gets its place
    assert t.admit() == {"default/aa"}
    plan = t.plan({early: (2, tuple(backends(3)))})
    assert len(plan.writes) == M and sorted(plan.deletes) == [(1, i) for i in range(M)]
    assert t.warnings() == []


def test_a_backend_change_writes_only_the_slots_that_move():
    t = _tables(cap=5)
    name = _want(t, "web")
    t.admit()
    t.plan({name: (3, tuple(backends(4)))})
    plan = t.plan({name: (3, tuple(backends(3)))})
    before = maglev.backend_table(backends(4), M)
    assert set(plan.writes) == {
        (3, i) for i, b in enumerate(maglev.backend_table(backends(3), M)) if before[i] != b
    }
    assert plan.deletes == []
    resized = t.configure(MaglevConfig(max_services=5, max_endpoints=1))
    assert resized
    plan = t.plan({name: (3, tuple(backends(3)))})  # M 1009 -> 101: the tail goes
    assert sorted(plan.deletes) == [(3, i) for i in range(101, M)]

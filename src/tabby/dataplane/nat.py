"""The NAT manager: ServiceNAT objects (calc.services) -> tby_nat_fe / tby_nat_be / tby_nat_src,
and the Maglev tables of annotated services (tby_maglev, through dataplane/maglev.py).

Invariants:
- only services whose ServiceNAT object changed (by identity) are looked at, so one endpoint
  change costs one service's writes, not a resync;
- writes are batched and ordered so that no packet sees a hole: backends and source ranges
  first (Maglev slots with them), then frontends, then deletions of frontends, then of backend
  ordinals beyond the new counts, of whole sets and of Maglev tables. A shrinking set keeps its
  old tail until its frontend says the smaller count;
- one manager per family: IPv4 (tby_nat_fe / tby_nat_be / tby_nat_src, tby_maglev) and IPv6
  ClusterIPs (tby_nat_fe6 / tby_nat_be6, given each ServiceNAT's ``ipv6`` part; no source ranges,
  no Maglev);
- backend set ids are allocated here. After a restart the pinned frontends and sets are
  adopted: a set its (first) frontend still points at, with no hole, keeps its id (unchanged
  backends cost no write, changed ordinals are written as for any change); a set with a hole
  or without such a frontend is not trusted: new sets get fresh ids, and the unclaimed old
  ones are deleted after the frontends moved on (established flows live in conntrack);
- the batches are packed with ``struct`` into one ctypes array per map (no Python object per
  entry: 80,000 entries at 20,000 services x 3).
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import struct
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from socket import AF_INET6, inet_aton, inet_ntoa, inet_ntop, inet_pton
from typing import Any

from tabby.bpf import libbpf
from tabby.bpf.maps.maglev import MaglevKey
from tabby.bpf.maps.nat import (
    PROTOCOL_NAMES,
    PROTOCOLS,
    Backend6Value,
    BackendKey,
    BackendValue,
    Frontend6Key,
    FrontendKey,
    FrontendValue,
    SourceRangeKey,
)
from tabby.calc.services import NAT_MAGLEV, Backend, ServiceNAT
from tabby.dataplane.maglev import MaglevConfig, MaglevPlan, MaglevTables

log = logging.getLogger(__name__)

FeKey = tuple[str, int, str]  # (addr, port, protocol)
# a tby_nat_fe_val as a tuple (id, count, flags, affinity_s): compared and packed with struct,
# no ctypes object per frontend (20,000 of them at a start)
FeVal = tuple[int, int, int, int]
SrcKey = tuple[int, str]  # (set id, cidr)


@dataclass(slots=True)
class _Set:
    id: int
    backends: tuple[Backend, ...]


@dataclass
class NatApplyResult:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # Maglev services over the cap
    backends_removed: bool = False  # some backend left a set
    # some backend left a set a UDP frontend uses: stale UDP conntrack and sockets to clear
    udp_backends_removed: bool = False
    frontends: int = 0
    backends: int = 0
    writes: int = 0
    seconds: float = 0.0
    finished_at: float = 0.0  # time.monotonic() of the last map write


class NatManager:
    def __init__(
        self,
        frontends: libbpf.Map[Any, Any],
        backends: libbpf.Map[Any, Any],
        source_ranges: libbpf.Map[Any, Any] | None,
        maglev: libbpf.Map[Any, Any] | None = None,
        family: int = 4,
    ) -> None:
        """Without a ``maglev`` map, NAT_MAGLEV is never written (random choice); ``family`` 6:
        the IPv6 maps (tby_nat_fe6, tby_nat_be6), no source ranges map, no Maglev."""
        self.fe_map, self.be_map, self.src_map = frontends, backends, source_ranges
        self.maglev = MaglevTables(maglev)
        self.codec = _CODECS[family]
        self.services: dict[str, ServiceNAT] = {}
        self.sets: dict[str, _Set] = {}  # set name -> programmed id and backends
        self.fes: dict[FeKey, FeVal] = {}
        self.srcs: set[SrcKey] = set()
        self._backend_count = 0  # sum of len(set.backends) over self.sets, kept as they change
        self._first = True  # until an apply went through: adopted state still to be judged
        self._rescan = False  # a failed write: the next apply compares every service
        self._adopt()

    def _adopt(self) -> None:
        """What is pinned from a previous run: frontends, and the backend sets they point at.

        A set whose frontend and backends are still what calc wants keeps its id and costs no
        write after a restart; sets nobody claims in the first apply are deleted then.
        """
        keys, values, _ = self.fe_map.lookup_batch_raw()
        c = self.codec
        for (addr, port, proto), value in zip(
            c.fe_key.iter_unpack(keys), _FE_VAL.iter_unpack(values), strict=True
        ):
            self.fes[(c.ntop(addr), port, _proto(proto))] = value
        keys, values, _ = self.be_map.lookup_batch_raw()
        size = c.be_val.size
        by_id: dict[int, list[tuple[int, bytes]]] = {}
        for i, (set_id, ordinal) in enumerate(_BE_KEY.iter_unpack(keys)):
            by_id.setdefault(set_id, []).append((ordinal, values[i * size : (i + 1) * size]))
        # id -> its backends as the map holds them, packed in ordinal order; a set with a hole
        # (not trusted): its ordinals, deleted after the first apply. Bytes, not decoded
        # tuples: this runs at start-up beside the calc, and what it keeps until the first apply
        # would leave that many holes in the heap (a warm start's RSS was ~9 MB over a cold's).
        self._adopted: dict[int, bytes | tuple[int, ...]] = {}
        for set_id, entries in by_id.items():
            entries.sort()
            if entries[-1][0] == len(entries) - 1:  # sorted and unique: no hole
                self._adopted[set_id] = b"".join([e[1] for e in entries])
            else:
                self._adopted[set_id] = tuple([e[0] for e in entries])
        self._retired_src: list[SourceRangeKey] = list(self.src_map.keys()) if self.src_map else []
        used = set(self._adopted) | {v[0] for v in self.fes.values()}
        self._next_id = max(used, default=0) + 1

    def _claim(self, svc: ServiceNAT, set_name: str) -> _Set | None:
        """An adopted set for ``set_name``: the one its (first) pinned frontend points at."""
        for fe in svc.frontends:
            if fe.backend_set != set_name:
                continue
            old = self.fes.get((fe.addr, fe.port, fe.protocol))
            if old is None:
                return None
            set_id = old[0]
            adopted = self._adopted.get(set_id)
            if not isinstance(adopted, bytes):  # none, claimed already, or with a hole (retired)
                return None
            del self._adopted[set_id]
            wanted, c = svc.backend_sets[set_name], self.codec
            if adopted == b"".join([c.be_val.pack(c.pton(a), p) for a, p in wanted]):
                backends = wanted  # calc's own tuple: nothing to write, no second copy kept
            else:
                backends = tuple([(c.ntop(a), p) for a, p in c.be_val.iter_unpack(adopted)])
            self._backend_count += len(backends)
            return _Set(set_id, backends)
        return None

    def _new_id(self) -> int:
        new = self._next_id
        self._next_id += 1
        return new

    @property
    def needs_rescan(self) -> bool:
        """The next apply compares every service (first apply, or a failed write)."""
        return self._first or self._rescan

    def apply(
        self,
        desired: Mapping[str, ServiceNAT],
        hint: Collection[str] | None = None,
        maglev: MaglevConfig | None = None,
    ) -> NatApplyResult:
        """``hint``: every service whose ServiceNAT may differ from the last apply's (the
        others are not looked at: O(changed)); None compares them all by identity."""
        started = time.monotonic()
        result = NatApplyResult()
        programmed = self.services
        if hint is not None and not self._first and not self._rescan:
            changed = [k for k in hint if k in desired and programmed.get(k) is not desired[k]]
            removed = [k for k in hint if k not in desired and k in programmed]
        else:
            # an identity scan: about a millisecond per 20,000 services
            changed = [k for k, svc in desired.items() if programmed.get(k) is not svc]
            added = sum(1 for k in changed if k not in programmed)
            removed = (
                [k for k in programmed if k not in desired]
                if len(programmed) + added != len(desired)
                else []
            )
        self._rescan = False
        resized = self.maglev.configure(maglev or MaglevConfig())
        if not changed and not removed and not self._first and not resized:
            return self._finish(result, started)
        for name in changed:
            self.maglev.track(name, desired[name])
        for name in removed:
            self.maglev.track(name, None)
        # a service whose Maglev table was refused (over the cap) or granted: its frontends
        # are written again, with or without NAT_MAGLEV
        changed += [k for k in self.maglev.admit() if k in desired and k not in changed]

        be_writes: dict[tuple[int, int], Backend] = {}
        be_deletes: list[tuple[int, int]] = []
        fe_writes: dict[FeKey, FeVal] = {}
        src_writes: set[SrcKey] = set()
        want_fes: dict[FeKey, str] = {}  # frontends of the changed services, to find stale ones
        dropped_sets: list[str] = []
        udp_dropped: set[str] = set()  # sets UDP frontends used, of changed or removed services

        # The loop below runs for every service at a start (20,000): names bound locally, the
        # UDP sets worked out only when a backend leaves.
        sets, fes, services = self.sets, self.fes, self.services
        maglev_flags = self.maglev.flags
        for name in changed:
            svc = desired[name]
            old = services.get(name)
            for set_name, backends in svc.backend_sets.items():
                current = sets.get(set_name)
                if current is None:
                    current = self._claim(svc, set_name) or _Set(self._new_id(), ())
                    sets[set_name] = current
                was = current.backends
                if was == backends:
                    # one copy, calc's: a service computed again with the same backends
                    # brings a new, equal tuple, and the older one would live on here
                    current.backends = backends
                    continue
                set_id = current.id
                for i, be in enumerate(backends):
                    if i >= len(was) or was[i] != be:
                        be_writes[(set_id, i)] = be
                if was and not set(was) <= set(backends):  # some backend left the set
                    result.backends_removed = True
                    udp = _udp_sets(svc) | (_udp_sets(old) if old is not None else set())
                    result.udp_backends_removed |= set_name in udp
                be_deletes += [(set_id, i) for i in range(len(backends), len(was))]
                self._backend_count += len(backends) - len(was)
                current.backends = backends
            for fe in svc.frontends:
                st = sets[fe.backend_set]
                fk = (fe.addr, fe.port, fe.protocol)
                want_fes[fk] = name
                flags = fe.flags
                if flags & NAT_MAGLEV:
                    flags = maglev_flags(fe.backend_set, flags)
                value = (st.id, len(st.backends), flags, fe.affinity_s)
                if fes.get(fk) != value:
                    fe_writes[fk] = value
                for cidr in fe.source_ranges:
                    src_writes.add((st.id, cidr))
            if old is not None:
                dropped_sets += [s for s in old.backend_sets if s not in svc.backend_sets]
                udp_dropped |= _udp_sets(old)
        for name in removed:
            dropped_sets += list(self.services[name].backend_sets)
            udp_dropped |= _udp_sets(self.services[name])

        fe_deletes = self._stale_frontends(changed, removed, want_fes, desired)
        for set_name in dropped_sets:
            dropped = self.sets.pop(set_name, None)
            if dropped is not None:
                result.backends_removed |= bool(dropped.backends)
                result.udp_backends_removed |= bool(dropped.backends) and set_name in udp_dropped
                self._backend_count -= len(dropped.backends)
                be_deletes += [(dropped.id, i) for i in range(len(dropped.backends))]
        src_deletes: set[SrcKey] = set()
        if self.srcs:  # only LoadBalancer source ranges: skip the pass over every set otherwise
            live_ids = {st.id for st in self.sets.values()}
            touched_ids = {
                self.sets[b].id for n in changed for b in desired[n].backend_sets if b in self.sets
            }
            src_deletes = {
                s
                for s in self.srcs
                if s[0] not in live_ids or (s[0] in touched_ids and s not in src_writes)
            }

        mg_plan = self.maglev.plan(
            {
                n: (self.sets[n].id, self.sets[n].backends)
                for n in self.maglev.admitted
                if n in self.sets
            }
        )
        try:
            result.writes = self._write(
                be_writes,
                src_writes - self.srcs,
                fe_writes,
                fe_deletes,
                be_deletes,
                src_deletes,
                mg_plan,
            )
        except OSError as e:
            self.maglev.resync()
            # the maps are untouched past the failed batch; forget what we believed of the
            # changed services so that the next apply rewrites them
            for name in changed:
                self.services.pop(name, None)
            self._rescan = True  # and whatever else a hint would not name again
            result.errors.append(f"NAT maps: {e}")
            return self._finish(result, started)
        self.srcs = (self.srcs | src_writes) - src_deletes
        self.fes.update(fe_writes)
        for fk in fe_deletes:
            self.fes.pop(fk, None)
        for name in changed:
            self.services[name] = desired[name]
        for name in removed:
            del self.services[name]
        self._first = False
        return self._finish(result, started)

    def _stale_frontends(
        self,
        changed: list[str],
        removed: list[str],
        want: dict[FeKey, str],
        desired: Mapping[str, ServiceNAT],
    ) -> list[FeKey]:
        """Frontends of changed/removed services (and adopted ones) that nobody wants now."""
        candidates: set[FeKey] = set()
        for name in (changed + removed) if self.services else ():  # none before a first apply
            old = self.services.get(name)
            if old is not None:
                candidates |= {(f.addr, f.port, f.protocol) for f in old.frontends}
        if self._first:  # the first apply after start: adopted frontends too
            candidates |= self.fes.keys() - want.keys()
            if candidates and len(changed) < len(desired):  # want names only the changed ones
                candidates -= {
                    (f.addr, f.port, f.protocol) for svc in desired.values() for f in svc.frontends
                }
        return [fk for fk in candidates if fk not in want and fk in self.fes]

    def _write(
        self,
        be_writes: dict[tuple[int, int], Backend],
        src_writes: set[SrcKey],
        fe_writes: dict[FeKey, FeVal],
        fe_deletes: list[FeKey],
        be_deletes: list[tuple[int, int]],
        src_deletes: set[SrcKey],
        mg_plan: MaglevPlan,
    ) -> int:
        writes = 0
        # The arrays are packed with struct, not built from one ctypes object per entry: at
        # 20k services x 3, 80,000 live ctypes objects (and ipaddress parsing) made the cyclic
        # GC walk the whole heap and were most of the write time. Addresses were validated as
        # IPv4 dotted quads by calc.services, so inet_aton reads them exactly.
        c = self.codec
        if be_writes:
            keys = _packed(BackendKey, [_BE_KEY.pack(i, o) for i, o in be_writes])
            values = _packed(
                c.be_type, [c.be_val.pack(c.pton(a), p) for a, p in be_writes.values()]
            )
            writes += self.be_map.update_batch(keys, values)
        mg_map = self.maglev.map
        if mg_plan.writes and mg_map is not None:  # a table before the frontends that use it
            keys = _packed(MaglevKey, [_BE_KEY.pack(i, slot) for i, slot in mg_plan.writes])
            values = _packed(
                BackendValue, [_BE_VAL.pack(inet_aton(a), p) for a, p in mg_plan.writes.values()]
            )
            writes += mg_map.update_batch(keys, values)
        one = ctypes.c_uint32(1)
        for set_id, cidr in src_writes if self.src_map else ():
            self.src_map.update(SourceRangeKey.make(set_id, cidr), one)  # type: ignore[union-attr]
            writes += 1
        if fe_writes:
            keys_fe = _packed(
                c.fe_type,
                [c.fe_key.pack(c.pton(a), p, PROTOCOLS[proto]) for a, p, proto in fe_writes],
            )
            values_fe = _packed(FrontendValue, [_FE_VAL.pack(*v) for v in fe_writes.values()])
            writes += self.fe_map.update_batch(keys_fe, values_fe)
        writes += _delete_many(self.fe_map, [c.fe_type.make(*fk) for fk in fe_deletes])
        # sets adopted at start that no wanted frontend claimed: after the frontends moved on
        size = c.be_val.size
        retired = [
            BackendKey(i, o)
            for i, adopted in self._adopted.items()
            for o in (range(len(adopted) // size) if isinstance(adopted, bytes) else adopted)
        ]
        self._adopted = {}
        be_keys = [BackendKey(id=i, ordinal=o) for i, o in be_deletes] + retired
        writes += _delete_many(self.be_map, be_keys)
        for set_id, cidr in src_deletes if self.src_map else ():
            self.src_map.delete(SourceRangeKey.make(set_id, cidr))  # type: ignore[union-attr]
        for key in self._retired_src:
            self.src_map.delete(key)  # type: ignore[union-attr]
        self._retired_src = []
        mg_deletes = mg_plan.deletes + self.maglev.retired()
        if mg_deletes and mg_map is not None:  # after the frontends no longer point at them
            writes += _delete_many(mg_map, [MaglevKey(id=i, slot=s) for i, s in mg_deletes])
        return writes

    def _finish(self, result: NatApplyResult, started: float) -> NatApplyResult:
        result.warnings = self.maglev.warnings()
        result.frontends = len(self.fes)
        result.backends = self._backend_count
        result.finished_at = time.monotonic()
        result.seconds = result.finished_at - started
        return result


def _udp_sets(svc: ServiceNAT) -> set[str]:
    return {fe.backend_set for fe in svc.frontends if fe.protocol == "UDP"}


def _delete_many(bpf_map: libbpf.Map[Any, Any], keys: list[Any]) -> int:
    """Batch delete; if some key is already gone (ENOENT stops a batch), one by one."""
    try:
        return bpf_map.delete_batch(keys)
    except OSError:
        return sum(int(bpf_map.delete(k)) for k in keys)


# struct layouts of tby_nat_be_key, tby_nat_be_val and tby_nat_fe_key (types.h; sizes checked
# against the ctypes mirrors at import)
_BE_KEY = struct.Struct("=II")
_BE_VAL = struct.Struct("!4sH2x")
_FE_KEY = struct.Struct("!4sHBx")
_FE_VAL = struct.Struct("=IIII")
_BE6_VAL = struct.Struct("!16sH2x")
_FE6_KEY = struct.Struct("!16sHBx")
for _layout, _mirror in (
    (_BE_KEY, BackendKey),
    (_BE_VAL, BackendValue),
    (_FE_KEY, FrontendKey),
    (_FE_VAL, FrontendValue),
    (_BE6_VAL, Backend6Value),
    (_FE6_KEY, Frontend6Key),
):
    assert _layout.size == ctypes.sizeof(_mirror), _mirror


@dataclass(frozen=True)
class _Codec:
    """How one family's addresses and keys are packed (struct layouts above)."""

    fe_key: struct.Struct
    be_val: struct.Struct
    fe_type: Any
    be_type: Any
    pton: Any
    ntop: Any


_CODECS = {
    4: _Codec(_FE_KEY, _BE_VAL, FrontendKey, BackendValue, inet_aton, inet_ntoa),
    6: _Codec(
        _FE6_KEY,
        _BE6_VAL,
        Frontend6Key,
        Backend6Value,
        lambda a: inet_pton(AF_INET6, a),
        lambda b: inet_ntop(AF_INET6, b),
    ),
}


def _packed(struct_type: type[Any], packed: list[bytes]) -> Any:
    """One ctypes array of ``struct_type`` over the concatenated packed entries."""
    return (struct_type * len(packed)).from_buffer_copy(b"".join(packed))


def _addr(value: int) -> str:
    return str(ipaddress.IPv4Address(value))


def _proto(value: int) -> str:
    return PROTOCOL_NAMES.get(value, str(value))

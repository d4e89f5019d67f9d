"""Maglev tables of the NAT manager: which backend sets have one, and the slot writes.

Invariants:
- a set's table is written (changed slots only) before any frontend carries NAT_MAGLEV for it,
  and deleted only after no frontend does (``NatManager._write`` orders the batches);
- at most ``max_services`` sets have a table (bpfMaglevMaxServices, and what tby_maglev holds at
  the table size). Tables already programmed keep their place; a set over the cap is refused (its
  frontends lose NAT_MAGLEV: random choice, as without the annotation) with a warning naming the
  service, and gets a table once a place frees up;
- a table is a function of the sorted backends and M only (calc.maglev), so every node writes
  the same one; after a restart the pinned slots are adopted and only differences written.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from socket import inet_ntoa
from typing import Any

from tabby.bpf import libbpf
from tabby.bpf.maps.maglev import MAX_ENTRIES
from tabby.calc import maglev
from tabby.calc.services import NAT_MAGLEV, Backend, ServiceNAT

Slot = tuple[int, int]  # (set id, slot)

_KEY = struct.Struct("=II")
_VAL = struct.Struct("!4sH2x")


@dataclass(frozen=True)
class MaglevConfig:
    """bpfMaglevMaxServices and the table size M (from bpfMaglevMaxEndpointsPerService)."""

    max_services: int = maglev.DEFAULT_MAX_SERVICES
    max_endpoints: int = maglev.DEFAULT_MAX_ENDPOINTS

    @property
    def m(self) -> int:
        return maglev.table_size(self.max_endpoints)

    @property
    def cap(self) -> int:
        """Tables that fit: the configured maximum, bounded by tby_maglev's capacity."""
        return min(self.max_services, MAX_ENTRIES // self.m)


@dataclass
class _Table:
    id: int
    m: int
    backends: tuple[Backend, ...]
    slots: tuple[Backend, ...]


@dataclass
class MaglevPlan:
    writes: dict[Slot, Backend] = field(default_factory=dict)
    deletes: list[Slot] = field(default_factory=list)  # after the frontends


class MaglevTables:
    def __init__(self, bpf_map: libbpf.Map[Any, Any] | None) -> None:
        self.map = bpf_map
        self.config = MaglevConfig()
        self.wanted: dict[str, tuple[str, ...]] = {}  # service -> its sets wanting a table
        self.tables: dict[str, _Table] = {}  # set name -> programmed table
        self.refused: dict[str, str] = {}  # set name -> service, over the cap
        self._admitted: set[str] = set()
        self._adopted: dict[int, dict[int, Backend]] = {}
        self.resync()

    def resync(self) -> None:
        """Forget what we believe was written: the map's slots are adopted again and the next
        plan writes only differences (at start, and after a failed write)."""
        self.tables = {}
        self._adopted = {}
        bpf_map = self.map
        if bpf_map is not None:
            keys, values, _ = bpf_map.lookup_batch_raw()
            for (set_id, slot), (addr, port) in zip(
                _KEY.iter_unpack(keys), _VAL.iter_unpack(values), strict=True
            ):
                self._adopted.setdefault(set_id, {})[slot] = (inet_ntoa(addr), port)

    def configure(self, config: MaglevConfig) -> bool:
        """A new table size rewrites every table; True if something changed."""
        changed = config != self.config
        self.config = config
        return changed

    def track(self, name: str, svc: ServiceNAT | None) -> None:
        """What a changed (or removed: None) service wants."""
        sets = (
            tuple(sorted({f.backend_set for f in svc.frontends if f.flags & NAT_MAGLEV}))
            if svc is not None and self.map is not None
            else ()
        )
        if sets:
            self.wanted[name] = sets
        else:
            self.wanted.pop(name, None)

    def admit(self) -> set[str]:
        """Decides which wanted sets have a table; returns the services whose admission
        changed (their frontends must be written again)."""
        wanted = {s: svc for svc, sets in self.wanted.items() for s in sets}
        kept = {s for s in self.tables if s in wanted}
        room = self.config.cap - len(kept)
        newly: set[str] = set()
        refused: dict[str, str] = {}
        for s in sorted(set(wanted) - kept, key=lambda s: (wanted[s], s)):
            if room > 0:
                room -= 1
                newly.add(s)
            else:
                refused[s] = wanted[s]
        moved = {wanted[s] for s in newly if s in self.refused}
        moved |= {svc for s, svc in refused.items() if s not in self.refused}
        self.refused = refused
        self._admitted = kept | newly
        return moved

    def flags(self, set_name: str, flags: int) -> int:
        """A frontend's flags: NAT_MAGLEV only if its set has (will have) a table."""
        if flags & NAT_MAGLEV and set_name not in self._admitted:
            return flags & ~NAT_MAGLEV
        return flags

    def plan(self, sets: dict[str, tuple[int, tuple[Backend, ...]]]) -> MaglevPlan:
        """The slot writes and deletes that bring tby_maglev to the admitted sets' tables;
        ``sets``: set name -> (id, backends), as the NAT manager now has them."""
        plan = MaglevPlan()
        m = self.config.m
        for name in list(self.tables):
            if name not in self._admitted or name not in sets:
                plan.deletes += self._slots(self.tables.pop(name))
        for name in sorted(self._admitted):
            if name not in sets:
                continue
            set_id, backends = sets[name]
            old = self.tables.get(name)
            if old is not None and (old.id, old.m, old.backends) == (set_id, m, backends):
                continue
            slots = maglev.backend_table(backends, m) if backends else ()
            if old is not None and old.id == set_id:
                before = dict(enumerate(old.slots))
            else:
                if old is not None:
                    plan.deletes += self._slots(old)
                before = self._adopted.pop(set_id, {})
            for i, be in enumerate(slots):
                if before.get(i) != be:
                    plan.writes[(set_id, i)] = be
            plan.deletes += [(set_id, i) for i in before if i >= len(slots)]
            self.tables[name] = _Table(set_id, m, backends, slots)
        return plan

    @property
    def admitted(self) -> set[str]:
        return self._admitted

    def retired(self) -> list[Slot]:
        """Adopted slots no table claimed in the last plan (delete after the frontends)."""
        out = [(i, s) for i, slots in self._adopted.items() for s in slots]
        self._adopted = {}
        return out

    def warnings(self) -> list[str]:
        out = [
            f"{svc}: over bpfMaglevMaxServices ({self.config.cap} Maglev tables of "
            f"{self.config.m} slots): its external traffic picks backends at random"
            for svc in sorted(set(self.refused.values()))
        ]
        for name, t in sorted(self.tables.items()):
            if len(t.backends) > self.config.max_endpoints:
                out.append(
                    f"{name}: {len(t.backends)} backends, over bpfMaglevMaxEndpointsPerService "
                    f"({self.config.max_endpoints}): the Maglev balance is coarser"
                )
        return out

    @staticmethod
    def _slots(t: _Table) -> Iterable[Slot]:
        return [(t.id, i) for i in range(len(t.slots))]

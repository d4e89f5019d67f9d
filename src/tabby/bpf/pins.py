"""Pinned maps across builds: what an upgrade does to a map that was resized.

A new build may give a pinned map another size or flags than the one the previous agent left (a
reason appended to reasons.h grows ``tby_counters``; a map resized). libbpf then refuses the pin
("parameter mismatch") and, without this, the agent could never load its datapath again on that
node. Before an object loads, each such pin is set aside: its fd is kept and its path freed, so
libbpf creates the map as this build defines it; after the load, its entries are carried over
(those beyond a smaller map's size are left out). If the load fails, the old pins are put back
and nothing on the node changed. A map whose layout changed (type, key or value size) is not
touched: such a change takes a new name (``MapSpec.version``, ``_vN``), and a pin of the same
name with another layout is refused by libbpf as before.

The old programs keep their (old) maps until the agent swaps their links: entries they write
between the copy and the swap are not carried (a few milliseconds of counters or new flows).
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from tabby.bpf import libbpf

log = logging.getLogger(__name__)


@dataclass
class SetAside:
    """A pinned map this build defines differently: its fd, its old definition, the new one."""

    name: str
    path: str
    fd: int
    old: libbpf.MapDef
    new: libbpf.MapDef

    @property
    def same_layout(self) -> bool:
        return (self.old.type, self.old.key_size, self.old.value_size) == (
            self.new.type,
            self.new.key_size,
            self.new.value_size,
        )


def set_aside_mismatched(specs: Iterable[libbpf.MapSpecInfo]) -> list[SetAside]:
    """Unpins (keeping an fd) every pinned map whose size or flags differ from its spec's."""
    out: list[SetAside] = []
    for spec in specs:
        if not spec.pin_path or not os.path.exists(spec.pin_path):
            continue
        fd = libbpf.obj_get(spec.pin_path)
        old, new = libbpf.MapDef.of_fd(fd), libbpf.MapDef.of_spec(spec)
        aside = SetAside(spec.name, spec.pin_path, fd, old, new)
        if old == new or not aside.same_layout:
            os.close(fd)
            continue
        os.unlink(spec.pin_path)
        out.append(aside)
    return out


def carry_over(aside: SetAside, new_fd: int) -> int:
    """Copies the old map's entries into the new one; returns how many were copied."""
    key_t = ctypes.c_ubyte * aside.old.key_size
    value_t = ctypes.c_ubyte * aside.old.value_bytes()
    old = libbpf.Map(aside.fd, key_t, value_t, name=aside.path)
    new = libbpf.Map(new_fd, key_t, value_t, name=aside.path)
    copied = 0
    for key, value in old.items():
        try:
            new.update(key, value)
        except OSError:  # beyond a smaller map's max_entries
            continue
        copied += 1
    log.info(
        "map %s: redefined (max_entries %d -> %d, flags %#x -> %#x), %d entries carried over",
        aside.name,
        aside.old.max_entries,
        aside.new.max_entries,
        aside.old.map_flags,
        aside.new.map_flags,
        copied,
    )
    return copied


def put_back(set_aside: Iterable[SetAside]) -> None:
    """After a failed load: the old maps at their paths again (a new pin there goes)."""
    for aside in set_aside:
        if os.path.exists(aside.path):
            os.unlink(aside.path)
        libbpf.obj_pin(aside.fd, aside.path)


def release(set_aside: Iterable[SetAside]) -> None:
    for aside in set_aside:
        os.close(aside.fd)

"""bpfMapSize* (Calico's FelixConfiguration): the maps each field sizes, and how a resize is
planned so that it never drops an entry.

As Calico, a size applies at the next load of the datapath: the pinned map is then recreated at
its new size with its entries carried over (``pins.py``). Calico's fields size the IPv4 and IPv6
maps alike. A size smaller than the entries a map holds now is refused: the map keeps its
current size (nothing is dropped) and the refusal names the field, until the field is raised or
the entries fall below it. A field removed means the build's default size, checked the same way.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tabby.bpf import libbpf
from tabby.bpf.maps.conntrack import CONNTRACK6_SPEC, CONNTRACK_SPEC
from tabby.bpf.maps.nat import BACKENDS6_SPEC, BACKENDS_SPEC, FRONTENDS6_SPEC, FRONTENDS_SPEC
from tabby.bpf.maps.routes import ROUTES_SPEC
from tabby.bpf.maps.spec import MapSpec

# field -> the maps it sizes (their ELF sizes are the defaults)
FIELDS: dict[str, tuple[MapSpec, ...]] = {
    "bpfMapSizeNATFrontend": (FRONTENDS_SPEC, FRONTENDS6_SPEC),
    "bpfMapSizeNATBackend": (BACKENDS_SPEC, BACKENDS6_SPEC),
    "bpfMapSizeConntrack": (CONNTRACK_SPEC, CONNTRACK6_SPEC),
    "bpfMapSizeRoute": (ROUTES_SPEC,),
}


class MapSizeError(ValueError):
    """A resize that would lose entries (checked again after the copy: an LRU map evicts)."""


def wanted(fields: Iterable[tuple[str, int]]) -> dict[str, tuple[str, int]]:
    """Map name -> (the field that sizes it, max_entries): the field's value, else the build's
    size. Unknown fields are refused by the model before this."""
    given = dict(fields)
    return {
        spec.name: (name, int(given.get(name, spec.max_entries)))
        for name, specs in FIELDS.items()
        for spec in specs
    }


@dataclass
class SizePlan:
    """The sizes to load with (map name -> max_entries) and the sizes refused, one line each."""

    sizes: dict[str, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)


def plan(pin_root: str, fields: Iterable[tuple[str, int]]) -> SizePlan:
    """The sizes for the next load: each map's wanted size, or its pinned size where the wanted
    one is smaller than the entries it holds (refused, named by its field)."""
    out = SizePlan()
    for map_name, (name, size) in wanted(fields).items():
        path = os.path.join(pin_root, map_name)
        out.sizes[map_name] = size
        if not os.path.exists(path):
            continue
        fd = libbpf.obj_get(path)
        try:
            current = libbpf.MapDef.of_fd(fd)
            if size >= current.max_entries:
                continue
            held = count_entries(fd, current, limit=size + 1)
        finally:
            os.close(fd)
        if held > size:
            out.sizes[map_name] = current.max_entries
            out.refused.append(
                f"{name}: {size:,} is fewer than the entries {map_name} holds (more than "
                f"{held - 1:,}): kept at {current.max_entries:,}, nothing dropped; raise it, "
                "or lower it once fewer entries are in use"
            )
    return out


def count_entries(fd: int, mapdef: libbpf.MapDef, limit: int | None = None) -> int:
    """Keys in the map behind ``fd``, counted up to ``limit``."""
    key_t = ctypes.c_ubyte * mapdef.key_size
    value_t = ctypes.c_ubyte * mapdef.value_bytes()
    seen = 0
    for _ in libbpf.Map(fd, key_t, value_t).keys():
        seen += 1
        if limit is not None and seen >= limit:
            break
    return seen


def check_kept(name: str, sizes: Mapping[str, int], old_fd: int, new_fd: int) -> None:
    """After a carry-over into a resized map: every entry is there (an LRU map may evict while
    it is filled near its size); else MapSizeError, and the caller puts the old maps back."""
    old, new = libbpf.MapDef.of_fd(old_fd), libbpf.MapDef.of_fd(new_fd)
    had, has = count_entries(old_fd, old), count_entries(new_fd, new)
    if has < had:
        raise MapSizeError(
            f"{name}: {had:,} entries do not fit at max_entries {sizes.get(name)}: "
            f"only {has:,} kept; the old map is put back"
        )

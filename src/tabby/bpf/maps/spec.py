"""MapSpec: what Python believes a map of the datapath looks like (checked against the ELF)."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Any

from tabby.bpf import libbpf

# enum bpf_map_type values used by tabby
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_SK_STORAGE = 24

BPF_F_NO_PREALLOC = 1


@dataclass(frozen=True)
class MapSpec:
    """A pinned map: ``base_name`` plus ``_vN`` from version 2 on (an incompatible layout)."""

    base_name: str
    map_type: int
    key_type: type[Any]
    value_type: type[Any]
    max_entries: int
    map_flags: int = 0
    version: int = 1

    @property
    def name(self) -> str:
        return self.base_name if self.version == 1 else f"{self.base_name}_v{self.version}"

    @property
    def per_cpu(self) -> bool:
        return self.map_type in libbpf.PERCPU_MAP_TYPES

    @property
    def key_size(self) -> int:
        return ctypes.sizeof(self.key_type)

    @property
    def value_size(self) -> int:
        """Size of one value as the ELF declares it (one CPU's slot for per-CPU maps)."""
        return ctypes.sizeof(self.value_type)

    def value_buffer_type(self) -> type[Any]:
        """What a lookup returns: the value, or one 8-byte-aligned slot per possible CPU."""
        if not self.per_cpu:
            return self.value_type
        if self.value_size % 8:
            raise ValueError(f"{self.name}: per-CPU values must be padded to 8 bytes")
        return self.value_type * libbpf.possible_cpus()  # type: ignore[no-any-return]

    def open_pinned(self, pin_root: str) -> libbpf.Map[Any, Any]:
        """Open this map from a node's pin root; the Map owns the fd (close() it)."""
        path = os.path.join(pin_root, self.name)
        return libbpf.Map.from_pin(path, self.key_type, self.value_buffer_type())

    def open_in(self, obj: libbpf.Object) -> libbpf.Map[Any, Any]:
        """This map of a loaded object (the fd stays the object's)."""
        return obj.map(self.name, self.key_type, self.value_buffer_type())

"""tby_maglev: Maglev lookup tables, (backend set id, slot) -> backend (mirror of types.h).

One hash for every Maglev service (not an array of maps): one pinned map, no inner map to
create, pin and swap per service, and a table update is a batch of slot writes, each atomic. A
lookup costs one hash probe instead of an array index: paid once per new flow only.

``flow_hash`` mirrors ``maglev_flow_hash`` of bpf/include/tabby/maglev.h, so tests (and dumps)
can tell which slot a flow lands in; tests/bpf checks it against the loaded program.
"""

from __future__ import annotations

import ctypes
import socket

from tabby.bpf.maps.nat import BackendValue
from tabby.bpf.maps.spec import BPF_F_NO_PREALLOC, BPF_MAP_TYPE_HASH, MapSpec

SEED = 0x7AB1E5ED  # TBY_MAGLEV_SEED
MAX_ENTRIES = 262144
# what one slot costs the kernel (a no-prealloc hash element: header, 8-byte key, 8-byte value),
# as bpftool's bytes_memlock grows per written slot on kernel 6.18; the map's bucket array adds
# 16 bytes per max entry once (4 MiB), whether or not any table is written
SLOT_BYTES = 72


class MaglevKey(ctypes.Structure):
    """struct tby_maglev_key."""

    _fields_ = [("id", ctypes.c_uint32), ("slot", ctypes.c_uint32)]


MAGLEV_SPEC = MapSpec(
    "tby_maglev",
    BPF_MAP_TYPE_HASH,
    MaglevKey,
    BackendValue,
    MAX_ENTRIES,
    map_flags=BPF_F_NO_PREALLOC,
)

_M32 = 0xFFFFFFFF


def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def flow_hash(src: str, dst: str, sport: int, dport: int, proto: int) -> int:
    """maglev_flow_hash(): lookup3's final mix over the addresses and ports as the packet
    carries them, read as little-endian (host-order) words, as the BPF program reads them."""
    init = (SEED + proto) & _M32
    a = (int.from_bytes(socket.inet_aton(src), "little") + init) & _M32
    b = (int.from_bytes(socket.inet_aton(dst), "little") + init) & _M32
    sp = int.from_bytes(sport.to_bytes(2, "big"), "little")
    dp = int.from_bytes(dport.to_bytes(2, "big"), "little")
    c = (((sp << 16) | dp) + init) & _M32
    c = ((c ^ b) - _rol(b, 14)) & _M32
    a = ((a ^ c) - _rol(c, 11)) & _M32
    b = ((b ^ a) - _rol(a, 25)) & _M32
    c = ((c ^ b) - _rol(b, 16)) & _M32
    a = ((a ^ c) - _rol(c, 4)) & _M32
    b = ((b ^ a) - _rol(a, 14)) & _M32
    c = ((c ^ b) - _rol(b, 24)) & _M32
    return c

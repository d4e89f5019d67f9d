"""Thin ctypes binding to the system libbpf (Debian libbpf1 1.1.x).

Only what tabby's control plane needs: open an object with a pin root, set its ``.rodata`` before
load, load, find program and map fds, pin and reopen objects, map CRUD and batch operations, TC
attach through tcx links (kernel >= 6.6) with clsact as the fallback, link replacement and
introspection (to adopt pinned links after a restart), cgroup links (socket hooks) and iterator
runs (socket iterators), and BPF_PROG_TEST_RUN.

Invariants:
- every libbpf error raises ``OSError(errno, message)``; the message carries the tail of libbpf's
  log, so a verifier rejection explains itself;
- every opts struct passes its ``sz``, so libbpf never reads past what we give it.

Namespaces: tcx/clsact attach and ``if_nametoindex`` resolve the ifindex in the *calling thread's*
network namespace; enter a node's namespace first (``tabby.netlink.netns.enter_netns``). BPF fds
themselves belong to no namespace.
"""

from __future__ import annotations

import collections
import ctypes
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
_libc = ctypes.CDLL(None, use_errno=True)

# ---------------------------------------------------------------------------- constants

BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
BPF_TC_INGRESS, BPF_TC_EGRESS = 1, 2
BPF_TCX_INGRESS, BPF_TCX_EGRESS = 46, 47  # enum bpf_attach_type, absent from 6.1 UAPI headers
BPF_LINK_TYPE_TCX = 11
TC_ACT_OK, TC_ACT_SHOT = 0, 2
LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2
# enum bpf_map_type: PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
PERCPU_MAP_TYPES = frozenset({5, 6, 10})

_ENOENT = 2
_EINVAL = 22
_EEXIST = 17

# ---------------------------------------------------------------------------- structs


class _ObjectOpenOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("object_name", ctypes.c_char_p),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", ctypes.c_char_p),
        ("_attach_prog_fd", ctypes.c_uint32),
        ("kconfig", ctypes.c_char_p),
        ("btf_custom_path", ctypes.c_char_p),
        ("kernel_log_buf", ctypes.c_char_p),
        ("kernel_log_size", ctypes.c_size_t),
        ("kernel_log_level", ctypes.c_uint32),
    ]


class _TcHook(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("ifindex", ctypes.c_int),
        ("attach_point", ctypes.c_int),
        ("parent", ctypes.c_uint32),
    ]


class _TcOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("prog_fd", ctypes.c_int),
        ("flags", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("handle", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
    ]


class _MapBatchOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class _LinkCreateOpts(ctypes.Structure):
    # Only the leading fields: tcx needs none of the per-type union.
    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32)]


class _LinkUpdateOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("flags", ctypes.c_uint32),
        ("old_prog_fd", ctypes.c_uint32),
    ]


class _MapCreateOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("btf_fd", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
        ("numa_node", ctypes.c_uint32),
        ("map_ifindex", ctypes.c_uint32),
    ]


class _ProgInfo(ctypes.Structure):
    """Leading part of struct bpf_prog_info; the kernel fills only what we ask for."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),  # a 1-bit field and its pad
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),  # counted while BPF_ENABLE_STATS is held
        ("run_cnt", ctypes.c_uint64),
    ]


class _LinkInfo(ctypes.Structure):
    """Leading part of struct bpf_link_info, common to every link type."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
    ]


class _MapInfo(ctypes.Structure):
    """Leading part of struct bpf_map_info."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class _LinkInfoTcx(ctypes.Structure):
    """struct bpf_link_info with the tcx member of its union (kernel >= 6.6)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),  # the union is 8-byte aligned
        ("ifindex", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
    ]


class SkBuffCtx(ctypes.Structure):
    """UAPI struct __sk_buff, the ctx_in/ctx_out of a TC test run.

    The kernel only honours a few fields on input (mark, priority, ingress_ifindex, ifindex, cb,
    tstamp, wire_len, gso_*); an ``ifindex`` > 1 must name a device of the calling netns.
    """

    _fields_ = [
        ("len", ctypes.c_uint32),
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32),
        ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("tc_index", ctypes.c_uint32),
        ("cb", ctypes.c_uint32 * 5),
        ("hash", ctypes.c_uint32),
        ("tc_classid", ctypes.c_uint32),
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("napi_id", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("remote_ip4", ctypes.c_uint32),
        ("local_ip4", ctypes.c_uint32),
        ("remote_ip6", ctypes.c_uint32 * 4),
        ("local_ip6", ctypes.c_uint32 * 4),
        ("remote_port", ctypes.c_uint32),
        ("local_port", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("flow_keys", ctypes.c_uint64),
        ("tstamp", ctypes.c_uint64),
        ("wire_len", ctypes.c_uint32),
        ("gso_segs", ctypes.c_uint32),
        ("sk", ctypes.c_uint64),
        ("gso_size", ctypes.c_uint32),
        ("tstamp_type", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 3),
        ("hwtstamp", ctypes.c_uint64),
    ]


# ---------------------------------------------------------------------------- prototypes

_vp, _int, _u32, _cp, _sz = (
    ctypes.c_void_p,
    ctypes.c_int,
    ctypes.c_uint32,
    ctypes.c_char_p,
    ctypes.c_size_t,
)


def _proto(name: str, restype: Any, *argtypes: Any) -> None:
    fn = getattr(_lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


_proto("bpf_object__open_file", _vp, _cp, ctypes.POINTER(_ObjectOpenOpts))
_proto("bpf_object__load", _int, _vp)
_proto("bpf_object__close", None, _vp)
_proto("bpf_object__find_program_by_name", _vp, _vp, _cp)
_proto("bpf_object__find_map_by_name", _vp, _vp, _cp)
_proto("bpf_object__next_map", _vp, _vp, _vp)
_proto("bpf_object__next_program", _vp, _vp, _vp)
_proto("bpf_program__name", _cp, _vp)
_proto("bpf_program__fd", _int, _vp)
_proto("bpf_map__name", _cp, _vp)
_proto("bpf_map__fd", _int, _vp)
_proto("bpf_map__type", _int, _vp)
_proto("bpf_map__key_size", _u32, _vp)
_proto("bpf_map__value_size", _u32, _vp)
_proto("bpf_map__max_entries", _u32, _vp)
_proto("bpf_map__map_flags", _u32, _vp)
_proto("bpf_map__pin_path", _cp, _vp)
_proto("bpf_map__initial_value", _vp, _vp, ctypes.POINTER(_sz))
_proto("bpf_map__set_initial_value", _int, _vp, _vp, _sz)
_proto("bpf_map__set_max_entries", _int, _vp, _u32)
_proto("bpf_obj_get", _int, _cp)
_proto("bpf_obj_pin", _int, _int, _cp)
_proto("bpf_obj_get_info_by_fd", _int, _int, _vp, ctypes.POINTER(_u32))
_proto("bpf_map_create", _int, _int, _cp, _u32, _u32, _u32, ctypes.POINTER(_MapCreateOpts))
_proto("bpf_map_update_elem", _int, _int, _vp, _vp, ctypes.c_uint64)
_proto("bpf_map_lookup_elem", _int, _int, _vp, _vp)
_proto("bpf_map_delete_elem", _int, _int, _vp)
_proto("bpf_map_get_next_key", _int, _int, _vp, _vp)
_proto(
    "bpf_map_update_batch",
    _int,
    _int,
    _vp,
    _vp,
    ctypes.POINTER(_u32),
    ctypes.POINTER(_MapBatchOpts),
)
_proto(
    "bpf_map_lookup_batch",
    _int, _int, _vp, _vp, _vp, _vp, ctypes.POINTER(_u32), ctypes.POINTER(_MapBatchOpts),
)  # fmt: skip
_proto("bpf_map_delete_batch", _int, _int, _vp, ctypes.POINTER(_u32), ctypes.POINTER(_MapBatchOpts))
_proto("bpf_tc_hook_create", _int, ctypes.POINTER(_TcHook))
_proto("bpf_tc_attach", _int, ctypes.POINTER(_TcHook), ctypes.POINTER(_TcOpts))
_proto("bpf_tc_detach", _int, ctypes.POINTER(_TcHook), ctypes.POINTER(_TcOpts))
_proto("bpf_tc_query", _int, ctypes.POINTER(_TcHook), ctypes.POINTER(_TcOpts))
_proto("bpf_link_create", _int, _int, _int, _int, ctypes.POINTER(_LinkCreateOpts))
_proto("bpf_link_update", _int, _int, _int, ctypes.POINTER(_LinkUpdateOpts))
_proto("bpf_link_detach", _int, _int)
_proto("bpf_prog_test_run_opts", _int, _int, ctypes.POINTER(_TestRunOpts))
_proto("libbpf_num_possible_cpus", _int)
_proto("bpf_enable_stats", _int, _int)
_proto("bpf_prog_get_fd_by_id", _int, _u32)

# ---------------------------------------------------------------------------- logging

_PrintFn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
_proto("libbpf_set_print", _vp, _PrintFn)

_LOG: collections.deque[str] = collections.deque(maxlen=400)
_log_level = LIBBPF_WARN
_sink: Callable[[int, str], None] | None = None


def _on_libbpf_print(level: int, fmt: bytes, va_list: int) -> int:
    # Formats with libc's vsnprintf: on x86_64 a va_list argument is a pointer.
    if level > _log_level:
        return 0
    # a verifier log arrives as one message: large enough for it (rare, so the cost is fine)
    buf = ctypes.create_string_buffer(1 << 20)
    _libc.vsnprintf(buf, len(buf), fmt, va_list)
    line = buf.value.decode(errors="replace")
    _LOG.append(line)
    if _sink is not None:
        _sink(level, line)
    return 0


_print_cb = _PrintFn(_on_libbpf_print)  # kept referenced: libbpf calls it for the process lifetime
_lib.libbpf_set_print(_print_cb)


def set_print(level: int = LIBBPF_WARN, sink: Callable[[int, str], None] | None = None) -> None:
    """Keep libbpf messages up to ``level`` (LIBBPF_WARN/INFO/DEBUG); also pass them to ``sink``.

    The last messages are always appended to raised OSErrors, whatever the sink.
    """
    global _log_level, _sink
    _log_level, _sink = level, sink


def log_tail(lines: int = 60) -> str:
    """The last lines of the libbpf messages kept (verifier logs arrive here at LIBBPF_WARN:
    their end says what was refused)."""
    return "\n".join("".join(_LOG).splitlines()[-lines:])


def _check(rc: int, what: str) -> int:
    """libbpf 1.x returns -errno (and sets errno); raise with the log tail."""
    if rc < 0:
        err = -rc if rc != -1 else (ctypes.get_errno() or 1)
        raise OSError(err, f"{what}: {os.strerror(err)}\n{log_tail()}".rstrip())
    return rc


def _check_ptr(ptr: int | None, what: str) -> int:
    if not ptr:
        err = ctypes.get_errno() or _ENOENT
        raise OSError(err, f"{what}: {os.strerror(err)}\n{log_tail()}".rstrip())
    return ptr


def possible_cpus() -> int:
    """Number of possible CPUs: the width of a per-CPU map value."""
    return _check(_lib.libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


# ---------------------------------------------------------------------------- maps

K = TypeVar("K")
V = TypeVar("V")


class Map(Generic[K, V]):
    """A map fd with its ctypes key and value types.

    For per-CPU maps the value type is an array of ``possible_cpus()`` elements, each element
    padded to 8 bytes (e.g. ``ctypes.c_uint64 * possible_cpus()``).
    The Map does not own the fd unless ``owned`` is set: objects' maps die with their object.
    """

    def __init__(
        self, fd: int, key_type: type[K], value_type: type[V], name: str = "", owned: bool = False
    ) -> None:
        self.fd = fd
        self.key_type = key_type
        self.value_type = value_type
        self.name = name
        self._owned = owned

    @classmethod
    def from_pin(cls, path: str, key_type: type[K], value_type: type[V]) -> Map[K, V]:
        """Open a pinned map; the returned Map owns its fd."""
        return cls(obj_get(path), key_type, value_type, name=path, owned=True)

    def close(self) -> None:
        if self._owned and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def lookup(self, key: K) -> V | None:
        value = self.value_type()
        rc = _lib.bpf_map_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(value))  # type: ignore[arg-type]
        if rc == -_ENOENT:
            return None
        _check(rc, f"lookup {self.name}")
        return value

    def update(self, key: K, value: V, flags: int = BPF_ANY) -> None:
        rc = _lib.bpf_map_update_elem(self.fd, ctypes.byref(key), ctypes.byref(value), flags)  # type: ignore[arg-type]
        _check(rc, f"update {self.name}")

    def delete(self, key: K) -> bool:
        """Delete ``key``; False if it was absent."""
        rc = _lib.bpf_map_delete_elem(self.fd, ctypes.byref(key))  # type: ignore[arg-type]
        if rc == -_ENOENT:
            return False
        _check(rc, f"delete {self.name}")
        return True

    def keys(self) -> Iterator[K]:
        """Iterate with get_next_key (works for every map type, LPM tries included)."""
        prev: K | None = None
        while True:
            nxt = self.key_type()
            prev_ref = ctypes.byref(prev) if prev is not None else None  # type: ignore[arg-type]
            rc = _lib.bpf_map_get_next_key(self.fd, prev_ref, ctypes.byref(nxt))  # type: ignore[arg-type]
            if rc == -_ENOENT:
                return
            _check(rc, f"get_next_key {self.name}")
            yield nxt
            prev = nxt

    def items(self) -> Iterator[tuple[K, V]]:
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:  # deleted meanwhile
                yield key, value

    def update_batch(self, keys: Sequence[K], values: Sequence[V], flags: int = BPF_ANY) -> int:
        """BPF_MAP_UPDATE_BATCH of parallel sequences; returns how many were written."""
        if len(keys) != len(values):
            raise ValueError("keys and values differ in length")
        if not keys:
            return 0
        karr = self._array(self.key_type, keys)
        varr = self._array(self.value_type, values)
        count = ctypes.c_uint32(len(keys))
        opts = _MapBatchOpts(ctypes.sizeof(_MapBatchOpts), flags, 0)
        rc = _lib.bpf_map_update_batch(self.fd, karr, varr, ctypes.byref(count), ctypes.byref(opts))
        _check(rc, f"update_batch {self.name}")
        return count.value

    def delete_batch(self, keys: Sequence[K]) -> int:
        """BPF_MAP_DELETE_BATCH; ENOENT on the first absent key, those before it are deleted."""
        if not keys:
            return 0
        karr = self._array(self.key_type, keys)
        count = ctypes.c_uint32(len(keys))
        opts = _MapBatchOpts(ctypes.sizeof(_MapBatchOpts), 0, 0)
        rc = _lib.bpf_map_delete_batch(self.fd, karr, ctypes.byref(count), ctypes.byref(opts))
        _check(rc, f"delete_batch {self.name}")
        return count.value

    @staticmethod
    def _array(item_type: Any, items: Sequence[Any]) -> Any:
        """``items`` as one ctypes array of ``item_type``: used as it is when it already is one
        (the NAT manager packs 80,000 entries into one; rebuilding it element by element made
        a ctypes object per entry and was a quarter of a 20,000-service programming)."""
        if isinstance(items, ctypes.Array) and items._type_ is item_type:
            return items
        return (item_type * len(items))(*items)

    def lookup_batch_raw(self, chunk: int = 4096) -> tuple[bytes, bytes, int]:
        """The whole map as (keys, values, count): packed bytes, one fixed-size record each.

        For large maps decoded with ``struct``: no Python object per entry on the way.
        """
        keys, values, total = [], [], 0
        in_batch, out_batch = ctypes.c_uint64(0), ctypes.c_uint64(0)
        karr = (self.key_type * chunk)()  # type: ignore[operator]
        varr = (self.value_type * chunk)()  # type: ignore[operator]
        ksize = ctypes.sizeof(self.key_type)  # type: ignore[arg-type]
        vsize = ctypes.sizeof(self.value_type)  # type: ignore[arg-type]
        opts = _MapBatchOpts(ctypes.sizeof(_MapBatchOpts), 0, 0)
        first = True
        while True:
            count = ctypes.c_uint32(chunk)
            rc = _lib.bpf_map_lookup_batch(
                self.fd,
                None if first else ctypes.byref(in_batch),
                ctypes.byref(out_batch),
                karr,
                varr,
                ctypes.byref(count),
                ctypes.byref(opts),
            )
            if rc < 0 and rc != -_ENOENT:
                _check(rc, f"lookup_batch {self.name}")
            keys.append(bytes(memoryview(karr).cast("B")[: count.value * ksize]))
            values.append(bytes(memoryview(varr).cast("B")[: count.value * vsize]))
            total += count.value
            if rc == -_ENOENT:
                return b"".join(keys), b"".join(values), total
            first = False
            in_batch.value = out_batch.value

    def lookup_batch(self, chunk: int = 4096) -> list[tuple[K, V]]:
        """Dump the map with BPF_MAP_LOOKUP_BATCH (hash and array maps; not LPM tries)."""
        keys, values, count = self.lookup_batch_raw(chunk)
        ksize = ctypes.sizeof(self.key_type)  # type: ignore[arg-type]
        vsize = ctypes.sizeof(self.value_type)  # type: ignore[arg-type]
        return [
            (
                self.key_type.from_buffer_copy(keys, i * ksize),  # type: ignore[attr-defined]
                self.value_type.from_buffer_copy(values, i * vsize),  # type: ignore[attr-defined]
            )
            for i in range(count)
        ]


def map_create(
    map_type: int, name: str, key_size: int, value_size: int, max_entries: int, map_flags: int = 0
) -> int:
    """Create a map without BTF (tests, scratch maps); returns its fd."""
    opts = _MapCreateOpts()
    opts.sz = ctypes.sizeof(opts)
    opts.map_flags = map_flags
    fd = _lib.bpf_map_create(
        map_type, name.encode(), key_size, value_size, max_entries, ctypes.byref(opts)
    )
    return _check(fd, f"bpf_map_create {name}")


# ---------------------------------------------------------------------------- objects


class MapSpecInfo:
    """A map of an opened object as libbpf sees it (before or after load)."""

    def __init__(self, ptr: int) -> None:
        self.name: str = (_lib.bpf_map__name(ptr) or b"").decode()
        self.type: int = _lib.bpf_map__type(ptr)
        self.key_size: int = _lib.bpf_map__key_size(ptr)
        self.value_size: int = _lib.bpf_map__value_size(ptr)
        self.max_entries: int = _lib.bpf_map__max_entries(ptr)
        self.map_flags: int = _lib.bpf_map__map_flags(ptr)
        pin = _lib.bpf_map__pin_path(ptr)
        self.pin_path: str | None = pin.decode() if pin else None


class Object:
    """One BPF ELF object: open (with a pin root) -> set .rodata -> load -> fds -> close.

    Maps declared ``LIBBPF_PIN_BY_NAME`` are pinned at ``<pin_root>/<map name>``; when a
    compatible pin already exists libbpf reuses it, which is how several objects (and successive
    agents) share one map. Without ``pin_root`` libbpf would pin at /sys/fs/bpf itself, so it is
    mandatory here.
    """

    def __init__(self, path: str, pin_root: str) -> None:
        self.path = path
        self.pin_root = pin_root
        self._pin_root_b = pin_root.encode()  # libbpf keeps the pointer until open returns
        opts = _ObjectOpenOpts()
        opts.sz = ctypes.sizeof(opts)
        opts.pin_root_path = self._pin_root_b
        ptr = _lib.bpf_object__open_file(path.encode(), ctypes.byref(opts))
        self._obj: int | None = _check_ptr(ptr, f"open {path}")
        self.loaded = False

    def _ptr(self) -> int:
        if self._obj is None:
            raise ValueError(f"{self.path}: object is closed")
        return self._obj

    def _map_ptrs(self) -> Iterator[int]:
        ptr = _lib.bpf_object__next_map(self._ptr(), None)
        while ptr:
            yield ptr
            ptr = _lib.bpf_object__next_map(self._ptr(), ptr)

    def _map_ptr(self, name: str) -> int:
        for ptr in self._map_ptrs():
            map_name = (_lib.bpf_map__name(ptr) or b"").decode()
            # internal maps are named "<obj prefix>.rodata"
            if map_name == name or (name.startswith(".") and map_name.endswith(name)):
                return ptr
        raise KeyError(f"{self.path}: no map {name}")

    def maps(self) -> list[MapSpecInfo]:
        """Every map of the object, internal ones (.rodata, ...) included."""
        return [MapSpecInfo(ptr) for ptr in self._map_ptrs()]

    def program_names(self) -> list[str]:
        names = []
        ptr = _lib.bpf_object__next_program(self._ptr(), None)
        while ptr:
            names.append((_lib.bpf_program__name(ptr) or b"").decode())
            ptr = _lib.bpf_object__next_program(self._ptr(), ptr)
        return names

    def rodata(self, struct_type: type[V], section: str = ".rodata") -> V:
        """A copy of the initial ``.rodata`` image (the C defaults) as ``struct_type``."""
        ptr = self._map_ptr(section)
        size = ctypes.c_size_t()
        data = _lib.bpf_map__initial_value(ptr, ctypes.byref(size))
        _check_ptr(data, f"{section} initial value")
        self._check_size(struct_type, size.value, section)
        return struct_type.from_buffer_copy(ctypes.string_at(data, size.value))  # type: ignore[attr-defined,no-any-return]

    def set_rodata(self, value: Any, section: str = ".rodata") -> None:
        """Replace the ``.rodata`` image with ``value`` (a ctypes Structure mirroring it).

        Must precede load(); the size must equal the section's, so a stale mirror fails loudly.
        """
        if self.loaded:
            raise ValueError(f"{self.path}: .rodata is frozen once loaded")
        ptr = self._map_ptr(section)
        size = ctypes.c_size_t()
        _lib.bpf_map__initial_value(ptr, ctypes.byref(size))
        self._check_size(type(value), size.value, section)
        rc = _lib.bpf_map__set_initial_value(ptr, ctypes.byref(value), ctypes.sizeof(value))
        _check(rc, f"{self.path}: set {section}")

    def set_max_entries(self, map_name: str, max_entries: int) -> None:
        """Resize a map before load() (benches, tests); the pinned map's size must then agree."""
        if self.loaded:
            raise ValueError(f"{self.path}: map sizes are fixed once loaded")
        rc = _lib.bpf_map__set_max_entries(self._map_ptr(map_name), max_entries)
        _check(rc, f"{self.path}: set max_entries of {map_name}")

    def _check_size(self, struct_type: type[Any], size: int, section: str) -> None:
        if ctypes.sizeof(struct_type) != size:
            raise ValueError(
                f"{self.path}: {section} is {size} bytes, "
                f"{struct_type.__name__} is {ctypes.sizeof(struct_type)}"
            )

    def load(self) -> Object:
        """Create/reuse maps, run the verifier, load programs. Raises OSError with its log."""
        _check(_lib.bpf_object__load(self._ptr()), f"load {self.path}")
        self.loaded = True
        return self

    def prog_fd(self, name: str) -> int:
        ptr = _lib.bpf_object__find_program_by_name(self._ptr(), name.encode())
        _check_ptr(ptr, f"{self.path}: program {name}")
        return _check(_lib.bpf_program__fd(ptr), f"{self.path}: fd of program {name}")

    def map_fd(self, name: str) -> int:
        return _check(_lib.bpf_map__fd(self._map_ptr(name)), f"{self.path}: fd of map {name}")

    def map(self, name: str, key_type: type[K], value_type: type[V]) -> Map[K, V]:
        """A typed view of one of the object's maps (the fd stays the object's)."""
        return Map(self.map_fd(name), key_type, value_type, name=name)

    def close(self) -> None:
        """Close the object's fds. Pinned maps and pinned links live on."""
        if self._obj is not None:
            _lib.bpf_object__close(self._obj)
            self._obj = None


# ---------------------------------------------------------------------------- pins and info


def obj_get(path: str) -> int:
    """Open a pinned map, program or link; returns a new fd."""
    return _check(_lib.bpf_obj_get(path.encode()), f"bpf_obj_get {path}")


def obj_pin(fd: int, path: str) -> None:
    _check(_lib.bpf_obj_pin(fd, path.encode()), f"bpf_obj_pin {path}")


InfoT = TypeVar("InfoT", bound=ctypes.Structure)


def _obj_info(fd: int, info_type: type[InfoT], what: str) -> InfoT:
    """bpf_obj_get_info_by_fd into the (prefix of the) info struct ``info_type`` mirrors."""
    info = info_type()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), what)
    return info


def prog_info(prog_fd: int) -> tuple[int, str]:
    """(program id, kernel name, truncated to 15 chars) of a program fd."""
    info = _obj_info(prog_fd, _ProgInfo, "prog info")
    return info.id, info.name.decode()


BPF_STATS_RUN_TIME = 0


def enable_run_time_stats() -> int:
    """BPF_ENABLE_STATS: every program's run_time_ns / run_cnt count while the returned fd is
    open (closing it, or the process ending, turns them off again)."""
    return _check(_lib.bpf_enable_stats(BPF_STATS_RUN_TIME), "bpf_enable_stats")


def prog_get_fd_by_id(prog_id: int) -> int:
    return _check(_lib.bpf_prog_get_fd_by_id(prog_id), f"bpf_prog_get_fd_by_id {prog_id}")


def prog_run_stats(prog_fd: int) -> tuple[str, int, int]:
    """(kernel name, run_time_ns, run_cnt) of a program fd."""
    info = _obj_info(prog_fd, _ProgInfo, "prog info")
    return info.name.decode(), int(info.run_time_ns), int(info.run_cnt)


def link_prog_id(link_fd: int) -> int:
    """The program id of a bpf_link of any type."""
    return int(_obj_info(link_fd, _LinkInfo, "link info").prog_id)


@dataclass(frozen=True)
class MapDef:
    """What defines a map for reuse: libbpf reuses a pin only if all of it matches."""

    type: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int

    @classmethod
    def of_fd(cls, map_fd: int) -> MapDef:
        info = _obj_info(map_fd, _MapInfo, "map info")
        return cls(info.type, info.key_size, info.value_size, info.max_entries, info.map_flags)

    @classmethod
    def of_spec(cls, spec: MapSpecInfo) -> MapDef:
        return cls(spec.type, spec.key_size, spec.value_size, spec.max_entries, spec.map_flags)

    @property
    def per_cpu(self) -> bool:
        return self.type in PERCPU_MAP_TYPES

    def value_bytes(self) -> int:
        """The size of a lookup's value buffer (per-CPU: 8-byte slots, one per possible CPU)."""
        if self.per_cpu:
            return (self.value_size + 7) // 8 * 8 * possible_cpus()
        return self.value_size


def link_info(link_fd: int) -> tuple[int, int, int]:
    """(program id, ifindex, attach type) of a tcx link fd, e.g. one reopened from its pin."""
    info = _obj_info(link_fd, _LinkInfoTcx, "link info")
    if info.type != BPF_LINK_TYPE_TCX:
        raise ValueError(f"link {info.id} is of type {info.type}, not tcx")
    return info.prog_id, info.ifindex, info.attach_type


# ---------------------------------------------------------------------------- attach


def tcx_attach(ifindex: int, prog_fd: int, ingress: bool) -> int:
    """Attach with a tcx bpf_link (kernel >= 6.6); returns the link fd.

    The program stays attached while the fd or a pin of it (obj_pin) exists. ``ifindex`` is
    resolved in the calling thread's netns. Attaching the same program twice to one hook: EEXIST.
    """
    opts = _LinkCreateOpts(ctypes.sizeof(_LinkCreateOpts), 0)
    attach_type = BPF_TCX_INGRESS if ingress else BPF_TCX_EGRESS
    fd = _lib.bpf_link_create(prog_fd, ifindex, attach_type, ctypes.byref(opts))
    return _check(fd, f"tcx attach ifindex {ifindex} {'ingress' if ingress else 'egress'}")


def link_update(link_fd: int, new_prog_fd: int) -> None:
    """Atomically swap the program behind a link: no window without a program."""
    opts = _LinkUpdateOpts(ctypes.sizeof(_LinkUpdateOpts), 0, 0)
    _check(_lib.bpf_link_update(link_fd, new_prog_fd, ctypes.byref(opts)), "bpf_link_update")


def link_detach(link_fd: int) -> None:
    """Detach the link's program from its hook now (BPF_LINK_DETACH); the link stays, defunct.

    Dropping a link's last reference (its pin) detaches too, but the kernel may release it
    after the unlink returned: a packet right after could still meet the program."""
    _check(_lib.bpf_link_detach(link_fd), "bpf_link_detach")


def unpin_link(path: str) -> None:
    """Detach the link pinned at ``path`` synchronously, then remove the pin (gone: nothing)."""
    try:
        fd = obj_get(path)
    except FileNotFoundError:
        return
    try:
        link_detach(fd)
    except OSError:
        pass  # not a link, or already defunct: removing the pin is all there is to do
    finally:
        os.close(fd)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _tc_hook(ifindex: int, ingress: bool) -> _TcHook:
    return _TcHook(ctypes.sizeof(_TcHook), ifindex, BPF_TC_INGRESS if ingress else BPF_TC_EGRESS, 0)


def tc_attach(ifindex: int, prog_fd: int, ingress: bool, handle: int = 1, priority: int = 1) -> int:
    """Fallback: clsact qdisc + cls_bpf direct-action filter (replacing ours); returns prog id.

    Resolves ``ifindex`` in the calling thread's netns.
    """
    hook = _tc_hook(ifindex, ingress)
    rc = _lib.bpf_tc_hook_create(ctypes.byref(hook))
    if rc != -_EEXIST:  # the clsact qdisc may be there already
        _check(rc, f"clsact on ifindex {ifindex}")
    opts = _TcOpts(ctypes.sizeof(_TcOpts), prog_fd, 1, 0, handle, priority)  # 1 = BPF_TC_F_REPLACE
    _check(_lib.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts)), f"tc attach {ifindex}")
    return int(opts.prog_id)


def tc_query(ifindex: int, ingress: bool, handle: int = 1, priority: int = 1) -> int | None:
    """Program id of our clsact filter, None if there is none."""
    hook = _tc_hook(ifindex, ingress)
    opts = _TcOpts(ctypes.sizeof(_TcOpts), 0, 0, 0, handle, priority)
    rc = _lib.bpf_tc_query(ctypes.byref(hook), ctypes.byref(opts))
    # ENOENT: no filter with our handle; EINVAL: no filter chain (or no clsact) on the hook at all
    if rc in (-_ENOENT, -_EINVAL):
        return None
    _check(rc, f"tc query {ifindex}")
    return int(opts.prog_id)


def tc_detach(ifindex: int, ingress: bool, handle: int = 1, priority: int = 1) -> None:
    hook = _tc_hook(ifindex, ingress)
    opts = _TcOpts(ctypes.sizeof(_TcOpts), 0, 0, 0, handle, priority)
    _check(_lib.bpf_tc_detach(ctypes.byref(hook), ctypes.byref(opts)), f"tc detach {ifindex}")


# ---------------------------------------------------------------------------- test run


def test_run(
    prog_fd: int, data: bytes, ctx: SkBuffCtx | None = None, repeat: int = 1
) -> tuple[int, bytes, int]:
    """BPF_PROG_TEST_RUN: (return value, output packet, mean duration in ns).

    The kernel builds a linear skb (so it cannot show non-linear bugs) on the netns's loopback
    unless ``ctx.ifindex`` names another device. If ``ctx`` is given it is updated in place with
    the ctx the program left. Frames shorter than 14 bytes, or IPv4 ones with less than 20 bytes
    of L3, are refused with EINVAL before the program runs.
    """
    inbuf = ctypes.create_string_buffer(data, len(data))
    out_size = len(data) + 256  # room for encapsulation growth
    outbuf = ctypes.create_string_buffer(out_size)
    opts = _TestRunOpts()
    opts.sz = ctypes.sizeof(opts)
    opts.data_in = ctypes.cast(inbuf, ctypes.c_void_p)
    opts.data_size_in = len(data)
    opts.data_out = ctypes.cast(outbuf, ctypes.c_void_p)
    opts.data_size_out = out_size
    opts.repeat = repeat
    if ctx is not None:
        ctx_ptr = ctypes.cast(ctypes.byref(ctx), ctypes.c_void_p)
        opts.ctx_in = opts.ctx_out = ctx_ptr
        opts.ctx_size_in = opts.ctx_size_out = ctypes.sizeof(ctx)
    _check(_lib.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "test_run")
    return int(opts.retval), outbuf.raw[: opts.data_size_out], int(opts.duration)


test_run.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported


# ---------------------------------------------------------------------- cgroup links, iterators

# enum bpf_attach_type / bpf_link_type values (UAPI; stable)
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP6_SENDMSG = 15
BPF_CGROUP_UDP4_RECVMSG = 19
BPF_CGROUP_UDP6_RECVMSG = 20
BPF_TRACE_ITER = 28
BPF_CGROUP_INET4_GETPEERNAME = 29
BPF_CGROUP_INET6_GETPEERNAME = 30
BPF_LINK_TYPE_CGROUP = 3

_proto("bpf_iter_create", _int, _int)


class _LinkInfoCgroup(ctypes.Structure):
    """struct bpf_link_info with the cgroup member of its union."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),  # the union is 8-byte aligned
        ("cgroup_id", ctypes.c_uint64),
        ("attach_type", ctypes.c_uint32),
        ("_pad2", ctypes.c_uint32),
    ]


def cgroup_id(path: str) -> int:
    """The id of a cgroup v2 group: its directory's inode number on the cgroup2 fs."""
    return os.stat(path).st_ino


def _refuse_root_cgroup(path: str) -> None:
    # Hooks on the root group would catch every socket of the machine. A hierarchy's root is a
    # mount point and lacks cgroup.type (a file every non-root v2 group has).
    if os.path.ismount(path) or not os.path.exists(os.path.join(path, "cgroup.type")):
        raise ValueError(f"{path} is not a non-root cgroup v2 group: refusing to attach there")


def cgroup_attach(cgroup_path: str, prog_fd: int, attach_type: int) -> int:
    """Attach a cgroup program with a bpf_link (multi-attach: others' programs stay); link fd.

    The program stays attached while the fd or a pin of it exists, and the link goes defunct
    (cgroup id 0) when the group is removed. The root group of a hierarchy is refused.
    """
    _refuse_root_cgroup(cgroup_path)
    cg = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        opts = _LinkCreateOpts(ctypes.sizeof(_LinkCreateOpts), 0)
        fd = _lib.bpf_link_create(prog_fd, cg, attach_type, ctypes.byref(opts))
        return _check(fd, f"cgroup attach {cgroup_path} type {attach_type}")
    finally:
        os.close(cg)


def cgroup_link_info(link_fd: int) -> tuple[int, int, int]:
    """(program id, cgroup id, attach type) of a cgroup link fd; cgroup id 0 once defunct."""
    info = _obj_info(link_fd, _LinkInfoCgroup, "link info")
    if info.type != BPF_LINK_TYPE_CGROUP:
        raise ValueError(f"link {info.id} is of type {info.type}, not cgroup")
    return info.prog_id, info.cgroup_id, info.attach_type


def iter_link(prog_fd: int) -> int:
    """A BPF_TRACE_ITER link for an iterator program without parameters (iter/udp...)."""
    opts = _LinkCreateOpts(ctypes.sizeof(_LinkCreateOpts), 0)
    return _check(_lib.bpf_link_create(prog_fd, 0, BPF_TRACE_ITER, ctypes.byref(opts)), "iter link")


def iter_run(link_fd: int) -> bytes:
    """Run an iterator once and return what it wrote.

    Socket iterators walk the network namespace of the calling thread at this call.
    """
    fd = _check(_lib.bpf_iter_create(link_fd), "bpf_iter_create")
    try:
        out = bytearray()
        while chunk := os.read(fd, 65536):
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)

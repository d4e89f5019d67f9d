"""C layouts (BTF of the compiled objects) against their Python mirrors, and the verifier.

types.h / maps.h / reasons.h / config.h are the source of truth; a mismatch here means a mirror
in src/tabby/bpf is stale (or a layout changed without a _vN bump).
"""

from __future__ import annotations

import ctypes
import enum
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tabby.bpf import libbpf
from tabby.bpf.maps import ALL_SPECS, conntrack, ctgc, ctlb, maglev, nat, policy, workloads6
from tabby.bpf.maps.counters import C_PREFIX, REASON_MAX, Reason
from tabby.bpf.maps.routes import RouteFlags, RouteKey, RouteValue, WlDevValue
from tabby.bpf.objects import ENTRY_OBJECTS, DatapathConfig

Types = dict[int, dict[str, Any]]

# every tby_* struct of types.h and its mirror
MIRRORS: dict[str, type[ctypes.Structure]] = {
    "tby_route_key": RouteKey,
    "tby_route_val": RouteValue,
    "tby_wl_dev_val": WlDevValue,
    "tby_nat_fe_key": nat.FrontendKey,
    "tby_nat_fe_val": nat.FrontendValue,
    "tby_nat_be_key": nat.BackendKey,
    "tby_nat_be_val": nat.BackendValue,
    "tby_maglev_key": maglev.MaglevKey,
    "tby_nat_aff_key": nat.AffinityKey,
    "tby_nat_aff_val": nat.AffinityValue,
    "tby_nat_src_key": nat.SourceRangeKey,
    "tby_ct_key": conntrack.CtKey,
    "tby_ct_val": conntrack.CtValue,
    "tby_frag_key": conntrack.FragKey,
    "tby_frag_val": conntrack.FragValue,
    "tby_ctlb_sk_key": ctlb.CtlbSockKey,
    "tby_ctlb_sk_val": ctlb.CtlbSockValue,
    "tby_ctlb_conn": ctlb.CtlbConn,
    "tby_ctlb_conn6": ctlb.CtlbConn6,
    "tby_nat_fe6_key": nat.Frontend6Key,
    "tby_nat_be6_val": nat.Backend6Value,
    "tby_ctlb_sk6_key": ctlb.CtlbSock6Key,
    "tby_ctlb_sk6_val": ctlb.CtlbSock6Value,
    "tby_ct6_key": conntrack.Ct6Key,
    "tby_ct6_val": conntrack.Ct6Value,
    "tby_wl6_key": workloads6.Workload6Key,
    "tby_wl6_val": workloads6.Workload6Value,
    "tby_ct_gc_stats": ctgc.CtGcStats,
    "tby_pol_ep_val": policy.EndpointValue,
    "tby_pol_peer_key": policy.PeerKey,
    "tby_pol_port_key": policy.PortKey,
    "tby_pol_ep6_key": policy.Endpoint6Key,
    "tby_pol_peer6_key": policy.Peer6Key,
    "tby_pol_ct6_val": policy.PolCt6Value,
}
OBJECTS = sorted(ENTRY_OBJECTS)
TYPES_H = Path(__file__).resolve().parents[2] / "bpf/include/tabby/types.h"
_MODIFIERS = {"CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"}


def _strip(types: Types, type_id: int) -> dict[str, Any]:
    t = types[type_id]
    while t["kind"] in _MODIFIERS:
        t = types[t["type_id"]]
    return t


def _size(types: Types, type_id: int) -> int:
    t = _strip(types, type_id)
    while t["kind"] == "TYPEDEF":
        t = _strip(types, t["type_id"])
    if t["kind"] == "ARRAY":
        return int(t["nr_elems"]) * _size(types, t["type_id"])
    return int(t["size"])


def _is_be_typedef(types: Types, type_id: int) -> bool:
    """BTF knows byte order only through typedef names: __be16/__be32/__be64."""
    t = _strip(types, type_id)
    while t["kind"] == "TYPEDEF":
        if t["name"].startswith("__be"):
            return True
        t = _strip(types, t["type_id"])
    return False


def _is_be_ctype(ctype: Any) -> bool:
    if not hasattr(ctype, "__ctype_be__"):  # arrays: byte arrays have no order
        return False
    return (
        ctypes.sizeof(ctype) > 1 and ctype is ctype.__ctype_be__ and ctype is not ctype.__ctype_le__
    )


def _is_bitfield(struct: dict[str, Any], member: str) -> bool:
    return any(m.get("bitfield_size", 0) for m in struct["members"] if m["name"] == member)


def _named(types: Types, kind: str) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in types.values() if t["kind"] == kind}


def _datasec_vars(types: Types, section: str) -> list[dict[str, Any]]:
    sec = _named(types, "DATASEC")[section]
    return [types[v["type_id"]] for v in sec["vars"]]


@pytest.mark.parametrize("obj", OBJECTS)
def test_every_tby_struct_has_a_matching_mirror(btf: dict[str, Types], obj: str) -> None:
    types = btf[obj]
    structs = {n: t for n, t in _named(types, "STRUCT").items() if n.startswith("tby_")}
    assert set(structs) <= set(MIRRORS), (
        f"tby_* structs without a mirror: {set(structs) - set(MIRRORS)}"
    )
    for name, t in structs.items():
        mirror = MIRRORS[name]
        assert ctypes.sizeof(mirror) == t["size"], f"{name}: size"
        c_members = [(m["name"], m["bits_offset"] // 8, m["type_id"]) for m in t["members"]]
        py_fields = [(f[0], getattr(mirror, f[0]).offset, f[1]) for f in mirror._fields_]
        assert [m[0] for m in c_members] == [f[0] for f in py_fields], f"{name}: member names/order"
        for (cname, coff, ctid), (_, poff, ptype) in zip(c_members, py_fields, strict=True):
            assert not _is_bitfield(t, cname), f"{name}.{cname}: bitfields are not mirrored"
            assert coff == poff, f"{name}.{cname}: offset {coff} != {poff}"
            assert _size(types, ctid) == ctypes.sizeof(ptype), f"{name}.{cname}: size"
            assert _is_be_typedef(types, ctid) == _is_be_ctype(ptype), f"{name}.{cname}: byte order"


def test_types_used_by_maps_are_all_in_btf(btf: dict[str, Types]) -> None:
    """Each mirror must be visible in at least one object, or the check above checks nothing."""
    seen = {n for types in btf.values() for n in _named(types, "STRUCT")}
    assert set(MIRRORS) <= seen


@pytest.mark.parametrize("obj", OBJECTS)
def test_map_specs_match_btf_map_definitions(btf: dict[str, Types], obj: str) -> None:
    types = btf[obj]
    defs = {v["name"]: _strip(types, v["type_id"]) for v in _datasec_vars(types, ".maps")}
    assert set(defs) == {s.name for s in ALL_SPECS}, "maps.h and ALL_SPECS list different maps"
    for spec in ALL_SPECS:
        members = {m["name"]: m["type_id"] for m in defs[spec.name]["members"]}

        def uint(field: str, members: dict[str, int] = members) -> int:
            if field not in members:  # e.g. no max_entries: socket storage
                return 0
            arr = _strip(types, types[members[field]]["type_id"])  # __uint(): int (*name)[value]
            return int(arr["nr_elems"])

        def pointee(field: str, members: dict[str, int] = members) -> dict[str, Any]:
            return _strip(types, types[members[field]]["type_id"])

        assert uint("type") == spec.map_type, f"{spec.name}: type"
        assert uint("max_entries") == spec.max_entries, f"{spec.name}: max_entries"
        assert uint("map_flags") == spec.map_flags, f"{spec.name}: flags"
        assert uint("pinning") == 1, f"{spec.name}: must be LIBBPF_PIN_BY_NAME"
        for field, ctype in (("key", spec.key_type), ("value", spec.value_type)):
            t = pointee(field)
            size = _size(types, types[members[field]]["type_id"])
            assert size == ctypes.sizeof(ctype), f"{spec.name}: {field} size"
            if t["kind"] == "STRUCT":
                assert MIRRORS.get(t["name"]) is ctype, (
                    f"{spec.name}: {field} is struct {t['name']}"
                )


@pytest.mark.parametrize("obj", OBJECTS)
def test_reasons_enum_matches_python(btf: dict[str, Types], obj: str) -> None:
    enum = _named(btf[obj], "ENUM").get("tby_reason")
    assert enum is not None, "enum tby_reason missing from BTF (reasons.h anchors it)"
    c_values = {v["name"]: v["val"] for v in enum["values"]}
    assert c_values.pop("TBY_REASON_MAX") == REASON_MAX
    assert c_values == {r.c_name: r.value for r in Reason}
    assert all(name.startswith(C_PREFIX) for name in c_values)


@pytest.mark.parametrize("obj", OBJECTS)
def test_rodata_matches_datapath_config(btf: dict[str, Types], bpf_dir: Path, obj: str) -> None:
    """Names and types from BTF; offsets from the ELF symbols (BTF DATASEC offsets are only
    filled in by libbpf at open time)."""
    types = btf[obj]
    var_types = {v["name"]: v["type_id"] for v in _datasec_vars(types, ".rodata")}
    offsets = _rodata_symbols(bpf_dir / obj)
    c_layout = sorted((offsets[name], name) for name in var_types)
    assert [n for _, n in c_layout] == [f[0] for f in DatapathConfig._fields_]
    for off, name in c_layout:
        ptype = dict(DatapathConfig._fields_)[name]
        assert getattr(DatapathConfig, name).offset == off, f"{name}: offset"
        assert _size(types, var_types[name]) == ctypes.sizeof(ptype), f"{name}: size"
        assert _is_be_typedef(types, var_types[name]) == _is_be_ctype(ptype), f"{name}: byte order"


def _rodata_symbols(path: Path) -> dict[str, int]:
    sections = subprocess.run(
        ["readelf", "-SW", str(path)], capture_output=True, text=True, check=True
    )
    idx = next(
        m.group(1)
        for m in re.finditer(r"\[\s*(\d+)\]\s+(\S+)", sections.stdout)
        if m.group(2) == ".rodata"
    )
    syms = subprocess.run(["readelf", "-sW", str(path)], capture_output=True, text=True, check=True)
    out = {}
    for line in syms.stdout.splitlines():
        cols = line.split()
        if len(cols) == 8 and cols[3] == "OBJECT" and cols[6] == idx:
            out[cols[7]] = int(cols[1], 16)
    return out


def test_route_flags_match_types_h() -> None:
    defines = {
        m.group(1): 1 << int(m.group(2))
        for m in re.finditer(r"#define TBY_RT_(\w+) \(1U << (\d+)\)", TYPES_H.read_text())
    }
    assert defines == {f.name: f.value for f in RouteFlags}


@pytest.mark.parametrize(
    ("prefix", "flags"),
    [
        ("TBY_NAT_", nat.NatFlags),
        ("TBY_CT_", conntrack.TcpFlags),
        ("TBY_CTP_", conntrack.PolVerdict),
        ("TBY_CTF_", conntrack.CtFlags),
        ("TBY_POL_", policy.PolicyFlags),
    ],
)
def test_flag_defines_match_types_h(prefix: str, flags: type[enum.IntFlag]) -> None:
    defines = {
        m.group(1): 1 << int(m.group(2))
        for m in re.finditer(rf"#define {prefix}(\w+) \(1U << (\d+)\)", TYPES_H.read_text())
    }
    assert defines == {f.name: f.value for f in flags}


def test_ct_types_match_types_h() -> None:
    defines = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"#define TBY_CT_(NAT_\w+|EXT|PLAIN) (\d+)", TYPES_H.read_text())
    }
    assert defines == {t.name: t.value for t in conntrack.CtType}


def test_names_fit_the_kernel() -> None:
    names = [p for progs in ENTRY_OBJECTS.values() for p in progs] + [s.name for s in ALL_SPECS]
    for name in names:
        assert name.startswith("tby_") and len(name) <= 15, name


@pytest.mark.root
@pytest.mark.parametrize("obj", OBJECTS)
def test_object_passes_the_verifier(bpf_dir: Path, pin_root: str, obj: str) -> None:
    o = libbpf.Object(str(bpf_dir / obj), pin_root=pin_root)
    try:
        assert sorted(o.program_names()) == sorted(ENTRY_OBJECTS[obj])
        defaults = o.rodata(DatapathConfig)
        assert defaults.cfg_vni == 4096 and defaults.cfg_host_ip == 0
        o.set_rodata(DatapathConfig.build(vni=7, host_ip="172.20.32.10"))
        o.load()
        for spec in ALL_SPECS:  # the kernel's view agrees with the spec, and it is pinned
            info = {m.name: m for m in o.maps()}[spec.name]
            assert (
                info.type,
                info.key_size,
                info.value_size,
                info.max_entries,
                info.map_flags,
            ) == (
                spec.map_type,
                spec.key_size,
                spec.value_size,
                spec.max_entries,
                spec.map_flags,
            )
            assert info.pin_path == f"{pin_root}/{spec.name}"
        for prog in ENTRY_OBJECTS[obj]:
            assert libbpf.prog_info(o.prog_fd(prog))[1] == prog
    finally:
        o.close()

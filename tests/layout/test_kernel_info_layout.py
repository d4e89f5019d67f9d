"""The kernel's info structs libbpf.py mirrors (struct bpf_prog_info, bpf_link_info) against the
running kernel's own BTF: a field at the wrong offset would read another field's value (the
bench's BPF run time per connection comes from bpf_prog_info.run_time_ns / run_cnt)."""

from __future__ import annotations

import ctypes
import json
import subprocess
from typing import Any

import pytest

from tabby.bpf import libbpf

VMLINUX = "/sys/kernel/btf/vmlinux"


@pytest.fixture(scope="module")
def kernel_structs() -> dict[str, dict[str, Any]]:
    dump = subprocess.run(
        ["bpftool", "-j", "btf", "dump", "file", VMLINUX],
        capture_output=True,
        text=True,
        check=True,
    )
    return {
        t["name"]: t
        for t in json.loads(dump.stdout)["types"]
        if t["kind"] == "STRUCT" and t.get("name") in ("bpf_prog_info", "bpf_link_info")
    }


@pytest.mark.parametrize(
    ("struct", "mirror"),
    [("bpf_prog_info", libbpf._ProgInfo), ("bpf_link_info", libbpf._LinkInfo)],
)
def test_mirror_offsets_match_the_kernel(
    kernel_structs: dict[str, dict[str, Any]], struct: str, mirror: type[ctypes.Structure]
) -> None:
    offsets = {m["name"]: m["bits_offset"] // 8 for m in kernel_structs[struct]["members"]}
    for name, *_ in mirror._fields_:
        assert name in offsets, f"{struct} has no field {name}"
        assert getattr(mirror, name).offset == offsets[name], name
    assert ctypes.sizeof(mirror) <= kernel_structs[struct]["size"]

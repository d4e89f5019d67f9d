"""Fixtures of the layout suite: built objects, their BTF, and a throw-away pin root."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tabby.bpf.objects import ENTRY_OBJECTS


@pytest.fixture(scope="session")
def btf(bpf_dir: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """{object file name: {type id: BTF type}} as bpftool dumps it."""
    out = {}
    for name in ENTRY_OBJECTS:
        dump = subprocess.run(
            ["bpftool", "-j", "btf", "dump", "file", str(bpf_dir / name)],
            capture_output=True,
            text=True,
            check=True,
        )
        out[name] = {t["id"]: t for t in json.loads(dump.stdout)["types"]}
    return out

"""bpfMapSize*: a size changed in the FelixConfiguration reaches the pinned maps at the next load
of the datapath, entries kept; a size below the entries present is refused, naming its field,
and nothing is dropped."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import packets as P
import pytest

from tabby.bpf import libbpf, mapsizes
from tabby.bpf.maps.routes import RouteValue
from tabby.bpf.objects import DatapathConfig, DatapathObjects

pytestmark = pytest.mark.root

ROUTES = {f"100.96.{i}.0/26": RouteValue.remote_workload(P.REMOTE_NODE_IP) for i in range(5)}


def _pinned_max_entries(pin_root: str, name: str) -> int:
    """As bpftool shows the pin (not through the code under test)."""
    out = subprocess.run(
        ["bpftool", "-j", "map", "show", "pinned", f"{pin_root}/{name}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(json.loads(out.stdout)["max_entries"])


def _load(pin_root: str, bpf_dir: Path, fields: dict[str, int]) -> mapsizes.SizePlan:
    plan = mapsizes.plan(pin_root, fields.items())
    DatapathObjects(pin_root, DatapathConfig.build(), bpf_dir, plan.sizes).load().close()
    return plan


def _node_with_routes(pin_root: str, bpf_dir: Path) -> None:
    """A node's pins at the build's sizes, with ROUTES in tby_routes."""
    with DatapathObjects(pin_root, DatapathConfig.build(), bpf_dir) as dp:
        for cidr, value in ROUTES.items():
            dp.routes().upsert(cidr, value)


def test_a_changed_size_reaches_the_pinned_map_with_its_entries(
    bpf_dir: Path, pin_root: str
) -> None:
    _node_with_routes(pin_root, bpf_dir)
    assert _pinned_max_entries(pin_root, "tby_routes") == 65536
    plan = _load(pin_root, bpf_dir, {"bpfMapSizeRoute": 1024, "bpfMapSizeNATFrontend": 2048})
    assert plan.refused == []
    assert _pinned_max_entries(pin_root, "tby_routes") == 1024
    assert _pinned_max_entries(pin_root, "tby_nat_fe") == 2048
    assert _pinned_max_entries(pin_root, "tby_nat_fe6") == 2048
    assert _pinned_max_entries(pin_root, "tby_ct") == 512000  # not set: the build's size
    with DatapathObjects(pin_root, DatapathConfig.build(), bpf_dir, plan.sizes) as dp:
        assert dp.routes().dump() == ROUTES  # carried over
        # every object uses the one new map
        fds = [o.map_fd("tby_routes") for o in dp.objects.values()]
        assert {libbpf.MapDef.of_fd(fd).max_entries for fd in fds} == {1024}
    # the field removed: back to the build's size, entries kept
    _load(pin_root, bpf_dir, {})
    assert _pinned_max_entries(pin_root, "tby_routes") == 65536


def test_a_size_below_the_entries_present_is_refused_naming_its_field(
    bpf_dir: Path, pin_root: str
) -> None:
    _node_with_routes(pin_root, bpf_dir)
    plan = _load(pin_root, bpf_dir, {"bpfMapSizeRoute": 3, "bpfMapSizeConntrack": 4096})
    assert len(plan.refused) == 1 and plan.refused[0].startswith("bpfMapSizeRoute: 3 is fewer")
    assert "kept at 65,536" in plan.refused[0]
    assert _pinned_max_entries(pin_root, "tby_routes") == 65536  # not truncated
    assert _pinned_max_entries(pin_root, "tby_ct") == 4096  # the other field applies
    with DatapathObjects(pin_root, DatapathConfig.build(), bpf_dir, plan.sizes) as dp:
        assert dp.routes().dump() == ROUTES
    # exactly the entries present fits
    assert _load(pin_root, bpf_dir, {"bpfMapSizeRoute": len(ROUTES)}).refused == []
    assert _pinned_max_entries(pin_root, "tby_routes") == len(ROUTES)

"""`tabbyctl preflight` mounts bpffs when it is missing: shown in a private mount namespace.

The host's /sys/fs/bpf is never touched: ``unshare --mount --propagation private`` gives the shell
its own copy of the mount table, and an unmount there does not propagate back.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tabby.preflight import BPFFS, bpffs_mounted

pytestmark = [pytest.mark.root]

TABBYCTL = os.path.join(os.path.dirname(sys.executable), "tabbyctl")

# Every stacked bpffs mount goes (loop), then: count, preflight, count. Markers split the output.
SCRIPT = f"""
while umount {BPFFS} 2>/dev/null; do :; done
echo "before=$(grep -c ' {BPFFS} ' /proc/self/mounts)"
{TABBYCTL} preflight "$@"
echo "rc=$?"
echo "after=$(grep -c ' {BPFFS} ' /proc/self/mounts)"
"""


def preflight_in_private_mount_ns(*args: str) -> tuple[dict[str, str], str]:
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", SCRIPT, "sh", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},  # rich must not wrap the detail column
    )
    assert out.returncode == 0, out.stderr
    marks = dict(
        line.split("=", 1)
        for line in out.stdout.splitlines()
        if line.split("=", 1)[0] in ("before", "rc", "after")
    )
    return marks, out.stdout + out.stderr


def bpffs_row(table: str) -> str:
    rows = [line for line in table.splitlines() if line.strip("│┃ ").startswith("bpffs ")]
    assert len(rows) == 1, table
    return rows[0]


@pytest.fixture
def host_bpffs_untouched(root_caps: None):
    assert bpffs_mounted(), "the host has no bpffs to begin with"
    yield
    assert bpffs_mounted(), "the host's bpffs was unmounted"


def test_preflight_mounts_missing_bpffs_and_says_so(host_bpffs_untouched):
    marks, text = preflight_in_private_mount_ns()
    assert marks["before"] == "0", text
    assert marks["rc"] == "0", text
    assert marks["after"] == "1", text
    row = bpffs_row(text)
    assert "ok" in row and f"{BPFFS} was not mounted: mounted it" in row


def test_preflight_no_mount_reports_bpffs_missing_and_fails(host_bpffs_untouched):
    marks, text = preflight_in_private_mount_ns("--no-mount")
    assert marks["before"] == "0", text
    assert marks["rc"] == "1", text
    assert marks["after"] == "0", text
    assert "MISSING" in bpffs_row(text)
    assert "missing: bpffs" in text

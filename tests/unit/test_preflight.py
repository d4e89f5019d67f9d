"""Pre-flight parsers: cgroup v2 and bpffs found from mountinfo, kernel version parsing."""

from __future__ import annotations

import pytest

from tabby.preflight import bpffs_mounted, cgroup2_mount, kernel_version

HYBRID = """\
35 24 0:30 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw
37 35 0:32 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
"""
UNIFIED = "30 24 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
BPF = "40 24 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw\n"


def test_cgroup2_found_on_hybrid_and_unified_hosts():
    assert cgroup2_mount(HYBRID) == "/sys/fs/cgroup/unified"
    assert cgroup2_mount(UNIFIED) == "/sys/fs/cgroup"
    assert cgroup2_mount("") is None


def test_bpffs_detection():
    assert bpffs_mounted(BPF) and not bpffs_mounted(HYBRID)


def test_kernel_version():
    assert kernel_version("6.18.44-fc-v657") == (6, 18)
    assert kernel_version("5.10.0") == (5, 10)


def test_wireguard_loaded_module_is_enough(tmp_path, monkeypatch):
    from tabby import preflight

    monkeypatch.setattr(preflight, "WIREGUARD_MODULE", str(tmp_path))
    assert preflight.wireguard_support() == (True, f"{tmp_path} present")


@pytest.mark.root
def test_wireguard_probe_is_real_and_leaves_nothing(tmp_path, monkeypatch):
    """The probe creates a wireguard link in a throw-away namespace: on this kernel (no
    WireGuard) the kernel's own EOPNOTSUPP answers; on a kernel with it the link is created."""
    from pyroute2 import IPRoute

    from tabby import preflight

    monkeypatch.setattr(preflight, "WIREGUARD_MODULE", str(tmp_path / "absent"))
    ok, detail = preflight.wireguard_support()
    assert detail in (
        "a wireguard link can be created",
        "creating a wireguard link: not supported by this kernel",
    )
    assert ok == (detail == "a wireguard link can be created")
    with IPRoute() as ipr:
        assert not ipr.link_lookup(ifname="tby-wgprobe"), "the probe leaked a link"
    row = next(c for c in preflight.run_checks(mount=False) if c.name == "wireguard")
    assert not row.required

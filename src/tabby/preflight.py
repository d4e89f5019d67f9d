"""Pre-flight: what this host must offer before tabby loads anything, checked up front.

Seed 001's first step is "make sure the BPF filesystem is mounted"; here that is done for the user.
Each check yields one row; ``require`` turns the failed ones into a single line naming what is
missing, so an agent fails at start-up with a reason instead of later with an errno.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import subprocess
import threading
from dataclasses import dataclass

BPFFS = "/sys/fs/bpf"
BTF_VMLINUX = "/sys/kernel/btf/vmlinux"
MIN_KERNEL = (5, 10)  # cgroup sock_addr, LPM tries, bpf_skb_adjust_room encap flags
TCX_KERNEL = (6, 6)
CAPS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_BPF": 39}
CLONE_NEWNET = 0x40000000
WIREGUARD_MODULE = "/sys/module/wireguard"


class PreflightError(Exception):
    pass


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


def kernel_version(release: str | None = None) -> tuple[int, int]:
    parts = (release or platform.release()).split("-")[0].split(".")
    return int(parts[0]), int(parts[1])


def cgroup2_mount(mountinfo: str | None = None) -> str | None:
    """The unified (v2) hierarchy's mount point, read from /proc/self/mountinfo.

    /sys/fs/cgroup on most nodes, /sys/fs/cgroup/unified on hybrid (v1 + v2) hosts like this one.
    """
    if mountinfo is None:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return left.split()[4]
    return None


def bpffs_mounted(mountinfo: str | None = None) -> bool:
    if mountinfo is None:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "bpf" and left.split()[4] == BPFFS:
            return True
    return False


def mount_bpffs() -> None:
    os.makedirs(BPFFS, exist_ok=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", BPFFS], check=True, capture_output=True)


def effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def libbpf_loadable() -> bool:
    try:
        ctypes.CDLL("libbpf.so.1")
    except OSError:
        return False
    return True


def wireguard_support() -> tuple[bool, str]:
    """Whether this kernel can create a WireGuard link, and how we know.

    Loaded module: yes. Otherwise the real test: create a ``wireguard`` link in a throw-away
    network namespace (a thread unshares one; it vanishes with the thread), so a built-in or
    auto-loadable module passes and a kernel without WireGuard answers EOPNOTSUPP. Nothing is
    created in any namespace that outlives the probe.
    """
    if os.path.isdir(WIREGUARD_MODULE):
        return True, f"{WIREGUARD_MODULE} present"
    result: list[tuple[bool, str]] = []

    def probe() -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            result.append((False, f"cannot probe: unshare(CLONE_NEWNET): {os.strerror(err)}"))
            return
        try:
            with IPRoute() as ipr:
                ipr.link("add", ifname="tby-wgprobe", kind="wireguard")
            result.append((True, "a wireguard link can be created"))
        except NetlinkError as e:
            reason = "not supported by this kernel" if e.code == errno.EOPNOTSUPP else str(e)
            result.append((False, f"creating a wireguard link: {reason}"))

    t = threading.Thread(target=probe, name="wireguard-probe")  # its netns dies with it
    t.start()
    t.join()
    return result[0] if result else (False, "probe failed")


def run_checks(mount: bool = True) -> list[Check]:
    """Every check, in order; mounts bpffs when ``mount`` and it is missing."""
    checks: list[Check] = []
    kver = kernel_version()
    checks.append(Check("kernel", kver >= MIN_KERNEL, f"{platform.release()} (need >= 5.10)"))
    checks.append(
        Check(
            "tcx links",
            kver >= TCX_KERNEL,
            "available" if kver >= TCX_KERNEL else "kernel < 6.6: clsact + cls_bpf fallback",
            required=False,
        )
    )
    checks.append(Check("BTF", os.path.exists(BTF_VMLINUX), BTF_VMLINUX))
    mounted = bpffs_mounted()
    detail = f"{BPFFS} mounted"
    if not mounted and mount:
        try:
            mount_bpffs()
            mounted, detail = True, f"{BPFFS} was not mounted: mounted it"
        except (OSError, subprocess.CalledProcessError) as e:
            detail = f"{BPFFS} not mounted and mounting failed: {e}"
    elif not mounted:
        detail = f"{BPFFS} not mounted (run: mount -t bpf bpf {BPFFS})"
    checks.append(Check("bpffs", mounted, detail))
    cg = cgroup2_mount()
    checks.append(
        Check("cgroup v2", cg is not None, cg or "no cgroup2 mount in /proc/self/mountinfo")
    )
    caps = effective_caps()
    for cap, bit in CAPS.items():
        have = bool(caps & (1 << bit))
        checks.append(Check(cap, have, "present" if have else "missing"))
    checks.append(Check("libbpf", libbpf_loadable(), "libbpf.so.1 (apt: libbpf1)"))
    wg_ok, wg_detail = wireguard_support()
    checks.append(Check("wireguard", wg_ok, wg_detail, required=False))
    return checks


def require(mount: bool = True) -> list[Check]:
    """Run the checks; raise one line naming everything required that is missing."""
    checks = run_checks(mount=mount)
    missing = [f"{c.name} ({c.detail})" for c in checks if c.required and not c.ok]
    if missing:
        raise PreflightError("pre-flight failed: missing " + "; ".join(missing))
    return checks

"""Network-namespace switching for the calling thread.

Python 3.11 has no os.setns, so this calls libc's setns(2). Only the network namespace is switched:
``ip netns exec`` would also remount /sys and hide the /sys/fs/bpf pins (tooling.md, P2).
Invariant: a thread always returns to the namespace it came from, even when the body raises.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


def netns_path(name_or_path: str) -> str:
    """A namespace given by name (``ip netns`` style) or by path (CNI_NETNS style)."""
    return name_or_path if name_or_path.startswith("/") else f"{NETNS_RUN_DIR}/{name_or_path}"


def setns_fd(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def setns_path(path: str) -> None:
    """Move the calling thread (or a freshly forked child) into the namespace at ``path``."""
    fd = os.open(netns_path(path), os.O_RDONLY)
    try:
        setns_fd(fd)
    finally:
        os.close(fd)


@contextmanager
def enter_netns(name_or_path: str | None) -> Iterator[None]:
    """Run the body with this thread in the given network namespace (None: stay where we are)."""
    if name_or_path is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        setns_path(name_or_path)
        try:
            yield
        finally:
            setns_fd(home)
    finally:
        os.close(home)


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))

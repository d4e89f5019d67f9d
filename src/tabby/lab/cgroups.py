"""The lab's cgroup v2 subtree: <unified>/tabby/<lab>/<node>/<pod>. Nothing touches the root group.

Pods get their own group, as kubelet gives each pod one, so socket-level hooks attached at a
node's group see the pods' sockets as its children.
"""

from __future__ import annotations

import os
import signal
import time

from tabby.preflight import cgroup2_mount


def root(lab: str) -> str:
    base = cgroup2_mount()
    if base is None:
        raise RuntimeError("no cgroup v2 hierarchy mounted")
    return os.path.join(base, "tabby", lab)


def group(lab: str, *parts: str) -> str:
    path = os.path.join(root(lab), *parts)
    os.makedirs(path, exist_ok=True)
    return path


def remove(path: str) -> None:
    """Remove a subtree bottom-up, killing what still runs in it (only our own groups get here)."""
    if not os.path.isdir(path):
        return
    for dirpath, dirnames, _ in os.walk(path, topdown=False):
        for d in dirnames:
            _rmdir(os.path.join(dirpath, d))
    _rmdir(path)


def _rmdir(path: str) -> None:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            pids = [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for _ in range(200):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY while the killed processes exit
            time.sleep(0.01)

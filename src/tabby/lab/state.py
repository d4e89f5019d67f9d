"""What a lab created, on disk under /run/tabby/<lab>/, so `lab down` works after a crash too.

state.json lists the lab's plan, pods and every process started (pid + kernel start time, so a
reused pid is never killed). Writers hold an flock on the state file.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

RUN_BASE = "/run/tabby"


def lab_dir(lab: str) -> str:
    return os.path.join(RUN_BASE, lab)


def datastore_url(lab: str) -> str:
    """The URL every lab component uses: the embedded store, unless the lab was brought up on
    another datastore (state.json ``datastore``, e.g. etcd on a unix socket)."""
    return str(read(lab).get("datastore") or f"sqlite:///{lab_dir(lab)}/store.db")


def _path(lab: str) -> str:
    return os.path.join(lab_dir(lab), "state.json")


def exists(lab: str) -> bool:
    return os.path.exists(_path(lab))


def read(lab: str) -> dict[str, Any]:
    try:
        with open(_path(lab)) as f:
            return dict(json.load(f))
    except FileNotFoundError:
        return {}


@contextmanager
def editing(lab: str) -> Iterator[dict[str, Any]]:
    """Read-modify-write the lab state under a lock."""
    os.makedirs(lab_dir(lab), exist_ok=True)
    with open(os.path.join(lab_dir(lab), "state.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = read(lab)
        state.setdefault("pods", {})
        state.setdefault("procs", [])
        yield state
        tmp = _path(lab) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, _path(lab))

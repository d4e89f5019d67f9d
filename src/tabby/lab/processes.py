"""Processes the lab starts (agents, the controller, pod workloads), ended only by their PID.

A process is identified by (pid, start time from /proc/<pid>/stat): a pid the kernel has since
given to somebody else is never signalled. Children are started in their own session, in the
requested network namespace (setns in the child only) and cgroup (written before exec).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from tabby.netlink.netns import setns_path


def start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return int(fields[19])  # field 22 of stat: starttime
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def enter(netns: str | None, cgroup: str | None) -> None:
    """Move the calling process into ``cgroup`` and its thread into ``netns`` (pre-exec)."""
    if cgroup:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    if netns:
        setns_path(netns)


def spawn(
    argv: Sequence[str],
    role: str,
    log_path: str,
    netns: str | None = None,
    cgroup: str | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> dict[str, Any]:
    log = open(log_path, "ab")
    try:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            preexec_fn=lambda: enter(netns, cgroup),
        )
    finally:
        log.close()
    return {"pid": proc.pid, "start": start_time(proc.pid), "role": role, "argv": list(argv)}


def zombie(pid: int) -> bool:
    """Exited, not yet reaped by its parent (which may be another lab process, e.g. the kubelet
    for its pods' containers): dead for every purpose here. A thread-group leader shows "Z" as
    soon as it exits while its other threads (which may still hold its sockets) wind down: only
    a leader alone in its group is a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] != "Z":
                return False
        return len(os.listdir(f"/proc/{pid}/task")) <= 1
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def alive(rec: dict[str, Any]) -> bool:
    pid = int(rec["pid"])
    st = start_time(pid)
    return st is not None and st == rec.get("start") and not zombie(pid)


def stop(rec: dict[str, Any], sig: int = signal.SIGTERM, timeout_s: float = 5.0) -> None:
    """Signal the recorded process (if it is still the same one) and wait for it to go."""
    if not alive(rec):
        return
    pid = int(rec["pid"])
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while alive(rec) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.02)
    if alive(rec):
        os.kill(pid, signal.SIGKILL)
        while alive(rec) and _reap(pid) is None:
            time.sleep(0.02)
    _reap(pid)  # our child that exited between two checks: no zombie left behind


def _reap(pid: int) -> int | None:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done or None
    except ChildProcessError:
        return None

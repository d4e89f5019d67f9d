"""Connect-time load balancing: the cgroup socket hooks of bpf/cgroup_ctlb.c on the node's cgroup,
and the reaper of connected UDP sockets whose backend went away.

Modes (Calico's ``bpfConnectTimeLoadBalancing``):
- ``TCP`` (default): all four hooks; the programs translate TCP, and UDP only for sockets of the
  node's own netns (``cfg_host_netns``: the node's stack has no per-packet path); pods' UDP is
  NATed per packet by the tc programs;
- ``Enabled``: all four hooks, TCP and UDP (``cfg_ctlb_udp`` 1, set at load by node.py);
- ``Disabled``: nothing attached.

Invariants:
- hooks go on the one cgroup the agent was given (the node's group, pods are its children),
  never on a hierarchy's root group (libbpf.cgroup_attach refuses it);
- each hook is a cgroup bpf_link pinned at ``<pin root>/ctlb/<hook>`` (not under ``links/``, which
  AttachManager sweeps). After a restart the pin is adopted and its program swapped in with
  BPF_LINK_UPDATE: sockets are never left untranslated between two agents. BPF_LINK_DETACH + unpin
  detaches; a pin whose group is gone (defunct link) or is another group is replaced;
- a UDP socket connected through connect4 to a backend that has since left its frontend is
  destroyed (the application gets ECONNABORTED and reconnects onto a live backend): whenever a
  UDP (frontend, backend) pair disappears from the NAT maps, and once after start-up, the
  iterator ``tby_ctlb_reap`` runs in every network namespace that a process of the cgroup subtree
  lives in. The iterator decides per socket from the maps, so a spurious run destroys nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from tabby.bpf import libbpf
from tabby.bpf.maps.ctlb import CtlbSockKey, parse_reaped
from tabby.bpf.progstats import CTLB_LINKS_DIR
from tabby.netlink.netns import setns_fd

log = logging.getLogger(__name__)
T = TypeVar("T")

REAPER = "tby_ctlb_reap"
# hook (pin name) -> (program, attach type)
HOOKS: dict[str, tuple[str, int]] = {
    "connect4": ("tby_ctlb_conn4", libbpf.BPF_CGROUP_INET4_CONNECT),
    "sendmsg4": ("tby_ctlb_send4", libbpf.BPF_CGROUP_UDP4_SENDMSG),
    "recvmsg4": ("tby_ctlb_recv4", libbpf.BPF_CGROUP_UDP4_RECVMSG),
    "getpeername4": ("tby_ctlb_peer4", libbpf.BPF_CGROUP_INET4_GETPEERNAME),
    # IPv6 ClusterIPs are served here only (no per-packet IPv6 path): TCP and UDP in any mode
    "connect6": ("tby_ctlb_conn6", libbpf.BPF_CGROUP_INET6_CONNECT),
    "sendmsg6": ("tby_ctlb_send6", libbpf.BPF_CGROUP_UDP6_SENDMSG),
    "recvmsg6": ("tby_ctlb_recv6", libbpf.BPF_CGROUP_UDP6_RECVMSG),
    "getpeername6": ("tby_ctlb_peer6", libbpf.BPF_CGROUP_INET6_GETPEERNAME),
}
_HOOKS6 = ("connect6", "sendmsg6", "recvmsg6", "getpeername6")
MODE_HOOKS: dict[str, tuple[str, ...]] = {
    # UDP over IPv4: the node's own only
    "TCP": ("connect4", "sendmsg4", "recvmsg4", "getpeername4", *_HOOKS6),
    "Enabled": ("connect4", "sendmsg4", "recvmsg4", "getpeername4", *_HOOKS6),
    "Disabled": (),
}


class CtlbManager:
    def __init__(self, pin_root: str) -> None:
        self.pin_dir = os.path.join(pin_root, CTLB_LINKS_DIR)
        self.programmed: dict[str, tuple[int, int]] = {}  # hook -> (prog id, cgroup id)
        self._first_reap = True  # after a restart a backend may have left while we were down

    # ------------------------------------------------------------------ hooks

    def apply(self, cgroup_path: str | None, mode: str, prog_fds: dict[str, int]) -> list[str]:
        """Attach/replace the hooks ``mode`` needs on ``cgroup_path``; detach the others."""
        if mode not in MODE_HOOKS:
            return [f"bpfConnectTimeLoadBalancing {mode!r} is not TCP, Enabled or Disabled"]
        wanted = set(MODE_HOOKS[mode]) if cgroup_path else set()
        errors = []
        for hook in sorted(wanted):
            prog, attach_type = HOOKS[hook]
            assert cgroup_path is not None  # wanted is empty without a group
            try:
                self._ensure(hook, cgroup_path, prog_fds[prog], attach_type)
            except (OSError, ValueError, KeyError) as e:
                errors.append(f"ctlb: attach {prog} to {cgroup_path} ({hook}): {e}")
        for hook in self._pinned():
            if hook not in wanted:
                self._detach(hook)
        return errors

    def _pin(self, hook: str) -> str:
        return os.path.join(self.pin_dir, hook)

    def _pinned(self) -> list[str]:
        try:
            return sorted(os.listdir(self.pin_dir))
        except FileNotFoundError:
            return []

    def _ensure(self, hook: str, cgroup_path: str, prog_fd: int, attach_type: int) -> None:
        prog_id = libbpf.prog_info(prog_fd)[0]
        group = libbpf.cgroup_id(cgroup_path)
        if self.programmed.get(hook) == (prog_id, group):
            return
        pin = self._pin(hook)
        if os.path.exists(pin):
            fd = libbpf.obj_get(pin)
            try:
                linked_prog, linked_group, linked_type = libbpf.cgroup_link_info(fd)
                if linked_group == group and linked_type == attach_type:
                    if linked_prog != prog_id:
                        libbpf.link_update(fd, prog_fd)  # adopt: swap the program, no gap
                    self.programmed[hook] = (prog_id, group)
                    return
            finally:
                os.close(fd)
        # new, or the pin is defunct (group removed) / on another group: a fresh link
        fd = libbpf.cgroup_attach(cgroup_path, prog_fd, attach_type)
        try:
            os.makedirs(self.pin_dir, exist_ok=True)
            _unlink(pin)
            libbpf.obj_pin(fd, pin)
        finally:
            os.close(fd)
        self.programmed[hook] = (prog_id, group)
        log.info("ctlb: attached %s to %s (%s)", HOOKS[hook][0], cgroup_path, hook)

    def _detach(self, hook: str) -> None:
        libbpf.unpin_link(self._pin(hook))  # detached now, not when the kernel frees the link
        self.programmed.pop(hook, None)
        log.info("ctlb: detached %s", hook)

    # ------------------------------------------------------------------ stale connected UDP

    def reap_stale_udp(self, cgroup_path: str | None, reaper_fd: int, needed: bool) -> list[str]:
        """Destroy connected UDP sockets whose backend left its frontend.

        ``needed``: some backend left a set in this round's NAT apply (or the agent just
        started). The reaper program itself checks each socket against the NAT maps, so a
        round without removals costs nothing: no map is read from user space. Returns errors.
        """
        if cgroup_path is None or not (needed or self._first_reap):
            return []
        self._first_reap = False
        try:
            reaped = reap(cgroup_path, reaper_fd)
        except OSError as e:
            return [f"ctlb: reaping stale UDP sockets in {cgroup_path}: {e}"]
        for key in reaped:
            log.info("ctlb: destroyed UDP %s (backend left its service)", key.describe())
        return []


def cgroup_netns_fds(cgroup_path: str) -> list[int]:
    """One open fd per distinct network namespace of the processes in the cgroup subtree.

    Holding an fd keeps the namespace alive until we have entered it, even if its last
    process exits meanwhile. The caller closes them.
    """
    seen: dict[tuple[int, int], int] = {}
    for dirpath, _, _ in os.walk(cgroup_path):
        try:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                pids = f.read().split()
        except FileNotFoundError:  # the group went away while we walked
            continue
        for pid in pids:
            try:
                fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
            except OSError:  # exited
                continue
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in seen:
                os.close(fd)
            else:
                seen[(st.st_dev, st.st_ino)] = fd
    return list(seen.values())


def reap(cgroup_path: str, reaper_fd: int) -> list[CtlbSockKey]:
    """Run the reaper iterator in every netns of the cgroup subtree; the destroyed sockets."""
    link = libbpf.iter_link(reaper_fd)
    ns_fds = cgroup_netns_fds(cgroup_path)
    try:
        out: list[CtlbSockKey] = []
        for ns in ns_fds:
            # bpf_iter_create binds the iterator to the calling thread's netns
            out += parse_reaped(_in_thread_netns(ns, lambda: libbpf.iter_run(link)))
        return out
    finally:
        for ns in ns_fds:
            os.close(ns)
        os.close(link)


def _in_thread_netns(ns_fd: int, fn: Callable[[], T]) -> T:
    """``fn()`` on a fresh thread moved into ``ns_fd``: the caller's thread never moves."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            setns_fd(ns_fd)  # this short-lived thread only
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=body, name="ctlb-reap")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise

"""Which program sits on which hook, and how it is held there.

Two attach types, as Calico's ``bpfAttachType``:
- ``TCX`` (default, kernel >= 6.6): a tcx link pinned at ``<pin root>/links/<ifname>@<in|eg>``.
  The pin is how we recognise the attachment as ours after a restart: the new agent opens it and
  swaps its program in with BPF_LINK_UPDATE, so traffic never runs unprotected between two
  agents. Detaching is BPF_LINK_DETACH then removing the pin: the program is off the hook when
  the call returns (the kernel may free an unpinned link later, and a packet meet it meanwhile).
- ``TC`` (older kernels): clsact + a cls_bpf filter with tabby's handle/priority. The attached
  program is also pinned at ``<pin root>/tc/<ifname>@<in|eg>`` as the record that the filter is
  ours; re-attaching replaces the filter in place.
bpffs refuses names with dots, so a dot in an interface name is pinned as ``~``. On a switch of
attach type the new attachment is made before the old one is removed: no unprotected gap.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from dataclasses import dataclass
from typing import Literal

from tabby.bpf import libbpf
from tabby.bpf.progstats import TC_LINKS_DIR

log = logging.getLogger(__name__)
Direction = Literal["in", "eg"]
AttachType = Literal["TCX", "TC"]
TC_HANDLE = 0x7AB  # "tab": our cls_bpf filter's handle
TC_PRIORITY = 1


@dataclass(frozen=True)
class Attachment:
    ifname: str
    direction: Direction
    program: str


class _PinDir:
    """A directory of bpffs pins named ``<ifname>@<direction>``."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(path, exist_ok=True)

    def pin(self, ifname: str, direction: str) -> str:
        return os.path.join(self.path, f"{ifname.replace('.', '~')}@{direction}")

    def entries(self) -> list[tuple[str, str]]:
        out = []
        for entry in os.listdir(self.path):
            ifname, _, direction = entry.rpartition("@")
            out.append((ifname.replace("~", "."), direction))
        return out

    def remove(self, ifname: str, direction: str) -> None:
        try:
            os.unlink(self.pin(ifname, direction))
        except FileNotFoundError:
            pass

    def detach_link(self, ifname: str, direction: str) -> None:
        """The pinned link's program off its hook before this returns, then the pin removed."""
        libbpf.unpin_link(self.pin(ifname, direction))


class AttachManager:
    def __init__(self, pin_root: str) -> None:
        self.links = _PinDir(os.path.join(pin_root, TC_LINKS_DIR))
        self.tc = _PinDir(os.path.join(pin_root, "tc"))
        # (type, ifname, dir) -> (prog id, ifindex): a veth made again under its old name is new
        self.programmed: dict[tuple[str, str, str], tuple[int, int]] = {}

    def apply(
        self, desired: list[Attachment], prog_fds: dict[str, int], attach_type: AttachType = "TCX"
    ) -> list[str]:
        """Attach/refresh ``desired`` as ``attach_type``; detach every other attachment of ours."""
        errors = []
        wanted = {(a.ifname, a.direction) for a in desired}
        for a in desired:
            try:
                if attach_type == "TCX":
                    self._ensure_tcx(a, prog_fds[a.program])
                else:
                    self._ensure_tc(a, prog_fds[a.program])
            except OSError as e:
                errors.append(f"attach {a.program} to {a.ifname} {a.direction}: {e}")
        for ifname, direction in self.links.entries():
            if attach_type != "TCX" or (ifname, direction) not in wanted:
                self.links.detach_link(ifname, direction)
                self.programmed.pop(("TCX", ifname, direction), None)
                log.info("detached tcx %s %s", ifname, direction)
        for ifname, direction in self.tc.entries():
            if attach_type != "TC" or (ifname, direction) not in wanted:
                self._detach_tc(ifname, direction)
        return errors

    def _ensure_tcx(self, a: Attachment, prog_fd: int) -> None:
        ifindex = socket.if_nametoindex(a.ifname)  # this thread's netns: the node's
        prog_id = libbpf.prog_info(prog_fd)[0]
        key = ("TCX", a.ifname, a.direction)
        if self.programmed.get(key) == (prog_id, ifindex):
            return
        pin = self.links.pin(a.ifname, a.direction)
        if os.path.exists(pin):
            fd = libbpf.obj_get(pin)
            try:
                linked_prog, linked_ifindex, _ = libbpf.link_info(fd)
                if linked_ifindex == ifindex:
                    if linked_prog != prog_id:
                        libbpf.link_update(fd, prog_fd)  # adopt: swap the program, no gap
                    self.programmed[key] = (prog_id, ifindex)
                    return
            finally:
                os.close(fd)
            os.unlink(pin)  # the interface was recreated: the old link is defunct
        fd = libbpf.tcx_attach(ifindex, prog_fd, ingress=a.direction == "in")
        try:
            libbpf.obj_pin(fd, pin)
        finally:
            os.close(fd)
        self.programmed[key] = (prog_id, ifindex)
        log.info("attached %s to %s %s (tcx)", a.program, a.ifname, a.direction)

    def _ensure_tc(self, a: Attachment, prog_fd: int) -> None:
        ifindex = socket.if_nametoindex(a.ifname)
        prog_id = libbpf.prog_info(prog_fd)[0]
        key = ("TC", a.ifname, a.direction)
        ingress = a.direction == "in"
        if (
            self.programmed.get(key) == (prog_id, ifindex)
            and libbpf.tc_query(ifindex, ingress, TC_HANDLE, TC_PRIORITY) == prog_id
        ):
            return
        libbpf.tc_attach(ifindex, prog_fd, ingress, TC_HANDLE, TC_PRIORITY)
        pin = self.tc.pin(a.ifname, a.direction)
        self.tc.remove(a.ifname, a.direction)
        libbpf.obj_pin(prog_fd, pin)
        self.programmed[key] = (prog_id, ifindex)
        log.info("attached %s to %s %s (clsact)", a.program, a.ifname, a.direction)

    def _detach_tc(self, ifname: str, direction: str) -> None:
        try:
            libbpf.tc_detach(
                socket.if_nametoindex(ifname), direction == "in", TC_HANDLE, TC_PRIORITY
            )
        except OSError as e:
            if e.errno not in (errno.ENODEV, errno.ENXIO, errno.ENOENT, errno.EINVAL):
                raise
        self.tc.remove(ifname, direction)
        self.programmed.pop(("TC", ifname, direction), None)
        log.info("detached clsact %s %s", ifname, direction)

"""Which program sits on which hook: tcx links, pinned so they outlive the agent.

Each attachment is a tcx link pinned at ``<pin root>/links/<ifname>@<in|eg>`` (bpffs refuses
names with dots, so a dot in an interface name is pinned as ``~``). A pin is how we
recognise an attachment as ours after a restart: the new agent opens it and swaps its program
with BPF_LINK_UPDATE, so traffic never runs unprotected between two agents. Removing the pin
(and our fd) detaches the program. Pins whose interface disappeared are swept.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Literal

from tabby.bpf import libbpf

log = logging.getLogger(__name__)
Direction = Literal["in", "eg"]


@dataclass(frozen=True)
class Attachment:
    ifname: str
    direction: Direction
    program: str


class AttachManager:
    def __init__(self, pin_root: str) -> None:
        self.dir = os.path.join(pin_root, "links")
        os.makedirs(self.dir, exist_ok=True)
        self.programmed: dict[tuple[str, str], int] = {}  # (ifname, dir) -> attached prog id

    def _pin(self, ifname: str, direction: str) -> str:
        return os.path.join(self.dir, f"{ifname.replace('.', '~')}@{direction}")

    def pinned(self) -> list[tuple[str, str]]:
        out = []
        for entry in os.listdir(self.dir):
            ifname, _, direction = entry.rpartition("@")
            out.append((ifname.replace("~", "."), direction))
        return out

    def apply(self, desired: list[Attachment], prog_fds: dict[str, int]) -> list[str]:
        """Attach/refresh ``desired``, detach every other pin; returns per-attachment errors."""
        errors = []
        wanted = {(a.ifname, a.direction) for a in desired}
        for a in desired:
            try:
                self._ensure(a, prog_fds[a.program])
            except OSError as e:
                errors.append(f"attach {a.program} to {a.ifname} {a.direction}: {e}")
        for ifname, direction in self.pinned():
            if (ifname, direction) not in wanted:
                self._detach(ifname, direction)
        return errors

    def _ensure(self, a: Attachment, prog_fd: int) -> None:
        ifindex = socket.if_nametoindex(a.ifname)  # this thread's netns: the node's
        prog_id = libbpf.prog_info(prog_fd)[0]
        key = (a.ifname, a.direction)
        if self.programmed.get(key) == prog_id:
            return
        pin = self._pin(a.ifname, a.direction)
        if os.path.exists(pin):
            fd = libbpf.obj_get(pin)
            try:
                linked_prog, linked_ifindex, _ = libbpf.link_info(fd)
                if linked_ifindex == ifindex:
                    if linked_prog != prog_id:
                        libbpf.link_update(fd, prog_fd)  # adopt: swap the program, no gap
                    self.programmed[key] = prog_id
                    return
            finally:
                os.close(fd)
            os.unlink(pin)  # the interface was recreated: the old link is defunct
        fd = libbpf.tcx_attach(ifindex, prog_fd, ingress=a.direction == "in")
        try:
            libbpf.obj_pin(fd, pin)
        finally:
            os.close(fd)
        self.programmed[key] = prog_id
        log.info("attached %s to %s %s", a.program, a.ifname, a.direction)

    def _detach(self, ifname: str, direction: str) -> None:
        try:
            os.unlink(self._pin(ifname, direction))
        except FileNotFoundError:
            pass
        self.programmed.pop((ifname, direction), None)
        log.info("detached %s %s", ifname, direction)

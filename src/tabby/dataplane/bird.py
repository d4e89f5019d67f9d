"""The node's BIRD 2 daemon: writes bird.conf, starts BIRD by its PID, reloads it, reads it.

Runs on the agent's dataplane thread, inside the node's network namespace: BIRD forked from there
lives in that namespace. Files (config, control socket, pid, log) are in the agent's BIRD
directory. BIRD is a separate process in its own session, as in calico-node: an agent restart
(even SIGKILL) leaves it running with its sessions and routes, and the next agent adopts it by
the pid file (checked against /proc/<pid>/cmdline) and reloads it with ``birdc configure``.
A config BIRD refuses (``bird -p``) is reported and the running one keeps its routes.

Learnt routes reach tabby's BPF route map through ``learned()``: the BGP routes BIRD exports to
the kernel (pools without encapsulation), with their BGP next hop (the node that owns the block;
the kernel route's gateway may be the fabric's router).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

from tabby.calc.bird import BirdConfig

log = logging.getLogger(__name__)
BIRD = "bird"
BIRDC = "birdc"
CALL_TIMEOUT_S = 5.0
KERNEL_PROTOCOL = "kernel1"


class BirdError(Exception):
    pass


@dataclass(frozen=True)
class BirdPaths:
    directory: str

    @property
    def config(self) -> str:
        return os.path.join(self.directory, "bird.conf")

    @property
    def socket(self) -> str:
        return os.path.join(self.directory, "bird.ctl")

    @property
    def pidfile(self) -> str:
        return os.path.join(self.directory, "bird.pid")

    @property
    def log(self) -> str:
        return os.path.join(self.directory, "bird.log")


def birdc(
    socket_path: str, *command: str, timeout_s: float = CALL_TIMEOUT_S, netns: str | None = None
) -> str:
    """One birdc command on ``socket_path`` (run in network namespace ``netns`` if given);
    raises BirdError with BIRD's answer on failure."""
    if shutil.which(BIRDC) is None:
        raise BirdError("birdc is not installed (Debian package bird2)")
    if not os.path.exists(socket_path):
        raise BirdError(f"BIRD is not running: no control socket {socket_path}")
    prefix = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
    try:
        done = subprocess.run(
            [*prefix, BIRDC, "-s", socket_path, *command],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise BirdError(f"birdc {' '.join(command)}: no answer in {timeout_s:.0f} s") from None
    if done.returncode != 0:
        raise BirdError(f"birdc {' '.join(command)}: {(done.stdout + done.stderr).strip()}")
    return done.stdout


def control(socket_path: str, command: str, timeout_s: float = CALL_TIMEOUT_S) -> str:
    """One command over BIRD's control socket (what birdc does, without a process per call:
    the agent asks every second). Returns the reply as birdc prints it; BirdError on a BIRD
    error reply (codes 8000-9999) or a dead socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(socket_path)
            reply = sock.makefile("rb")
            reply.readline()  # "0001 BIRD 2.0.12 ready."
            sock.sendall(command.encode() + b"\n")
            lines: list[str] = []
            while True:
                raw = reply.readline()
                if not raw:
                    raise BirdError(f"{command}: BIRD closed the control socket")
                line = raw.decode(errors="replace").rstrip("\n")
                if len(line) >= 5 and line[:4].isdigit() and line[4] in " -":
                    if int(line[:4]) >= 8000:
                        raise BirdError(f"{command}: {line[5:]}")
                    lines.append(line[5:])
                    if line[4] == " ":  # the reply's last line
                        return "\n".join(lines) + "\n"
                else:  # a continuation line: " text"
                    lines.append(line[1:])
    except OSError as e:
        raise BirdError(f"{command}: {e}") from None


def parse_learned(text: str) -> dict[str, str]:
    """``show route ... all`` -> {prefix: BGP next hop} for unicast BGP routes."""
    out: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines():
        if line and not line[0].isspace():
            head = line.split()
            current = None
            if head and "/" in head[0] and len(head) > 1 and head[1] == "unicast":
                try:
                    current = str(ipaddress.ip_network(head[0]))
                except ValueError:
                    current = None
        elif current and line.strip().startswith("BGP.next_hop:"):
            hops = line.split(":", 1)[1].split()
            if hops:
                out[current] = hops[0]
    return out


class BirdManager:
    def __init__(self, directory: str) -> None:
        self.paths = BirdPaths(directory)
        self.proc: subprocess.Popen[bytes] | None = None  # started by this agent
        self.pid: int | None = None
        self.written: str | None = None
        self._adopt()

    def _adopt(self) -> None:
        """A BIRD an earlier agent started on this directory keeps running: take it over."""
        try:
            with open(self.paths.pidfile) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError):
            return
        if self.paths.config.encode() in argv and os.path.basename(argv[0]) == BIRD.encode():
            self.pid = pid
            try:
                with open(self.paths.config) as f:
                    self.written = f.read()
            except OSError:
                self.written = None
            log.info("adopted BIRD pid %d", pid)

    def running(self) -> bool:
        if self.proc is not None:
            if self.proc.poll() is None:
                return True
            log.warning("BIRD pid %d exited with %s", self.proc.pid, self.proc.returncode)
            self.proc, self.pid = None, None
            return False
        if self.pid is None:
            return False
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                return self.paths.config.encode() in f.read().split(b"\0")
        except OSError:
            self.pid = None
            return False

    def apply(self, cfg: BirdConfig | None) -> list[str]:
        """Desired config in force: written, checked, then BIRD started or reconfigured."""
        if cfg is None:
            return []
        if shutil.which(BIRD) is None:
            return ["BGP: bird is not installed (Debian package bird2)"]
        text = cfg.text
        alive = self.running()
        if alive and text == self.written:
            return []
        os.makedirs(self.paths.directory, mode=0o755, exist_ok=True)
        staged = self.paths.config + ".new"
        with open(staged, "w") as f:
            f.write(text)
        check = subprocess.run(
            [BIRD, "-p", "-c", staged], capture_output=True, text=True, timeout=CALL_TIMEOUT_S
        )
        if check.returncode != 0:
            return [f"BGP: BIRD refuses the rendered config: {check.stderr.strip()}"]
        os.replace(staged, self.paths.config)
        try:
            if alive:
                answer = control(self.paths.socket, "configure")
                if "Reconfigured" not in answer and "in progress" not in answer:
                    return [f"BGP: birdc configure: {answer.strip()}"]
                log.info("BIRD reconfigured (%d peers)", len(cfg.peers))
            else:
                self._start()
        except (BirdError, OSError) as e:
            return [f"BGP: {e}"]
        self.written = text
        return []

    def _start(self) -> None:
        for stale in (self.paths.socket, self.paths.pidfile):
            if os.path.exists(stale):
                os.unlink(stale)
        logf = open(self.paths.log, "ab")
        try:
            # -f: BIRD stays our child (its pid is the one we record); own session: it
            # survives the agent, as calico-node's BIRD survives Felix. -R: graceful restart
            # recovery (as calico-node starts it): after a crash, the kernel routes the last
            # BIRD left stay until the peers have re-sent theirs.
            self.proc = subprocess.Popen(
                [BIRD, "-f", "-R", "-c", self.paths.config, "-s", self.paths.socket,
                 "-P", self.paths.pidfile],
                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        finally:
            logf.close()
        self.pid = self.proc.pid
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while not os.path.exists(self.paths.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BirdError(f"BIRD did not start (log: {self.paths.log})")
            time.sleep(0.02)
        log.info("BIRD started, pid %d", self.pid)

    def learned(self) -> dict[str, str] | None:
        """Learnt routes BIRD programs into the kernel: {prefix: the owning node's address};
        None while BIRD is down or still recovering from a restart (keep what is programmed,
        as the kernel keeps BIRD's routes meanwhile)."""
        if not self.running():
            return None
        if "recovery in progress" in control(self.paths.socket, "show status"):
            return None
        query = f"show route export {KERNEL_PROTOCOL} where source = RTS_BGP all"
        return parse_learned(control(self.paths.socket, query))


@dataclass(frozen=True)
class Session:
    """One BGP session as ``birdc show protocols all`` tells it (calicoctl node status' row)."""

    name: str
    peer: str
    type: str  # the protocol's description: node-to-node mesh, global, node specific
    state: str  # up, start, down...
    since: str
    info: str  # Established, Active, Connect... and the last error
    imported: int
    exported: int


def parse_sessions(text: str) -> list[Session]:
    """BGP protocols of ``show protocols all`` (other protocols are skipped)."""
    out: list[Session] = []
    row: dict[str, str] | None = None

    def flush() -> None:
        if row is not None:
            out.append(
                Session(
                    row["name"], row.get("peer", ""), row.get("type", ""), row["state"],
                    row["since"], row["info"], int(row.get("imported", 0)),
                    int(row.get("exported", 0)),
                )
            )  # fmt: skip

    for line in text.splitlines():
        if not line.strip() or line.startswith(("BIRD ", "Name ")):
            continue
        if not line[0].isspace():
            flush()
            cols = line.split(None, 5)
            row = None
            if len(cols) >= 5 and cols[1] == "BGP":
                row = {"name": cols[0], "state": cols[3], "since": cols[4]}
                row["info"] = cols[5].strip() if len(cols) > 5 else ""
            continue
        if row is None:
            continue
        key, _, value = line.strip().partition(":")
        value = value.strip()
        if key == "Description":
            row["type"] = value
        elif key == "Neighbor address":
            row["peer"] = value
        elif key == "Routes":  # "1 imported, 1 exported, 1 preferred"
            for part in value.split(","):
                num, _, what = part.strip().partition(" ")
                if what in ("imported", "exported") and num.isdigit():
                    row[what] = num
    flush()
    return out


def sessions(socket_path: str, netns: str | None = None) -> list[Session]:
    return parse_sessions(birdc(socket_path, "show", "protocols", "all", netns=netns))

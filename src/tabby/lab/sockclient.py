"""A socket client process inside a namespace and (optionally) a cgroup, driven line by line.
IPv4 or IPv6, by the address of each command (IPv6 addresses come back as [host, port, flow,
scope]).

Socket-level hooks (connect-time load balancing) follow the cgroup of the process that opens the
socket, so a test that must see them cannot use a thread of its own: it starts this client where
a pod's (or a node's) processes live and sends it commands. One JSON command per stdin line, one
JSON answer per stdout line; an OSError comes back as ``{"errno": ..., "error": ...}``.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from types import TracebackType
from typing import Any

from tabby.lab.processes import enter

ANSWER_TIMEOUT_S = 15

SCRIPT = r"""
import json, socket, sys
udp = None
def answer(**kw):
    print(json.dumps(kw), flush=True)
def read_all(s):
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data
for line in sys.stdin:
    cmd = json.loads(line)
    op, addr = cmd["op"], (cmd.get("ip"), cmd.get("port"))
    payload = cmd.get("payload", "hi").encode()
    fam = socket.AF_INET6 if ":" in str(cmd.get("ip")) else socket.AF_INET
    try:
        if op == "tcp":  # connect; then an HTTP GET of "path", or read the server's greeting
            with socket.socket(fam) as s:
                s.settimeout(3)
                if cmd.get("bind"):
                    s.bind((cmd["bind"], 0))
                s.connect(addr)
                peer = list(s.getpeername())
                if cmd.get("path"):
                    req = f"GET {cmd['path']} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                    s.sendall(req.encode())
                    answer(peer=peer, body=read_all(s).partition(b"\r\n\r\n")[2].decode())
                else:
                    answer(peer=peer, reply=s.recv(64).decode())
        elif op == "sendto":
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.settimeout(3)
                s.sendto(payload, addr)
                data, src = s.recvfrom(512)
                answer(reply=data.decode(), src=list(src))
        elif op == "udp_connect":  # a new socket; "again": the same one, connected elsewhere
            if udp is None or not cmd.get("again"):
                if udp is not None:
                    udp.close()
                udp = socket.socket(fam, socket.SOCK_DGRAM)
                udp.settimeout(3)
            udp.connect(addr)
            answer(peer=list(udp.getpeername()))
        elif op in ("udp_send", "udp_recv"):
            if op == "udp_send":
                udp.send(payload)
            data, src = udp.recvfrom(512)
            answer(reply=data.decode(), src=list(src))
        else:
            answer(error=f"unknown op {op}")
    except OSError as e:
        answer(errno=e.errno if e.errno is not None else -1, error=str(e))
"""


class SocketClient:
    """``with SocketClient(netns, cgroup) as c: c("tcp", ip=..., port=..., path="/hostname")``.

    The process is ours and is killed by its pid on exit.
    """

    def __init__(self, netns: str, cgroup: str | None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: enter(f"/run/netns/{netns}", cgroup),
        )

    def __call__(self, op: str, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], ANSWER_TIMEOUT_S)
        if not ready:
            raise TimeoutError(f"socket client gave no answer to {op}")
        return json.loads(self.proc.stdout.readline())  # type: ignore[no-any-return]

    def __enter__(self) -> SocketClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()

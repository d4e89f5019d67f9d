"""Traffic helpers: real sockets opened from inside a namespace (a fresh thread per call, so the
caller's thread never changes namespace)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from tabby.netlink import links
from tabby.netlink.netns import enter_netns

T = TypeVar("T")


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    box: dict[str, object] = {}

    def body() -> None:
        try:
            with enter_netns(netns):
                box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def link_mtu(netns: str, ifname: str = "eth0") -> int:
    """The MTU of ``ifname`` inside ``netns``."""

    def read() -> int:
        with links.rtnl() as ipr:
            mtu = links.link_mtu(ipr, ifname)
        if mtu is None:
            raise OSError(f"{ifname} missing in {netns}")
        return mtu

    return in_netns(netns, read)


def _read_head(s: socket.socket) -> tuple[bytes, bytes]:
    """An HTTP response's header block and whatever of the body came with it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise OSError("closed before the headers")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def read_http_response(s: socket.socket) -> tuple[str, bytes]:
    """One HTTP/1.1 response with a Content-Length from a connected socket (keep-alive): its
    status line and body, read whole however the stream was segmented."""
    head, body = _read_head(s)
    lines = head.split(b"\r\n")
    length = next(
        int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = s.recv(4096)
        if not chunk:
            raise OSError("closed before the end of the body")
        body += chunk
    return lines[0].decode(), body


def http_download_len(
    netns: str, ip: str, port: int, size: int, timeout_s: float = 10.0, cpus: set[int] | None = None
) -> int:
    """GET netexec's /bytes?n=size from inside ``netns``, counting (not keeping) the body;
    on ``cpus`` if given (the receiving thread's affinity)."""

    def go() -> int:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        with socket.create_connection((ip, port), timeout=timeout_s) as s:
            s.sendall(
                f"GET /bytes?n={size} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
            )
            n = len(_read_head(s)[1])
            while chunk := s.recv(1 << 20):
                n += len(chunk)
        return n

    return in_netns(netns, go)


def http_get(netns: str, ip: str, port: int, path: str, timeout_s: float = 3.0) -> str:
    """GET http://ip:port/path from inside ``netns``; returns the body."""

    def go() -> str:
        with socket.create_connection((ip, port), timeout=timeout_s) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n")[0]:
            raise OSError(f"bad HTTP reply from {ip}:{port}: {head[:60]!r}")
        return body.decode()

    return in_netns(netns, go)


def udp_request(
    netns: str, ip: str, port: int, payload: bytes, timeout_s: float = 2.0, tries: int = 3
) -> str:
    """Send a datagram from ``netns`` and return the reply (retried: UDP may lose the first ARP)."""

    def go() -> str:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout_s / tries)
            for _ in range(tries):
                s.sendto(payload, (ip, port))
                try:
                    return s.recv(65535).decode()
                except TimeoutError:
                    continue
        raise TimeoutError(f"no UDP reply from {ip}:{port}")

    return in_netns(netns, go)


def reachable(fn: Callable[[], object]) -> tuple[bool, str]:
    try:
        return True, str(fn())
    except OSError as e:
        return False, str(e) or type(e).__name__


def conn_rate(netns: str, ip: str, port: int = 8080, seconds: float = 2.0) -> float:
    """New TCP connections/s from inside ``netns``, one at a time (connect, GET /hostname, read
    to EOF, close) for ``seconds``: a figure for tests to print, not a load generator (that is
    bench/connload.c)."""

    def go() -> float:
        done, start = 0, time.monotonic()
        while time.monotonic() - start < seconds:
            with socket.create_connection((ip, port), timeout=3) as s:
                s.sendall(b"GET /hostname HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                while s.recv(65536):
                    pass
            done += 1
        return done / (time.monotonic() - start)

    return in_netns(netns, go)

"""tabby's netexec: the lab's stand-in for agnhost netexec, a pod's test workload.

HTTP on TCP (GET /hostname, /clientip, /echo?msg=..., /bytes?n=N for large downloads) and a UDP
responder ("hostname" -> pod name, "clientip" -> the datagram's source, anything else echoed).
Every server listens on IPv4 and, where the pod has IPv6 (a dual-stack pod), on its own IPv6
socket too (IPV6_V6ONLY: IPv4 clients keep their plain addresses). Runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

MAX_BYTES = 64 << 20


class _HTTPServer(ThreadingHTTPServer):
    # agnhost's (Go) listen backlog, not socketserver's 5: the netpol matrix opens 16
    # connections to one port at once, and a SYN dropped on a full accept queue is sent again
    # only a second later, when the probe has given up
    request_queue_size = socket.SOMAXCONN


class _HTTP6Server(_HTTPServer):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


def http_server(port: int, name: str, ipv6: bool = False) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _reply(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            q = parse_qs(url.query)
            if url.path == "/hostname":
                self._reply(name.encode())
            elif url.path == "/clientip":
                self._reply(f"{self.client_address[0]}:{self.client_address[1]}".encode())
            elif url.path == "/echo":
                self._reply(q.get("msg", [""])[0].encode())
            elif url.path == "/bytes":
                self._reply(b"x" * min(int(q.get("n", ["0"])[0]), MAX_BYTES))
            else:
                self.send_error(404)

    server = (
        _HTTP6Server(("::", port), Handler) if ipv6 else _HTTPServer(("0.0.0.0", port), Handler)
    )
    server.daemon_threads = True
    return server


def udp_server(port: int, name: str, ipv6: bool = False) -> None:
    sock = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET, socket.SOCK_DGRAM)
    if ipv6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(("::" if ipv6 else "0.0.0.0", port))
    while True:
        data, peer = sock.recvfrom(65535)
        cmd = data.strip()
        if cmd == b"hostname":
            reply = name.encode()
        elif cmd == b"clientip":
            reply = f"{peer[0]}:{peer[1]}".encode()
        else:
            reply = data
        sock.sendto(reply, peer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", required=True)
    ap.add_argument("--http-port", type=int, default=8080)
    ap.add_argument("--udp-port", type=int, default=8081)
    ap.add_argument(
        "--also", type=int, action="append", default=[], help="one more port, TCP and UDP"
    )
    args = ap.parse_args()
    families = [False] + ([True] if socket.has_ipv6 and _pod_has_ipv6() else [])
    for ipv6 in families:
        for port in (args.udp_port, *args.also):  # --also: the netpol model's pods (80 and 81)
            threading.Thread(target=udp_server, args=(port, args.name, ipv6), daemon=True).start()
        for port in (args.http_port, *args.also):
            server = http_server(port, args.name, ipv6)
            threading.Thread(target=server.serve_forever, daemon=True).start()
    threading.Event().wait()


def _pod_has_ipv6() -> bool:
    """A global IPv6 address on an interface (a dual-stack pod)."""
    try:
        with open("/proc/net/if_inet6") as f:
            return any(not line.startswith("fe80") and line.split()[-1] != "lo" for line in f)
    except OSError:
        return False


if __name__ == "__main__":
    main()

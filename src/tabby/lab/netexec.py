"""tabby's netexec: the lab's stand-in for agnhost netexec, a pod's test workload.

HTTP on TCP (GET /hostname, /clientip, /echo?msg=..., /bytes?n=N for large downloads) and a UDP
responder ("hostname" -> pod name, "clientip" -> the datagram's source, anything else echoed).
Runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

MAX_BYTES = 64 << 20


def http_server(port: int, name: str) -> ThreadingHTTPServer:
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

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    return server


def udp_server(port: int, name: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
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
    threading.Thread(target=udp_server, args=(args.udp_port, args.name), daemon=True).start()
    for extra in args.also:  # the netpol model's pods: TCP and UDP on 80 and 81
        threading.Thread(target=udp_server, args=(extra, args.name), daemon=True).start()
        server = http_server(extra, args.name)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    http_server(args.http_port, args.name).serve_forever()


if __name__ == "__main__":
    main()

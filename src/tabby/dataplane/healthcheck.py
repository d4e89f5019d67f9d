"""kube-proxy's health endpoints, served by the agent that replaces it.

Two kinds of listener, answering byte for byte in kube-proxy's shapes (pkg/proxy/healthcheck):
- one per ``healthCheckNodePort`` (Services with externalTrafficPolicy Local): any path answers
  200 with ``{"service": {...}, "localEndpoints": N, "serviceProxyHealthy": true}`` while the node
  has local endpoints and the proxy is healthy, 503 otherwise, so cloud load balancers skip nodes
  without local endpoints;
- the proxy's own ``/healthz`` (and ``/livez``) on ``bpfKubeProxyHealthzPort`` (10256): 200 with
  ``{"lastUpdated", "currentTime", "nodeEligible"}`` while the dataplane is programmed, 503 not.

Namespaces: a socket belongs to the network namespace of the thread that created it, and a new
thread starts in its creator's namespace. ``apply`` binds synchronously in the calling thread (the
agent's dataplane worker, inside the node's namespace) and only then starts the serving threads.

Invariant: ``apply`` is idempotent and touches a listener only when its port appears or goes;
new endpoint counts and readiness are read by the handlers at request time, never by a restart.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tabby.calc.nodestate import HealthCheck

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.05  # how long closing a listener may wait for its serve loop
_GO_ZERO_TIME = "0001-01-01 00:00:00 +0000 UTC"


def go_time(ns: int | None) -> str:
    """A UTC wall-clock time as Go's ``time.Time.String()`` prints it (what kube-proxy returns)."""
    if ns is None:
        return _GO_ZERO_TIME
    seconds, frac = divmod(ns, 1_000_000_000)
    stamp = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    fraction = f".{frac:09d}".rstrip("0") if frac else ""
    return f"{stamp}{fraction} +0000 UTC"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # closing must not wait for a slow client


class _Listener:
    """One bound HTTP server and the thread serving it."""

    def __init__(self, host: str, port: int, handler: type[BaseHTTPRequestHandler], what: str):
        self.port = port
        self.server = _Server((host, port), handler)  # binds here, in the caller's namespace
        self.thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": POLL_INTERVAL_S},
            name=f"health-{port}",
            daemon=True,
        )
        self.thread.start()
        log.info("serving %s on %s:%d", what, host, port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


class HealthServers:
    """The health-check node ports and the proxy healthz of one node (kube-proxy's two servers).

    ``host`` is 0.0.0.0 in the agent (inside the node's namespace); tests pass 127.0.0.1.
    ``clock_ns`` returns wall-clock nanoseconds (``time.time_ns``), for the healthz timestamps.
    """

    def __init__(self, host: str = "0.0.0.0", clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.host = host
        self.clock_ns = clock_ns
        self._lock = threading.Lock()
        self._checks: dict[int, HealthCheck] = {}
        self._ready = False
        self._last_updated_ns: int | None = None
        self._listeners: dict[int, _Listener] = {}  # healthCheckNodePort -> listener
        self._healthz: _Listener | None = None

    @property
    def listeners(self) -> Mapping[int, object]:
        """Open health-check node ports (read-only view; the values identify a listener)."""
        return dict(self._listeners)

    @property
    def healthz_port(self) -> int:
        return self._healthz.port if self._healthz is not None else 0

    def apply(
        self, kube_proxy_port: int, checks: Mapping[int, HealthCheck], ready: bool
    ) -> list[str]:
        """Make the listeners match ``checks`` and the healthz port; returns bind errors.

        A port that failed to bind is retried on the next call, as kube-proxy does on its next
        sync; the other ports are served meanwhile.
        """
        with self._lock:
            self._checks = dict(checks)
            self._ready = ready
            if ready:
                self._last_updated_ns = self.clock_ns()
        errors: list[str] = []
        for port in sorted(set(self._listeners) - set(checks)):
            self._listeners.pop(port).close()
        for port in sorted(set(checks) - set(self._listeners)):
            try:
                self._listeners[port] = _Listener(
                    self.host, port, self._service_handler(port), f"health check {checks[port]}"
                )
            except OSError as e:
                errors.append(
                    f"healthCheckNodePort {port} ({checks[port].service}): {e.strerror or e}"
                )
        if self._healthz is not None and self._healthz.port != kube_proxy_port:
            self._healthz.close()
            self._healthz = None
        if self._healthz is None and kube_proxy_port:
            try:
                self._healthz = _Listener(
                    self.host, kube_proxy_port, self._healthz_handler(), "kube-proxy healthz"
                )
            except OSError as e:
                errors.append(f"kube-proxy healthz port {kube_proxy_port}: {e.strerror or e}")
        return errors

    def close(self) -> None:
        """Stop every listener (the ports are free when this returns)."""
        for listener in self._listeners.values():
            listener.close()
        self._listeners.clear()
        if self._healthz is not None:
            self._healthz.close()
            self._healthz = None

    # --- what the handlers read, under the lock -------------------------------------------------

    def _service_answer(self, port: int) -> tuple[int, bytes]:
        with self._lock:
            check, healthy = self._checks.get(port), self._ready
        if check is None:  # removed while this request was in flight
            return 503, b""
        namespace, _, name = check.service.rpartition("/")
        body = {
            "service": {"namespace": namespace, "name": name},
            "localEndpoints": check.local_endpoints,
            "serviceProxyHealthy": healthy,
        }
        code = 200 if check.local_endpoints and healthy else 503
        return code, json.dumps(body, indent="\t").encode()

    def _proxy_answer(self, livez: bool) -> tuple[int, bytes]:
        with self._lock:
            healthy, last_ns = self._ready, self._last_updated_ns
        now_ns = self.clock_ns()
        if healthy:  # kube-proxy reports "now" while healthy (compatibility with old releases)
            last_ns = now_ns
        body: dict[str, Any] = {"lastUpdated": go_time(last_ns), "currentTime": go_time(now_ns)}
        if not livez:
            body["nodeEligible"] = True  # no node deletion or ToBeDeleted taint tracking yet
        return (200 if healthy else 503), json.dumps(body).encode()

    def _service_handler(self, port: int) -> type[BaseHTTPRequestHandler]:
        return _handler(lambda path: self._service_answer(port))

    def _healthz_handler(self) -> type[BaseHTTPRequestHandler]:
        def answer(path: str) -> tuple[int, bytes] | None:
            route = path.split("?", 1)[0]
            if route == "/healthz":
                return self._proxy_answer(livez=False)
            if route == "/livez":
                return self._proxy_answer(livez=True)
            return None

        return _handler(answer)


def _handler(
    answer: Callable[[str], tuple[int, bytes] | None],
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, with_body: bool) -> None:
            result = answer(self.path)
            if result is None:
                code, body, ctype = 404, b"404 page not found\n", "text/plain; charset=utf-8"
            else:
                (code, body), ctype = result, "application/json"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._reply(with_body=True)

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
            self._reply(with_body=False)

    return Handler

"""What the service lab tests share: Service manifests, waiting for endpoints, HTTP with status
codes, bounded "does not answer" probes and the nodes' BPF counters. Every socket is opened in a
lab namespace (traffic.in_netns) and every loop is bounded."""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from typing import Any

from tabby.bpf.maps.counters import COUNTERS_SPEC, Counters, Reason
from tabby.lab import traffic
from tabby.lab.cluster import Lab, pin_root

Obj = dict[str, Any]

HTTP = {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
DNS = {"name": "dns", "port": 53, "targetPort": "udp", "protocol": "UDP"}


def service(
    name: str, selector: dict[str, str] | None, ports: list[Obj] | None = None, **spec: Any
) -> Obj:
    """A Service in ``default``; ``status`` in ``spec`` goes to the object's status."""
    status = spec.pop("status", None)
    obj: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"ports": [dict(p) for p in (ports or [HTTP])], **spec},
    }
    if selector is not None:
        obj["spec"]["selector"] = selector
    if status is not None:
        obj["status"] = status
    return obj


def ready_endpoints(lab: Lab, service_name: str) -> list[Obj]:
    slices, _ = lab.datastore().list("EndpointSlice", "default")
    return [
        e
        for s in slices
        if (s["metadata"].get("labels") or {}).get("kubernetes.io/service-name") == service_name
        for e in s.get("endpoints") or []
        if (e.get("conditions") or {}).get("ready", True)
    ]


def wait_for_endpoints(lab: Lab, service_name: str, count: int, timeout_s: float = 20) -> None:
    """Until the controller's slices list ``count`` ready endpoints and every agent has them."""
    deadline = time.monotonic() + timeout_s
    while len(ready_endpoints(lab, service_name)) != count:
        if time.monotonic() > deadline:
            got = len(ready_endpoints(lab, service_name))
            raise AssertionError(f"{service_name}: {got} ready endpoints, never {count}")
        time.sleep(0.05)
    lab.wait_ready()


def http(
    netns: str, ip: str, port: int, path: str = "/", timeout_s: float = 3.0
) -> tuple[int, str]:
    """(status code, body) of GET http://ip:port/path from inside ``netns``; any status."""

    def go() -> tuple[int, str]:
        with socket.create_connection((ip, port), timeout=timeout_s) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = head.split(b"\r\n")[0].split()
        if len(status) < 2 or not status[0].startswith(b"HTTP/1."):
            raise OSError(f"bad HTTP reply from {ip}:{port}: {head[:60]!r}")
        return int(status[1]), body.decode()

    return traffic.in_netns(netns, go)


def http_json(netns: str, ip: str, port: int, path: str = "/") -> tuple[int, Obj]:
    code, body = http(netns, ip, port, path)
    return code, json.loads(body)


def hostnames(netns: str, ip: str, port: int, count: int, timeout_s: float = 3.0) -> Counter[str]:
    """``count`` sequential connections to netexec's /hostname (one namespace entry for all)."""

    def go() -> Counter[str]:
        seen: Counter[str] = Counter()
        for _ in range(count):
            with socket.create_connection((ip, port), timeout=timeout_s) as s:
                s.sendall(b"GET /hostname HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            seen[data.partition(b"\r\n\r\n")[2].decode()] += 1
        return seen

    return traffic.in_netns(netns, go)


def tcp_outcome(netns: str, ip: str, port: int, timeout_s: float = 1.0) -> str:
    """ "connected", "refused" or "timeout" (a drop) for one TCP connect from ``netns``."""

    def go() -> str:
        try:
            socket.create_connection((ip, port), timeout=timeout_s).close()
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "timeout"
        return "connected"

    return traffic.in_netns(netns, go)


def counters(lab: Lab, node: str) -> dict[str, int]:
    m = COUNTERS_SPEC.open_pinned(pin_root(lab.name, node))
    try:
        return Counters(m).read()
    finally:
        m.close()


def counter_delta(before: dict[str, int], after: dict[str, int], reason: Reason) -> int:
    return after[reason.label] - before[reason.label]

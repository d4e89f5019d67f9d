"""Shared pieces of the service benches: synthetic Services/EndpointSlices, timing, the lab.

Imported by the bench scripts (run as ``.venv/bin/python bench/<script>.py``, so this directory is
on ``sys.path``). Nothing here touches the root network namespace.
"""

from __future__ import annotations

import ipaddress
import json
import os
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Any

Obj = dict[str, Any]

NAMESPACE = "bench"
# Synthetic services sit high in the service CIDR (100.64.0.0/13): clear of the allocator's
# lower band and of the addresses tests use (100.64.0.x).
VIP_BASE = int(ipaddress.IPv4Address("100.66.0.0"))
# Synthetic endpoints: addresses in the pod pool (100.96.0.0/11) that IPAM hands out last.
BACKEND_BASE = int(ipaddress.IPv4Address("100.120.0.0"))
SERVICE_PORT = 80
TARGET_PORT = 8080
ENDPOINTS_PER_SERVICE = 3


def vip(i: int) -> str:
    return str(ipaddress.IPv4Address(VIP_BASE + i))


def backend_ip(i: int, j: int) -> str:
    return str(ipaddress.IPv4Address(BACKEND_BASE + i * 4 + j))


def service(i: int, namespace: str = NAMESPACE, name: str | None = None) -> Obj:
    """A selector-less ClusterIP Service (the lab's slice controller leaves its slices alone)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name or f"svc-{i}", "namespace": namespace},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": vip(i),
            "clusterIPs": [vip(i)],
            "ports": [
                {"name": "http", "port": SERVICE_PORT, "targetPort": TARGET_PORT, "protocol": "TCP"}
            ],
        },
    }


def endpoint_slice(
    i: int,
    addresses: Sequence[str] | None = None,
    port: int = TARGET_PORT,
    namespace: str = NAMESPACE,
    service_name: str | None = None,
    node: str = "node2",
) -> Obj:
    addrs = (
        list(addresses)
        if addresses is not None
        else [backend_ip(i, j) for j in range(ENDPOINTS_PER_SERVICE)]
    )
    svc = service_name or f"svc-{i}"
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{svc}-bench",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [a],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": node,
            }
            for a in addrs
        ],
    }


def key(obj: Obj) -> tuple[str, str]:
    meta = obj["metadata"]
    return meta.get("namespace", ""), meta["name"]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max, p10/p90 of a sample (seconds or whatever unit it is in)."""
    ordered = sorted(values)
    n = len(ordered)
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "p10": ordered[max(0, int(n * 0.1) - 1)] if n >= 10 else ordered[0],
        "p90": ordered[min(n - 1, int(n * 0.9))] if n >= 10 else ordered[-1],
        "p99": ordered[min(n - 1, int(n * 0.99))] if n >= 100 else ordered[-1],
        "max": ordered[-1],
        "n": float(n),
    }


def chunks(items: Sequence[Obj], size: int) -> Iterator[Sequence[Obj]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def store(ds: Any, objs: Sequence[Obj], chunk: int = 2000) -> tuple[float, int]:
    """Apply objects in transactions of ``chunk``; (seconds, last revision)."""
    started = time.monotonic()
    revision = 0
    for part in chunks(objs, chunk):
        revision = ds.apply(list(part))
    return time.monotonic() - started, revision


# --------------------------------------------------------------------------- lab agents


def in_netns(netns: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on a fresh thread inside ``netns`` (setns never leaks into the caller)."""
    from tabby.netlink.netns import enter_netns

    out: dict[str, Any] = {}

    def run() -> None:
        try:
            with enter_netns(netns):
                out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


def agent_get(netns: str, path: str, port: int = 9099, timeout_s: float = 2.0) -> bytes:
    def fetch() -> bytes:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as r:
                return bytes(r.read())
        except urllib.error.HTTPError as e:
            return bytes(e.read())

    return bytes(in_netns(netns, fetch))


def agent_metrics(netns: str) -> dict[str, float]:
    """The agent's /metrics as {name{labels}: value} (comments dropped)."""
    out: dict[str, float] = {}
    for line in agent_get(netns, "/metrics").decode().splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def agent_readyz(netns: str) -> dict[str, Any]:
    try:
        return dict(json.loads(agent_get(netns, "/readyz")))
    except (OSError, ValueError) as e:
        return {"ready": False, "error": str(e)}


def wait_programmed(netns: str, revision: int, timeout_s: float) -> None:
    """Poll the agent's /readyz (from one thread inside its netns) until it has programmed
    ``revision``; ~1 ms between polls."""

    def poll() -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen("http://127.0.0.1:9099/readyz", timeout=2) as r:
                    body = json.load(r)
            except urllib.error.HTTPError as e:
                body = json.load(e)
            except OSError:
                body = {}
            if int(body.get("revision", 0)) >= revision:
                return True
            time.sleep(0.001)
        return False

    if not in_netns(netns, poll):
        raise RuntimeError(f"the agent in {netns} never programmed revision {revision}")


def write_json(path: str, section: str, data: Any) -> None:
    """Merge ``data`` under ``section`` into the JSON results file (other sections kept)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path) as f:
            current = json.load(f)
    except (FileNotFoundError, ValueError):
        current = {}
    current[section] = data
    with open(path, "w") as f:
        json.dump(current, f, indent=1, sort_keys=True)
        f.write("\n")

"""What every datastore does to objects as the API server would: server-managed metadata,
and the pod-IP-in-a-pool check done with each write."""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

from tabby.datastore.api import Obj
from tabby.model import ValidationError
from tabby.model.validate import ref

SERVER_MANAGED = ("resourceVersion", "uid", "creationTimestamp")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def same(new: Obj, old: Obj, managed: tuple[str, ...] = SERVER_MANAGED) -> bool:
    """Equal apart from server-managed metadata (an apply of it writes nothing)."""
    strip = [
        {**o, "metadata": {k: v for k, v in o["metadata"].items() if k not in managed}}
        for o in (new, old)
    ]
    return strip[0] == strip[1]


def stamp_metadata(obj: Obj, old: Obj | None) -> None:
    """uid and creationTimestamp: kept from the stored object, made for a new one."""
    meta = obj["metadata"]
    meta["uid"] = old["metadata"]["uid"] if old else str(uuid.uuid4())
    meta["creationTimestamp"] = old["metadata"]["creationTimestamp"] if old else now()


def pods_with_ips(objs: Iterable[Obj]) -> list[Obj]:
    """The Pods among ``objs`` whose IPs an IPPool must hold (host-network pods carry their
    node's IP)."""
    return [
        o
        for o in objs
        if o["kind"] == "Pod"
        and o.get("status", {}).get("podIPs")
        and not o.get("spec", {}).get("hostNetwork")
    ]


def check_pod_ips(pods: Iterable[Obj], pools: Iterable[Obj]) -> None:
    """Every pod IP lies in some IPPool, when any IPPool exists; else a ValidationError."""
    nets = [ipaddress.ip_network(p["spec"]["cidr"]) for p in pools]
    if not nets:
        return
    for pod in pods:
        for i, entry in enumerate(pod["status"]["podIPs"]):
            addr = ipaddress.ip_address(entry["ip"])
            if not any(addr in net for net in nets):
                field = "status.podIP" if i == 0 else f"status.podIPs[{i}].ip"
                cidrs = ", ".join(str(n) for n in nets)
                raise ValidationError(
                    f"{ref(pod)}: {field}: {addr} is outside every IPPool ({cidrs})", field
                )

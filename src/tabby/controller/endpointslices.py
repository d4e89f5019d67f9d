"""Kube-controller-manager's EndpointSlice controller, for the lab: Services + Pods -> slices.

``desired_slices`` is pure; ``sync`` makes the datastore match it, touching only slices labelled
``endpointslice.kubernetes.io/managed-by: tabby-controller``; ``run`` syncs, then re-syncs on
every change to a Service, a Pod or one of our slices.

Rules (Kubernetes'): a Service without a selector is left alone. Endpoints are the pods in the
Service's namespace whose labels match and that have an IP (Succeeded/Failed pods excluded).
A named targetPort is resolved per pod against its containers' ports; a pod lacking the name is
left out of that port, so pods are grouped by the port set they resolve (one group per slice
family). ``serving`` is the pod's readiness, ``terminating`` is a set deletionTimestamp, and
``ready`` is serving and not terminating (always true with publishNotReadyAddresses).
Slice names are deterministic (``<svc>-tabby``, ``<svc>-tabby-1`` ...) so a re-sync with nothing
new writes nothing.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Iterable

from tabby.datastore.api import Compacted, Datastore, DatastoreError, Event, Obj
from tabby.model.core import SERVICE_NAME_LABEL
from tabby.model.selectors import from_map, match_labels

log = logging.getLogger(__name__)

MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "tabby-controller"
MAX_ENDPOINTS_PER_SLICE = 100
BACKOFF_S = (0.5, 10.0)  # first and longest wait after a datastore error

PortKey = tuple[tuple[str, int, str], ...]  # (name, port, protocol) per resolved service port


def pod_ready(pod: Obj) -> bool:
    """The Ready condition; without conditions at all, phase Running counts as ready."""
    status = pod.get("status", {})
    conditions = status.get("conditions")
    if not conditions:
        return bool(status.get("phase") == "Running")
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def resolve_port(target: int | str, protocol: str, pod: Obj) -> int | None:
    """A service port's targetPort on ``pod``: a number as is, a name via the containers' ports."""
    if isinstance(target, int):
        return target
    for container in pod.get("spec", {}).get("containers", []):
        for p in container.get("ports", []):
            if p.get("name") == target and p.get("protocol", "TCP") == protocol:
                return int(p["containerPort"])
    return None


def _selected_pods(service: Obj, pods: Iterable[Obj]) -> list[Obj]:
    namespace = service["metadata"]["namespace"]
    selector = from_map(service["spec"]["selector"])
    return [
        p
        for p in pods
        if p["metadata"]["namespace"] == namespace
        and p.get("status", {}).get("podIPs")
        and p.get("status", {}).get("phase") not in ("Succeeded", "Failed")
        and match_labels(selector, p["metadata"].get("labels"))
    ]


def _endpoint(pod: Obj, address: str, publish_not_ready: bool) -> Obj:
    serving = publish_not_ready or pod_ready(pod)
    terminating = "deletionTimestamp" in pod["metadata"]
    endpoint: Obj = {
        "addresses": [address],
        "conditions": {
            "ready": publish_not_ready or (serving and not terminating),
            "serving": serving,
            "terminating": terminating,
        },
        "targetRef": {
            "kind": "Pod",
            "namespace": pod["metadata"]["namespace"],
            "name": pod["metadata"]["name"],
        },
    }
    if "uid" in pod["metadata"]:
        endpoint["targetRef"]["uid"] = pod["metadata"]["uid"]
    if pod["spec"].get("nodeName"):
        endpoint["nodeName"] = pod["spec"]["nodeName"]
    return endpoint


def _slices_for(service: Obj, pods: Iterable[Obj]) -> list[Obj]:
    spec = service["spec"]
    publish_not_ready = spec.get("publishNotReadyAddresses", False)
    groups: dict[tuple[str, PortKey], list[Obj]] = {}
    for pod in _selected_pods(service, pods):
        resolved = []
        for sp in spec.get("ports", []):
            number = resolve_port(sp["targetPort"], sp["protocol"], pod)
            if number is not None:
                resolved.append((sp.get("name", ""), number, sp["protocol"]))
        if spec.get("ports") and not resolved:
            continue  # the pod serves none of the Service's ports
        for entry in pod["status"]["podIPs"]:
            family = f"IPv{ipaddress.ip_address(entry['ip']).version}"
            endpoint = _endpoint(pod, entry["ip"], publish_not_ready)
            groups.setdefault((family, tuple(resolved)), []).append(endpoint)

    name = service["metadata"]["name"]
    slices: list[Obj] = []
    for (family, ports), endpoints in sorted(groups.items()):
        endpoints.sort(key=lambda e: ipaddress.ip_address(e["addresses"][0]))
        for start in range(0, len(endpoints), MAX_ENDPOINTS_PER_SLICE):
            suffix = f"-{len(slices)}" if slices else ""
            slices.append(_slice(service, f"{name}-tabby{suffix}", family, ports, endpoints, start))
    return slices


def _slice(
    service: Obj, name: str, family: str, ports: PortKey, endpoints: list[Obj], start: int
) -> Obj:
    meta = service["metadata"]
    owner: Obj = {"apiVersion": "v1", "kind": "Service", "name": meta["name"], "controller": True}
    if "uid" in meta:
        owner["uid"] = meta["uid"]
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": {SERVICE_NAME_LABEL: meta["name"], MANAGED_BY_LABEL: MANAGED_BY},
            "ownerReferences": [owner],
        },
        "addressType": family,
        "endpoints": endpoints[start : start + MAX_ENDPOINTS_PER_SLICE],
        "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
    }


def desired_slices(services: Iterable[Obj], pods: Iterable[Obj]) -> list[Obj]:
    """The EndpointSlices every selector-bearing Service should have (validated objects in)."""
    pods = list(pods)
    out: list[Obj] = []
    for service in services:
        spec = service.get("spec", {})
        if spec.get("selector") and spec.get("type") != "ExternalName":
            out.extend(_slices_for(service, pods))
    return out


def _ours(obj: Obj) -> bool:
    return bool(obj["metadata"].get("labels", {}).get(MANAGED_BY_LABEL) == MANAGED_BY)


def sync(ds: Datastore) -> int:
    """Make the stored slices match; returns a revision every change up to which is reflected."""
    services, rev_services = ds.list("Service")
    pods, rev_pods = ds.list("Pod")
    slices, rev_slices = ds.list("EndpointSlice")
    desired = desired_slices(services, pods)
    if desired:
        ds.apply(desired)
    wanted = {(s["metadata"]["namespace"], s["metadata"]["name"]) for s in desired}
    for s in slices:
        key = (s["metadata"]["namespace"], s["metadata"]["name"])
        if _ours(s) and key not in wanted:
            ds.delete("EndpointSlice", key[1], key[0])
    return min(rev_services, rev_pods, rev_slices)


def _relevant(ev: Event) -> bool:
    return ev.kind in ("Service", "Pod") or (ev.kind == "EndpointSlice" and _ours(ev.obj))


def run(ds: Datastore, stop: threading.Event) -> None:
    """Sync, then re-sync on every relevant change until ``stop``; relists after compaction,
    and after the datastore comes back from an outage (retried with backoff meanwhile)."""
    wait_s = BACKOFF_S[0]
    while not stop.is_set():
        try:
            synced = sync(ds)
            wait_s = BACKOFF_S[0]
            for ev in ds.watch(synced, stop):
                # A sync reflects every change up to the revision it listed at: skip those.
                if ev.revision > synced and _relevant(ev):
                    synced = max(sync(ds), ev.revision)
        except Compacted:
            log.info("endpointslice controller: watch compacted, relisting")
        except DatastoreError as e:
            log.warning("endpointslice controller: %s (retrying in %.1f s)", e, wait_s)
            stop.wait(wait_s)
            wait_s = min(wait_s * 2, BACKOFF_S[1])

"""Kubernetes core kinds: Namespace, Pod, Node, Service, discovery.k8s.io/v1 EndpointSlice and
apps/v1 Deployment."""

from __future__ import annotations

import ipaddress
from typing import Any

from tabby.model.errors import FieldError
from tabby.model.meta import free, label_selector, metadata
from tabby.model.schema import (
    MISSING,
    Check,
    Struct,
    at,
    boolean,
    cidr,
    enum,
    int_or_name,
    integer,
    ip,
    item,
    list_of,
    map_of,
    port,
    protocol,
    string,
)
from tabby.model.selectors import match_labels


def resource(**fields: Check) -> Struct:
    """The top level of an object: apiVersion, kind, metadata and the kind's own fields."""
    return Struct(
        {"apiVersion": string, "kind": string, "metadata": metadata, **fields},
        required=("metadata",),
    )


# --- Namespace ---------------------------------------------------------------------------------

namespace = resource(spec=Struct({"finalizers": list_of(string)}), status=free)

# --- Pod ---------------------------------------------------------------------------------------

_container_port = Struct(
    {
        "name": string,
        "containerPort": port,
        "protocol": protocol,
        "hostPort": port,
        "hostIP": ip,
    },
    required=("containerPort",),
    defaults={"protocol": "TCP"},
)

_container = Struct(
    {
        "name": string,
        "image": string,
        "command": list_of(string),
        "args": list_of(string),
        "ports": list_of(_container_port),
        "env": list_of(free),
        "envFrom": list_of(free),
        "readinessProbe": free,
        "livenessProbe": free,
        "startupProbe": free,
        "imagePullPolicy": enum("Always", "IfNotPresent", "Never"),
        "resources": free,
        "volumeMounts": list_of(free),
        "workingDir": string,
        "securityContext": free,
        # the rest of a Container as the API server serves it (kubectl get -o yaml): accepted,
        # not read by tabby
        "terminationMessagePath": string,
        "terminationMessagePolicy": enum("File", "FallbackToLogsOnError"),
        "lifecycle": free,
        "stdin": boolean,
        "stdinOnce": boolean,
        "tty": boolean,
        "resizePolicy": list_of(free),
        "restartPolicy": enum("Always"),  # a sidecar init container
        "volumeDevices": list_of(free),
    },
    required=("name",),
)

_pod_spec = Struct(
    {
        "nodeName": string,
        "containers": list_of(_container),
        "initContainers": list_of(_container),
        "hostNetwork": boolean,
        "restartPolicy": enum("Always", "OnFailure", "Never"),
        "terminationGracePeriodSeconds": integer(0),
        "volumes": list_of(free),
        "serviceAccountName": string,
        "nodeSelector": map_of(string),
        "tolerations": list_of(free),
        "affinity": free,
        "dnsPolicy": string,
        "securityContext": free,
        "hostname": string,
        "subdomain": string,
        # the rest of a PodSpec as the API server serves it (defaults included): accepted, not
        # read by tabby
        "schedulerName": string,
        "priority": integer(),
        "priorityClassName": string,
        "preemptionPolicy": enum("PreemptLowerPriority", "Never"),
        "enableServiceLinks": boolean,
        "serviceAccount": string,
        "automountServiceAccountToken": boolean,
        "imagePullSecrets": list_of(free),
        "overhead": free,
        "runtimeClassName": string,
        "topologySpreadConstraints": list_of(free),
        "hostPID": boolean,
        "hostIPC": boolean,
        "hostUsers": boolean,
        "shareProcessNamespace": boolean,
        "dnsConfig": free,
        "hostAliases": list_of(free),
        "readinessGates": list_of(free),
        "setHostnameAsFQDN": boolean,
        "os": free,
        "ephemeralContainers": list_of(free),
        "schedulingGates": list_of(free),
        "resourceClaims": list_of(free),
        "resources": free,
        "activeDeadlineSeconds": integer(1),
    },
    required=("containers",),
)


def _pod_ips(status: dict[str, Any], path: str) -> dict[str, Any]:
    """Keep podIP and podIPs consistent, as the API server does: podIPs[0] is podIP."""
    ips = status.get("podIPs")
    if "podIP" in status and not ips:
        status["podIPs"] = [{"ip": status["podIP"]}]
    elif ips and "podIP" not in status:
        status["podIP"] = ips[0]["ip"]
    elif ips and ips[0]["ip"] != status["podIP"]:
        raise FieldError(at(path, "podIPs[0].ip"), "must equal status.podIP")
    return status


_pod_status = Struct(
    {
        "podIP": ip,
        "podIPs": list_of(Struct({"ip": ip}, required=("ip",))),
        "hostIP": ip,
        "phase": enum("Pending", "Running", "Succeeded", "Failed", "Unknown"),
        "conditions": list_of(
            Struct(
                {"type": string, "status": enum("True", "False", "Unknown")},
                required=("type", "status"),
                open=True,
            )
        ),
    },
    open=True,
    post=_pod_ips,
)

pod = resource(spec=_pod_spec, status=_pod_status)

# --- Deployment (apps/v1) ----------------------------------------------------------------------

_pod_template = Struct(
    {
        "metadata": Struct(
            {"labels": map_of(string), "annotations": map_of(string), "name": string}
        ),
        "spec": _pod_spec,
    },
    required=("metadata", "spec"),
)


def _int_or_percent(value: Any, path: str) -> int | str:
    """maxSurge / maxUnavailable: an integer >= 0 or a percentage such as "25%"."""
    if isinstance(value, str) and value.endswith("%") and value[:-1].isdigit():
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise FieldError(path, 'must be an integer >= 0 or a percentage such as "25%"')


def _strategy_rules(strategy: dict[str, Any], path: str) -> dict[str, Any]:
    if strategy["type"] == "Recreate" and "rollingUpdate" in strategy:
        raise FieldError(at(path, "rollingUpdate"), "may not be set when type is Recreate")
    return strategy


_strategy = Struct(
    {
        "type": enum("RollingUpdate", "Recreate"),
        "rollingUpdate": Struct({"maxSurge": _int_or_percent, "maxUnavailable": _int_or_percent}),
    },
    defaults={
        "type": "RollingUpdate",
        "rollingUpdate": lambda s: (
            {"maxSurge": "25%", "maxUnavailable": "25%"} if s.get("type") != "Recreate" else MISSING
        ),
    },
    post=_strategy_rules,
)


def _deployment_rules(spec: dict[str, Any], path: str) -> dict[str, Any]:
    """As the API server: a non-empty selector that selects the template's own labels."""
    selector = spec["selector"]
    if not selector.get("matchLabels") and not selector.get("matchExpressions"):
        raise FieldError(at(path, "selector"), "empty selector is invalid for deployment")
    labels = spec["template"]["metadata"].get("labels", {})
    if not match_labels(selector, labels):
        raise FieldError(
            at(path, "selector"),
            f"`selector` does not match template `labels` ({labels or 'none'})",
        )
    return spec


_deployment_spec = Struct(
    {
        "replicas": integer(0),
        "selector": label_selector,
        "template": _pod_template,
        "strategy": _strategy,
        "minReadySeconds": integer(0),
        "revisionHistoryLimit": integer(0),
        "progressDeadlineSeconds": integer(1),
        "paused": boolean,
    },
    required=("selector", "template"),
    defaults={"replicas": 1, "strategy": {}},
    post=_deployment_rules,
)

deployment = resource(
    spec=_deployment_spec,
    status=Struct(
        {
            "replicas": integer(0),
            "readyReplicas": integer(0),
            "availableReplicas": integer(0),
            "updatedReplicas": integer(0),
            "unavailableReplicas": integer(0),
            "observedGeneration": integer(0),
            "conditions": list_of(
                Struct(
                    {"type": string, "status": enum("True", "False", "Unknown")},
                    required=("type", "status"),
                    open=True,
                )
            ),
        },
        open=True,
    ),
).extend({}, required=("metadata", "spec"))

# --- Node --------------------------------------------------------------------------------------


def _node_address(addr: dict[str, Any], path: str) -> dict[str, Any]:
    if addr["type"] in ("InternalIP", "ExternalIP"):
        addr["address"] = ip(addr["address"], at(path, "address"))
    return addr


_node_status = Struct(
    {
        "addresses": list_of(
            Struct(
                {
                    "type": enum(
                        "InternalIP", "ExternalIP", "Hostname", "InternalDNS", "ExternalDNS"
                    ),
                    "address": string,
                },
                required=("type", "address"),
                post=_node_address,
            )
        )
    },
    open=True,
)

node = resource(
    spec=Struct(
        {
            "podCIDR": cidr,
            "podCIDRs": list_of(cidr),
            "providerID": string,
            "unschedulable": boolean,
            "taints": list_of(free),
        }
    ),
    status=_node_status,
)

# --- Service -----------------------------------------------------------------------------------


def _cluster_ip(value: Any, path: str) -> str:
    """An IP, "None" (headless) or "" (allocate one)."""
    if value in ("None", ""):
        return str(value)
    return ip(value, path)


_service_port = Struct(
    {
        "name": string,
        "protocol": protocol,
        "port": port,
        "targetPort": int_or_name,
        "nodePort": integer(30000, 32767),
        "appProtocol": string,
    },
    required=("port",),
    defaults={"protocol": "TCP", "targetPort": lambda p: p["port"]},
)


def _service_rules(spec: dict[str, Any], path: str) -> dict[str, Any]:
    kind = spec["type"]
    ports = spec.get("ports", [])
    if kind == "ExternalName":
        if not spec.get("externalName"):
            raise FieldError(at(path, "externalName"), "required for type ExternalName")
    elif not ports and spec.get("clusterIP") != "None":
        raise FieldError(at(path, "ports"), "required (at least one port)")
    names: set[str] = set()
    seen: dict[tuple[int, str], int] = {}
    for i, p in enumerate(ports):
        here = item(at(path, "ports"), i)
        if len(ports) > 1 and not p.get("name"):
            raise FieldError(at(here, "name"), "required when a Service has several ports")
        if p.get("name") in names:
            raise FieldError(at(here, "name"), f"duplicate port name {p['name']!r}")
        names.add(p.get("name", ""))
        first = seen.setdefault((p["port"], p["protocol"]), i)
        if first != i:
            where = item(at(path, "ports"), first)
            raise FieldError(here, f"duplicate port {p['port']}/{p['protocol']} (as {where})")
        if "nodePort" in p and kind not in ("NodePort", "LoadBalancer"):
            raise FieldError(at(here, "nodePort"), "only allowed for type NodePort or LoadBalancer")
    if kind == "ExternalName" and (spec.get("clusterIP") or spec.get("clusterIPs")):
        raise FieldError(at(path, "clusterIP"), "may not be set for type ExternalName")
    if kind in ("NodePort", "LoadBalancer") and spec.get("clusterIP") == "None":
        raise FieldError(at(path, "clusterIP"), f"may not be None (headless) for type {kind}")
    ips = spec.get("clusterIPs")
    if spec.get("clusterIP") and not ips:
        spec["clusterIPs"] = [spec["clusterIP"]]
    elif ips and not spec.get("clusterIP"):
        spec["clusterIP"] = ips[0]
    elif ips and ips[0] != spec["clusterIP"]:
        raise FieldError(at(path, "clusterIPs[0]"), "must equal spec.clusterIP")
    if kind in ("NodePort", "LoadBalancer"):
        spec.setdefault("externalTrafficPolicy", "Cluster")
    elif "externalTrafficPolicy" in spec:
        raise FieldError(
            at(path, "externalTrafficPolicy"), "only for type NodePort or LoadBalancer"
        )
    if kind != "ExternalName":
        spec.setdefault("internalTrafficPolicy", "Cluster")
    if "healthCheckNodePort" in spec and not (
        kind == "LoadBalancer" and spec["externalTrafficPolicy"] == "Local"
    ):
        raise FieldError(
            at(path, "healthCheckNodePort"),
            "only for type LoadBalancer with externalTrafficPolicy Local",
        )
    return spec


_service_spec = Struct(
    {
        "type": enum("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"),
        "clusterIP": _cluster_ip,
        "clusterIPs": list_of(_cluster_ip),
        "ports": list_of(_service_port),
        "selector": map_of(string),
        "externalIPs": list_of(ip),
        "externalName": string,
        "sessionAffinity": enum("None", "ClientIP"),
        "sessionAffinityConfig": Struct(
            {"clientIP": Struct({"timeoutSeconds": integer(1, 86400)})}
        ),
        "externalTrafficPolicy": enum("Cluster", "Local"),
        "internalTrafficPolicy": enum("Cluster", "Local"),
        "loadBalancerSourceRanges": list_of(cidr),
        "loadBalancerIP": ip,
        "loadBalancerClass": string,
        "healthCheckNodePort": port,
        "ipFamilies": list_of(enum("IPv4", "IPv6")),
        "ipFamilyPolicy": enum("SingleStack", "PreferDualStack", "RequireDualStack"),
        "publishNotReadyAddresses": boolean,
        "allocateLoadBalancerNodePorts": boolean,
    },
    defaults={"type": "ClusterIP", "sessionAffinity": "None"},
    post=_service_rules,
)

_service_status = Struct(
    {
        "loadBalancer": Struct(
            {
                "ingress": list_of(
                    Struct(
                        {
                            "ip": ip,
                            "hostname": string,
                            "ipMode": enum("VIP", "Proxy"),
                            "ports": list_of(free),
                        }
                    )
                )
            }
        )
    },
    open=True,
)

service = resource(spec=_service_spec, status=_service_status)

# --- EndpointSlice -----------------------------------------------------------------------------

SERVICE_NAME_LABEL = "kubernetes.io/service-name"

_endpoint = Struct(
    {
        "addresses": list_of(string),
        "conditions": Struct({"ready": boolean, "serving": boolean, "terminating": boolean}),
        "nodeName": string,
        "targetRef": free,
        "zone": string,
        "hostname": string,
        "hints": free,
        "deprecatedTopology": map_of(string),
    },
    required=("addresses",),
)


def _slice_rules(obj: dict[str, Any], path: str) -> dict[str, Any]:
    if SERVICE_NAME_LABEL not in obj["metadata"].get("labels", {}):
        raise FieldError(
            f'metadata.labels["{SERVICE_NAME_LABEL}"]', "required (the Service this slice serves)"
        )
    family = {"IPv4": 4, "IPv6": 6}.get(obj["addressType"])
    for i, ep in enumerate(obj["endpoints"]):
        for j, addr in enumerate(ep["addresses"]):
            here = item(at(item("endpoints", i), "addresses"), j)
            if family is None:
                continue
            ep["addresses"][j] = addr = ip(addr, here)
            if ipaddress.ip_address(addr).version != family:
                raise FieldError(here, f"{addr} is not an {obj['addressType']} address")
    return obj


endpoint_slice = resource(
    addressType=enum("IPv4", "IPv6", "FQDN"),
    endpoints=list_of(_endpoint),
    ports=list_of(
        Struct(
            {"name": string, "port": port, "protocol": protocol, "appProtocol": string},
            defaults={"protocol": "TCP"},
        )
    ),
).extend(
    {},
    required=("metadata", "addressType"),
    defaults={"endpoints": []},
    post=_slice_rules,
)

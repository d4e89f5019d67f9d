"""Pods and Nodes as a real kube-apiserver serves them (`kubectl get -o json` of a Deployment's
pod on a kubeadm cluster): managedFields, probes, env, volumes, tolerations, containerStatuses,
a node's images and conditions. The lab's own objects carry only what tabby reads; benches
(`bench/agent_scale.py --object-shape apiserver`) and tests (tests/unit/test_calc_intake.py) use
these to see what the agent does with the rest.
"""

from __future__ import annotations

import zlib
from typing import Any

Obj = dict[str, Any]

_TIME = "2026-12-01T10:00:00Z"
_HASH = "7d9c6b8f5"


def _fields(*names: str) -> Obj:
    """managedFields' FieldsV1 for a flat list of field names."""
    return {".": {}, **{f"f:{n}": {} for n in names}}


def pod(
    namespace: str,
    name: str,
    node: str,
    ip: str,
    labels: dict[str, str],
    ports: list[Obj] | None = None,
    ip6: str = "",
) -> Obj:
    """One Running pod of a Deployment, with one container exposing ``ports``."""
    ports = ports if ports is not None else [{"name": "http", "containerPort": 80}]
    ips = [{"ip": ip}] + ([{"ip": ip6}] if ip6 else [])
    container_ports = [{"protocol": "TCP", **p} for p in ports]
    conditions = ("Initialized", "Ready", "ContainersReady", "PodScheduled")
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "generateName": f"{name.rsplit('-', 1)[0]}-",
            "uid": f"3f1c2a7e-0b1d-4c39-9f7a-{zlib.crc32(name.encode()):012d}",
            "resourceVersion": "100000",
            "creationTimestamp": _TIME,
            "labels": {**labels, "pod-template-hash": _HASH},
            "annotations": {
                "kubectl.kubernetes.io/restartedAt": _TIME,
                "prometheus.io/scrape": "true",
                "prometheus.io/port": "9113",
            },
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": f"web-{_HASH}",
                    "uid": "a1b2c3d4-0000-1111-2222-333344445555",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
            "managedFields": [
                {
                    "manager": "kube-controller-manager",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": _TIME,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {
                        "f:metadata": {
                            "f:generateName": {},
                            "f:labels": _fields(*labels, "pod-template-hash"),
                            "f:ownerReferences": _fields("uid"),
                        },
                        "f:spec": {
                            "f:containers": {
                                'k:{"name":"app"}': _fields(
                                    "image",
                                    "imagePullPolicy",
                                    "name",
                                    "ports",
                                    "resources",
                                    "terminationMessagePath",
                                    "terminationMessagePolicy",
                                )
                            },
                            **_fields(
                                "dnsPolicy",
                                "enableServiceLinks",
                                "restartPolicy",
                                "schedulerName",
                                "securityContext",
                                "terminationGracePeriodSeconds",
                            ),
                        },
                    },
                },
                {
                    "manager": "kubelet",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": _TIME,
                    "fieldsType": "FieldsV1",
                    "subresource": "status",
                    "fieldsV1": {
                        "f:status": {
                            "f:conditions": {
                                f'k:{{"type":"{c}"}}': _fields(
                                    "lastProbeTime", "lastTransitionTime", "status", "type"
                                )
                                for c in conditions
                            },
                            **_fields("containerStatuses", "hostIP", "phase", "podIP", "podIPs"),
                        }
                    },
                },
            ],
        },
        "spec": {
            "volumes": [
                {
                    "name": "kube-api-access-abcde",
                    "projected": {
                        "sources": [
                            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                            {
                                "configMap": {
                                    "name": "kube-root-ca.crt",
                                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                                }
                            },
                        ],
                        "defaultMode": 420,
                    },
                }
            ],
            "containers": [
                {
                    "name": "app",
                    "image": "nginx:1.27.3",
                    "ports": container_ports,
                    "env": [
                        {
                            "name": "POD_NAME",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                        },
                        {"name": "LOG_LEVEL", "value": "info"},
                    ],
                    "resources": {
                        "limits": {"memory": "128Mi"},
                        "requests": {"cpu": "100m", "memory": "64Mi"},
                    },
                    "volumeMounts": [
                        {
                            "name": "kube-api-access-abcde",
                            "readOnly": True,
                            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                        }
                    ],
                    "livenessProbe": {
                        "httpGet": {"path": "/healthz", "port": 80, "scheme": "HTTP"},
                        "timeoutSeconds": 1,
                        "periodSeconds": 10,
                        "failureThreshold": 3,
                    },
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                }
            ],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "nodeName": node,
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {
                    "key": f"node.kubernetes.io/{t}",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                }
                for t in ("not-ready", "unreachable")
            ],  # fmt: skip
            "priority": 0,
            "enableServiceLinks": True,
        },
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": c, "status": "True", "lastProbeTime": None, "lastTransitionTime": _TIME}
                for c in conditions
            ],
            "hostIP": "172.20.32.100",
            "podIP": ip,
            "podIPs": ips,
            "startTime": _TIME,
            "containerStatuses": [
                {
                    "name": "app",
                    "state": {"running": {"startedAt": _TIME}},
                    "lastState": {},
                    "ready": True,
                    "restartCount": 0,
                    "image": "docker.io/library/nginx:1.27.3",
                    "imageID": "docker.io/library/nginx@sha256:" + "0123456789abcdef" * 4,
                    "containerID": "containerd://" + "fedcba9876543210" * 4,
                    "started": True,
                }
            ],
            "qosClass": "Burstable",
        },
    }


def node(name: str, ip: str, labels: dict[str, str], annotations: dict[str, str]) -> Obj:
    """A Ready kubeadm node with the images a few weeks of deployments leave on it."""
    images = [
        {
            "names": [f"registry.example.com/team/app-{i}@sha256:{i:064x}",
                      f"registry.example.com/team/app-{i}:v1.{i}.0"],
            "sizeBytes": 50_000_000 + i,
        }
        for i in range(40)
    ]  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "uid": f"9e8d7c6b-{zlib.crc32(name.encode()):012d}",
            "resourceVersion": "100000",
            "creationTimestamp": _TIME,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                **labels,
            },
            "annotations": {
                "kubeadm.alpha.kubernetes.io/cri-socket": "unix:///run/containerd/containerd.sock",
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
                **annotations,
            },
        },
        "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]},
        "status": {
            "capacity": {"cpu": "8", "memory": "32827612Ki", "pods": "110"},
            "allocatable": {"cpu": "8", "memory": "32725212Ki", "pods": "110"},
            "conditions": [
                {
                    "type": t,
                    "status": s,
                    "lastHeartbeatTime": _TIME,
                    "lastTransitionTime": _TIME,
                    "reason": f"Kubelet{t}",
                    "message": f"kubelet reports {t}",
                }
                for t, s in (
                    ("MemoryPressure", "False"),
                    ("DiskPressure", "False"),
                    ("PIDPressure", "False"),
                    ("Ready", "True"),
                )
            ],  # fmt: skip
            "addresses": [
                {"type": "InternalIP", "address": ip},
                {"type": "Hostname", "address": name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": "0" * 32,
                "systemUUID": "0" * 32,
                "bootID": "0" * 32,
                "kernelVersion": "6.18.44",
                "osImage": "Debian GNU/Linux 12 (bookworm)",
                "containerRuntimeVersion": "containerd://1.7.24",
                "kubeletVersion": "v1.31.4",
                "kubeProxyVersion": "v1.31.4",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
            "images": images,
        },
    }

"""The lab's kubelet: a pod is a network namespace + a cgroup + processes, wired by tabby-cni.

add: Pod object -> netns + cgroup -> `tabby-cni ADD` (the same executable kubelet would run,
inside the node's namespace) -> status.podIP -> the pod's containers as local programs.
Images: ``netexec`` (tabby's test server), ``nginx`` (Debian's nginx), ``pause`` (nothing runs).
Unknown images are refused before anything is created.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from typing import Any

from tabby.lab import cgroups, fabric, processes, state, traffic
from tabby.lab.topology import LabPlan

IMAGES: dict[str, list[dict[str, Any]]] = {
    "netexec": [
        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
        {"name": "udp", "containerPort": 8081, "protocol": "UDP"},
    ],
    "nginx": [{"name": "http", "containerPort": 80, "protocol": "TCP"}],
    "pause": [],
    # the NetworkPolicy model's pods (upstream e2e's agnhost "serve-multi"): TCP and UDP on 80, 81
    "netpol": [
        {"name": f"serve-{port}-{proto.lower()}", "containerPort": port, "protocol": proto}
        for port in (80, 81)
        for proto in ("TCP", "UDP")
    ],
}


class PodError(Exception):
    pass


def cni_binary() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "tabby-cni")
    return here if os.path.exists(here) else shutil.which("tabby-cni") or "tabby-cni"


def cni_config(lab: str, node: str) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "tabby-cni",
        "nodename": node,
        "datastore": state.datastore_url(lab),
        "mtu": 0,
        "ipam": {"type": "tabby-ipam"},
    }


def run_cni(
    plan: LabPlan,
    node: str,
    command: str,
    container_id: str,
    namespace: str,
    pod: str,
    netns: str | None,
) -> dict[str, Any]:
    """Invoke tabby-cni as kubelet does; returns its result JSON (ADD) or raises PodError."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}",
        "CNI_PATH": os.path.dirname(cni_binary()),
    }
    if netns:
        env["CNI_NETNS"] = f"/run/netns/{netns}"
    node_ns = f"/run/netns/{plan.node(node).netns}"
    out = subprocess.run(
        ["nsenter", f"--net={node_ns}", cni_binary()],
        input=json.dumps(cni_config(plan.name, node)),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        try:
            msg = json.loads(out.stdout)["msg"]
        except (ValueError, KeyError):
            msg = (out.stdout + out.stderr).strip()
        raise PodError(f"tabby-cni {command} {namespace}/{pod}: {msg}")
    return json.loads(out.stdout) if out.stdout.strip() else {}


def lab_image(image: str) -> str | None:
    """The lab image an image reference runs as, or None: ``nginx``, ``nginx:1.25``,
    ``docker.io/library/nginx@sha256:...`` all run Debian's nginx (the tag is not honoured)."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    base = last.split(":", 1)[0]
    registry = name.rsplit("/", 1)[0] if "/" in name else ""
    official = registry in ("", "library", "docker.io/library", "index.docker.io/library")
    return base if official and base in IMAGES else None


def pod_object(
    name: str,
    namespace: str,
    node: str,
    image: str,
    labels: dict[str, str],
    owner: dict[str, Any] | None = None,
) -> dict[str, Any]:
    if image not in IMAGES:
        raise PodError(f"image {image!r} is not runnable in the lab (known: {', '.join(IMAGES)})")
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if owner is not None:  # as a ReplicaSet's pods point at it (the lab has no ReplicaSets)
        meta["ownerReferences"] = [owner]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "nodeName": node,
            "containers": [{"name": image, "image": image, "ports": IMAGES[image]}],
        },
    }


def container_argv(image: str, pod: str, netns: str, lab: str) -> list[str] | None:
    if image == "netexec":
        return [sys.executable, "-m", "tabby.lab.netexec", "--name", pod]
    if image == "netpol":
        return [
            sys.executable,
            "-m",
            "tabby.lab.netexec",
            "--name",
            pod,
            "--http-port",
            "80",
            "--udp-port",
            "80",
            "--also",
            "81",
        ]
    if image == "nginx":
        conf = os.path.join(state.lab_dir(lab), f"nginx-{netns}.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(prefix=state.lab_dir(lab), netns=netns, pod=pod))
        return ["nginx", "-c", conf, "-g", "daemon off;"]
    return None


NGINX_CONF = """worker_processes 1;
pid {prefix}/nginx-{netns}.pid;
error_log {prefix}/nginx-{netns}.error.log;
events {{ worker_connections 256; }}
http {{
  access_log {prefix}/nginx-{netns}.access.log;
  client_body_temp_path /tmp; proxy_temp_path /tmp; fastcgi_temp_path /tmp;
  uwsgi_temp_path /tmp; scgi_temp_path /tmp;
  server {{ listen 80; location / {{ return 200 "{pod} saw $remote_addr\\n"; }} }}
}}
"""


def add(
    plan: LabPlan,
    ds: Any,
    name: str,
    node: str,
    namespace: str = "default",
    image: str = "netexec",
    labels: dict[str, str] | None = None,
    owner: dict[str, Any] | None = None,
) -> str:
    """Create and start a pod; returns its IP. On failure, nothing of it is left behind.
    ``owner``: an ownerReference for metadata (the lab's deployment controller sets it)."""
    plan.node(node)
    pod = pod_object(name, namespace, node, image, labels or {"app": name}, owner)
    key = f"{namespace}/{name}"
    if key in state.read(plan.name).get("pods", {}) or ds.get("Pod", name, namespace):
        raise PodError(f"pod {key} already exists")
    ds.apply([pod])
    netns = plan.pod_netns(namespace, name)
    cid = f"{plan.name}-{uuid.uuid4().hex[:12]}"
    cg = cgroups.group(plan.name, node, f"pod-{namespace}-{name}")
    rec: dict[str, Any] = {
        "node": node,
        "netns": netns,
        "cgroup": cg,
        "container_id": cid,
        "image": image,
        "procs": [],
    }
    with state.editing(plan.name) as st:
        st["pods"][key] = rec
    try:
        fabric.add_netns(netns)
        result = run_cni(plan, node, "ADD", cid, namespace, name, netns)
        ips = [str(entry["address"]).split("/")[0] for entry in result["ips"]]
        ip = ips[0]  # IPv4 first; dual-stack pods (an IPv6 pool) have their IPv6 address next
        argv = container_argv(image, name, netns, plan.name)
        if argv:
            log = os.path.join(state.lab_dir(plan.name), f"{netns}.log")
            rec["procs"].append(processes.spawn(argv, f"pod {key}", log, netns=netns, cgroup=cg))
        rec["ip"] = ip
        if len(ips) > 1:
            rec["ip6"] = ips[1]
        with state.editing(plan.name) as st:
            st["pods"][key] = rec
        _wait_listening(netns, IMAGES.get(image, []))
        ds.patch(
            "Pod",
            name,
            namespace,
            {
                "status": {
                    "phase": "Running",
                    "podIP": ip,
                    "podIPs": [{"ip": a} for a in ips],
                    "conditions": [{"type": "Ready", "status": "True"}],
                }
            },
        )
        return ip
    except BaseException:
        remove(plan, ds, namespace, name)
        raise


def _wait_listening(netns: str, ports: list[dict[str, Any]], timeout_s: float = 10.0) -> None:
    """kubelet's readiness probe, for the lab: Ready only once every TCP port accepts."""
    deadline = time.monotonic() + timeout_s

    def probe() -> None:
        for p in ports:
            if p.get("protocol", "TCP") != "TCP":
                continue
            while True:
                try:
                    socket.create_connection(("127.0.0.1", p["containerPort"]), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise PodError(f"port {p['containerPort']} never listened") from None
                    time.sleep(0.02)

    traffic.in_netns(netns, probe)


def remove(plan: LabPlan, ds: Any, namespace: str, name: str) -> None:
    """Stop the pod's processes, CNI DEL, drop its netns and cgroup, delete the Pod object."""
    key = f"{namespace}/{name}"
    rec = state.read(plan.name).get("pods", {}).get(key)
    if rec is None:
        raise PodError(f"pod {key} is not in lab {plan.name}")
    for proc in rec.get("procs", []):
        processes.stop(proc)
    try:
        run_cni(plan, rec["node"], "DEL", rec["container_id"], namespace, name, rec["netns"])
    finally:
        fabric.del_netns(rec["netns"])
        cgroups.remove(rec["cgroup"])
        with state.editing(plan.name) as st:
            st["pods"].pop(key, None)
        if ds.get("Pod", name, namespace):
            ds.delete("Pod", name, namespace)

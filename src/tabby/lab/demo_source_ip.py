"""The seed demo (seed 001): nginx behind NodePort 30604, curled by the external client through
every node, and what nginx's own access log says the client was: tabby in Tunnel and in DSR
mode, next to a kube-proxy node (kube-proxy's iptables rules, masquerading NodePort traffic).

Nothing is claimed that nginx did not log: each row is one real request and the access log line
it produced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tabby.lab import kubeproxy_node, state, traffic
from tabby.lab.cluster import Lab
from tabby.lab.kubeproxy_rules import KubeServicePort
from tabby.lab.topology import EXTERNAL_CLIENT_IP

SEED_YAML = Path(__file__).resolve().parents[3] / "examples" / "seed-001-nginx.yaml"
NODEPORT = 30604
CLUSTER_CIDR = "100.96.0.0/11"  # the lab's pool: kube-proxy's --cluster-cidr


@dataclass(frozen=True)
class Row:
    path: str  # "tabby Tunnel", "tabby DSR", "kube-proxy (iptables)"
    node: str  # the node the client reached
    nginx_on: str  # the node hosting nginx
    logged: str  # the client address in nginx's access log
    ok: bool

    @property
    def real_ip(self) -> bool:
        return self.logged == EXTERNAL_CLIENT_IP


def seed_objects() -> list[dict[str, Any]]:
    """The seed's Deployment and Service, as the seed writes them."""
    return [d for d in yaml.safe_load_all(SEED_YAML.read_text()) if d]


def nginx_pod(lab: Lab, timeout_s: float = 60) -> dict[str, Any]:
    """The Deployment's nginx pod once it is up and the Service lists it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pods, _ = lab.datastore().list("Pod", "default")
        running = [
            p["metadata"]["name"]
            for p in pods
            if p["metadata"].get("labels", {}).get("app") == "nginx"
            and p.get("status", {}).get("phase") == "Running"
        ]
        if running and _endpoints(lab):
            lab.wait_ready()
            return lab.pod(running[0])
        time.sleep(0.2)
    raise TimeoutError("the nginx Deployment never got a running pod behind its Service")


def _endpoints(lab: Lab) -> list[str]:
    slices, _ = lab.datastore().list("EndpointSlice", "default")
    return [
        a
        for s in slices
        if s["metadata"].get("labels", {}).get("kubernetes.io/service-name") == "nginx"
        for e in s.get("endpoints", [])
        for a in e.get("addresses", [])
    ]


def _access_log(lab: Lab, pod: dict[str, Any]) -> Path:
    return Path(state.lab_dir(lab.name)) / f"nginx-{pod['netns']}.access.log"


def _request(lab: Lab, pod: dict[str, Any], ip: str) -> tuple[bool, str]:
    """curl http://ip:30604/ from the external client; the address nginx logged for it."""
    log = _access_log(lab, pod)
    before = log.read_text().count("\n") if log.exists() else 0
    ok, _ = traffic.reachable(lambda: traffic.http_get(lab.plan.external_netns, ip, NODEPORT, "/"))
    deadline = time.monotonic() + 3
    while ok and time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) > before:
            return True, lines[-1].split(" ", 1)[0]
        time.sleep(0.05)
    return False, "(no request reached nginx)"


def _set_mode(lab: Lab, mode: str) -> None:
    lab.datastore().patch(
        "FelixConfiguration", "default", None, {"spec": {"bpfExternalServiceMode": mode}}
    )
    lab.wait_ready()


def run(lab: Lab) -> list[Row]:
    """Every row of the comparison; leaves the lab in Tunnel mode with the kube-proxy node up."""
    lab.datastore().apply(seed_objects())
    pod = nginx_pod(lab)
    rows = []
    for mode in ("Tunnel", "DSR"):
        _set_mode(lab, mode)
        for node in lab.plan.nodes:
            ok, logged = _request(lab, pod, node.ip)
            rows.append(Row(f"tabby {mode}", node.name, pod["node"], logged, ok))
    _set_mode(lab, "Tunnel")
    svc = lab.datastore().get("Service", "nginx", "default")
    if svc is None:
        raise LookupError("the seed's Service default/nginx is gone")
    kp = kubeproxy_node.up(
        lab.plan,
        [
            KubeServicePort(
                "default",
                "nginx",
                svc["spec"]["clusterIP"],
                80,
                endpoints=((pod["ip"], 80),),
                node_port=NODEPORT,
            )
        ],
        lab.plan.node(pod["node"]),
        CLUSTER_CIDR,
    )
    ok, logged = _request(lab, pod, kp.ip)
    rows.append(Row("kube-proxy (iptables)", f"{kp.name} {kp.ip}", pod["node"], logged, ok))
    return rows

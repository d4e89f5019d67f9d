"""Labs built from the example kOps spec stretched over two subnets (shared by fv modules)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from tabby.lab.cluster import Lab
from tabby.model import kops

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "kops-demo-cluster.yaml"
POOL = "default-ipv4-ippool"  # the IPPool a kOps spec renders
# two pods on node1 (same node), one on each other node
FOUR_PODS = (("p1", "node1"), ("q1", "node1"), ("p2", "node2"), ("p3", "node3"))


def two_subnet_spec(encapsulation: str | None, **calico_fields: str) -> kops.KopsCluster:
    """The example with a second subnet (us-east-1b, across the fabric's router) and two
    workers spread over both; ``encapsulation`` None leaves kOps' default (ipip);
    ``calico_fields`` are set under networking.calico (``ipipMode="Never"``)."""
    docs = list(yaml.safe_load_all(EXAMPLE.read_text()))
    cluster, _master, nodes = docs
    calico = cluster["spec"]["networking"]["calico"]
    if encapsulation is None:
        calico.pop("encapsulationMode")
    else:
        calico["encapsulationMode"] = encapsulation
    calico.update(calico_fields)
    cluster["spec"]["subnets"].append(
        {"cidr": "172.20.64.0/19", "name": "us-east-1b", "type": "Public", "zone": "us-east-1b"}
    )
    nodes["spec"]["subnets"] = ["us-east-1b", "us-east-1a"]
    nodes["spec"]["minSize"] = nodes["spec"]["maxSize"] = 2
    result = kops.parse(docs)
    assert result.ok and result.cluster is not None, [str(e) for e in result.errors]
    return result.cluster


def spec_lab(
    prefix: str, spec: kops.KopsCluster, fabric_mtu: int
) -> Iterator[tuple[Lab, list[str]]]:
    """A lab from ``spec`` and what it said coming up; removed even when a test fails."""
    name = prefix + uuid.uuid4().hex[:7]
    said: list[str] = []
    try:
        yield Lab.up(name, progress=said.append, cluster=spec, fabric_mtu=fabric_mtu), said
    finally:
        Lab.down(name, progress=lambda _m: None)


def set_pool(lab: Lab, ipip: str, vxlan: str = "Never") -> None:
    """The spec lab's pool switched live to these modes (if it differs); every agent ready."""
    pool = lab.datastore().get("IPPool", POOL)
    assert pool is not None
    if (pool["spec"]["ipipMode"], pool["spec"]["vxlanMode"]) != (ipip, vxlan):
        lab.datastore().patch(
            "IPPool", POOL, None, {"spec": {"ipipMode": ipip, "vxlanMode": vxlan}}
        )
        lab.wait_ready()


def add_pods(lab: Lab, placement: Sequence[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """netexec pods (label ``app: <name>``) on their nodes, every agent ready; their records."""
    for name, node in placement:
        lab.add_pod(name, node, labels={"app": name}, wait=False)
    lab.wait_ready()
    return {name: lab.pod(name) for name, _ in placement}

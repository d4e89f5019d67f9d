"""What the agent keeps of the Pods and Nodes it watches: the fields calc reads, nothing else.

A Pod as a kube-apiserver serves it (managedFields, the containers' env, probes and resources,
volumes, tolerations, containerStatuses) is ~5 KB of JSON and ~32 KB once decoded; a Node
(status.images, conditions, nodeInfo) is larger still. The agent holds every Pod and Node of the
cluster for the whole of its life (NetworkPolicy peers, BGP peers, DSR's subnets), so at 10,000
pods the whole objects alone would be ~300 MB per node. What calc reads of them is kept here, in
the objects' own shape, so calc cannot tell the difference (tests/unit/test_calc_intake.py
compares its whole output on kept and whole objects):

- Pod (calc/nodestate.py: this node's endpoints and routes; calc/policy.py: selectors, named
  ports, addresses): metadata name, namespace, labels; spec nodeName, hostNetwork and the
  containers' ports; status phase, podIP, podIPs.
- Node (calc/nodestate.py: addresses, DSR's subnets; calc/bird.py: peers, AS numbers, route
  reflectors, selectors): metadata name, labels, annotations; status addresses.
- IPAMBlock (calc/nodestate.py: routes and the node's tunnel address; calc/bird.py: the blocks
  announced): all but its allocations that are not tunnel addresses (a /26 holds up to 64, one
  per pod; IPAM itself reads the datastore, never these).

A reader of another field must add it here (the comparison test fails otherwise). Other kinds
are small and kept whole (Services and EndpointSlices are the service index's, packed).
metadata.resourceVersion is kept too: the fan-out (fanout/server.py) serves agents these kept
objects, and its clients tell versions apart by it.
"""

from __future__ import annotations

from typing import Any

from tabby.calc.names import TUNNEL_HANDLE_PREFIX

Obj = dict[str, Any]

# kind -> section -> the fields kept of it
_KEPT: dict[str, dict[str, tuple[str, ...]]] = {
    "Pod": {
        "metadata": ("name", "namespace", "labels", "resourceVersion"),
        "spec": ("nodeName", "hostNetwork", "containers"),
        "status": ("phase", "podIP", "podIPs"),
    },
    "Node": {
        "metadata": ("name", "labels", "annotations", "resourceVersion"),
        "status": ("addresses",),
    },
}
_PORT_FIELDS = ("name", "protocol", "containerPort")


def kept(kind: str, obj: Obj) -> Obj:
    """``obj`` with only what calc reads of its kind (a new dict; ``obj`` is not changed)."""
    if kind == "IPAMBlock":
        return _block(obj)
    sections = _KEPT.get(kind)
    if sections is None:
        return obj
    out: Obj = {k: obj[k] for k in ("apiVersion", "kind") if k in obj}
    for section, fields in sections.items():
        part = obj.get(section)
        if isinstance(part, dict):
            out[section] = {f: part[f] for f in fields if f in part}
    spec = out.get("spec")
    if kind == "Pod" and spec and isinstance(spec.get("containers"), list):
        spec["containers"] = [_container_ports(c) for c in spec["containers"]]
    return out


def _container_ports(container: Any) -> Any:
    """A container as policy's named ports read it: its ports' name, protocol and number."""
    if not isinstance(container, dict):
        return container
    ports = container.get("ports")
    if not isinstance(ports, list):
        return {}
    return {
        "ports": [
            {f: p[f] for f in _PORT_FIELDS if f in p} if isinstance(p, dict) else p for p in ports
        ]
    }


def _block(obj: Obj) -> Obj:
    """An IPAM block with its tunnel addresses' allocations only."""
    spec = obj.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("allocations"), dict):
        return obj
    tunnels = {
        ip: handle
        for ip, handle in spec["allocations"].items()
        if isinstance(handle, str) and handle.startswith(TUNNEL_HANDLE_PREFIX)
    }
    return {**obj, "spec": {**spec, "allocations": tunnels}}

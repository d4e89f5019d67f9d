"""tabbyctl's resource commands, modelled on kubectl and calicoctl: apply, get, delete, patch.

Every error is one line on stderr and exit code 1, and a failed command writes nothing
(apply is one transaction; delete -f checks every object exists before deleting any).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from tabby.cli.common import DatastoreOpt, fail, one_line_errors, open_store, warn
from tabby.cli.manifests import ManifestError, load_manifests
from tabby.datastore import NotFound
from tabby.model import Kind, ValidationError, lookup
from tabby.model.patch import merge_patch

Obj = dict[str, Any]

BPF_OFF_WARNING = "disabling BPF detaches tabby's programs on every node: traffic is disrupted"

NamespaceOpt = typer.Option(None, "--namespace", "-n", help="namespace (default: default)")


def _kind(name: str) -> Kind:
    with one_line_errors():
        return lookup(name)
    raise AssertionError("unreachable")


def _manifests(source: str) -> list[Obj]:
    try:
        return load_manifests(source)
    except ManifestError as err:
        fail(str(err))


def _label(obj: Obj) -> str:
    """kubectl's ``kind/name`` for messages."""
    kind = obj.get("kind", "?")
    try:
        kind = lookup(kind).aliases[0]
    except ValidationError:
        pass
    return f"{kind}/{obj.get('metadata', {}).get('name', '?')}"


def _console() -> Console:
    # Piped output must not be cut at 80 columns.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 10_000)


# --- get: table columns ------------------------------------------------------------------------

Column = tuple[str, Callable[[Obj], str], bool]  # header, cell, wide only


def _spec(obj: Obj, key: str, default: Any = "") -> Any:
    return obj.get("spec", {}).get(key, default)


def _service_ports(svc: Obj) -> str:
    ports = [
        f"{p['port']}{':' + str(p['nodePort']) if 'nodePort' in p else ''}/{p['protocol']}"
        for p in _spec(svc, "ports", [])
    ]
    return ",".join(ports) or "<none>"


def _external_ips(svc: Obj) -> str:
    ingress = svc.get("status", {}).get("loadBalancer", {}).get("ingress", [])
    ips = _spec(svc, "externalIPs", []) + [i["ip"] for i in ingress if "ip" in i]
    return ",".join(ips) or "<none>"


def _selector(selector: Obj | None) -> str:
    return ",".join(f"{k}={v}" for k, v in (selector or {}).items()) or "<none>"


def _status(obj: Obj, key: str) -> int:
    return int(obj.get("status", {}).get(key, 0))


def _template_containers(deployment: Obj, key: str) -> str:
    containers = _spec(deployment, "template", {}).get("spec", {}).get("containers", [])
    return ",".join(str(c.get(key, "")) for c in containers)


def _node_address(node: Obj, kind: str) -> str:
    addrs = node.get("status", {}).get("addresses", [])
    return next((a["address"] for a in addrs if a["type"] == kind), "<none>")


def _slice_endpoints(s: Obj) -> str:
    addrs = [a for e in s.get("endpoints", []) for a in e["addresses"]]
    more = f" + {len(addrs) - 3} more..." if len(addrs) > 3 else ""
    return ",".join(addrs[:3]) + more or "<unset>"


COLUMNS: dict[str, list[Column]] = {
    "Pod": [
        ("STATUS", lambda o: o.get("status", {}).get("phase", "Pending"), False),
        ("IP", lambda o: o.get("status", {}).get("podIP", "<none>"), False),
        ("NODE", lambda o: _spec(o, "nodeName", "<none>"), False),
        ("LABELS", lambda o: _selector(o["metadata"].get("labels")), True),
    ],
    "Service": [
        ("TYPE", lambda o: _spec(o, "type"), False),
        ("CLUSTER-IP", lambda o: _spec(o, "clusterIP", "<none>"), False),
        ("EXTERNAL-IP", _external_ips, False),
        ("PORTS", _service_ports, False),
        ("SELECTOR", lambda o: _selector(_spec(o, "selector", None)), True),
    ],
    "Deployment": [
        ("READY", lambda o: f"{_status(o, 'readyReplicas')}/{_spec(o, 'replicas', 1)}", False),
        ("UP-TO-DATE", lambda o: str(_status(o, "updatedReplicas")), False),
        ("AVAILABLE", lambda o: str(_status(o, "availableReplicas")), False),
        ("CONTAINERS", lambda o: _template_containers(o, "name"), True),
        ("IMAGES", lambda o: _template_containers(o, "image"), True),
        ("SELECTOR", lambda o: _selector(_spec(o, "selector", {}).get("matchLabels")), True),
    ],
    "EndpointSlice": [
        ("ADDRESSTYPE", lambda o: o["addressType"], False),
        ("PORTS", lambda o: ",".join(str(p.get("port", "")) for p in o.get("ports", [])), False),
        ("ENDPOINTS", _slice_endpoints, False),
    ],
    "Node": [
        ("INTERNAL-IP", lambda o: _node_address(o, "InternalIP"), False),
        ("POD-CIDR", lambda o: _spec(o, "podCIDR", "<none>"), False),
        ("EXTERNAL-IP", lambda o: _node_address(o, "ExternalIP"), True),
    ],
    "NetworkPolicy": [
        ("POD-SELECTOR", lambda o: _selector(_spec(o, "podSelector").get("matchLabels")), False),
        ("POLICY-TYPES", lambda o: ",".join(_spec(o, "policyTypes", [])), False),
    ],
    "FelixConfiguration": [
        ("BPF", lambda o: str(_spec(o, "bpfEnabled")).lower(), False),
        ("SERVICE-MODE", lambda o: _spec(o, "bpfExternalServiceMode", "Tunnel"), False),
        ("LOG-LEVEL", lambda o: _spec(o, "bpfLogLevel", "Off"), False),
    ],
    "IPPool": [
        ("CIDR", lambda o: _spec(o, "cidr"), False),
        ("BLOCK-SIZE", lambda o: str(_spec(o, "blockSize")), False),
        ("IPIP", lambda o: _spec(o, "ipipMode"), False),
        ("VXLAN", lambda o: _spec(o, "vxlanMode"), False),
        ("NAT-OUTGOING", lambda o: str(_spec(o, "natOutgoing")).lower(), False),
        ("DISABLED", lambda o: str(_spec(o, "disabled")).lower(), True),
        ("SELECTOR", lambda o: _spec(o, "nodeSelector"), True),
    ],
    "BGPConfiguration": [
        ("MESH", lambda o: str(_spec(o, "nodeToNodeMeshEnabled", True)).lower(), False),
        ("ASN", lambda o: str(_spec(o, "asNumber", 64512)), False),
    ],
    "BGPPeer": [
        ("PEER", lambda o: _spec(o, "peerIP") or _spec(o, "peerSelector"), False),
        ("ASN", lambda o: str(_spec(o, "asNumber", "")), False),
        ("NODE", lambda o: _spec(o, "node") or _spec(o, "nodeSelector") or "(global)", False),
    ],
    "IPAMBlock": [
        ("CIDR", lambda o: _spec(o, "cidr"), False),
        ("AFFINITY", lambda o: _spec(o, "affinity", "<none>"), False),
        ("ALLOCATED", lambda o: str(len(_spec(o, "allocations", {}))), False),
    ],
}


def _table(kind: Kind, objs: list[Obj], wide: bool) -> Table:
    columns = [c for c in COLUMNS.get(kind.name, []) if wide or not c[2]]
    table = Table(box=None, show_edge=False, pad_edge=False, header_style="bold")
    if kind.namespaced:
        table.add_column("NAMESPACE", no_wrap=True)
    table.add_column("NAME", no_wrap=True)
    for header, _, _ in columns:
        table.add_column(header, no_wrap=True)
    for obj in objs:
        ns = [obj["metadata"].get("namespace", "")] if kind.namespaced else []
        table.add_row(*ns, obj["metadata"]["name"], *(cell(obj) for _, cell, _ in columns))
    return table


def _dump(data: Obj, output: str) -> str:
    if output == "json":
        return json.dumps(data, indent=2)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip("\n")


# --- commands ----------------------------------------------------------------------------------


def apply(
    filename: str = typer.Option(..., "--filename", "-f", help="manifest file, or - for stdin"),
    datastore: str = DatastoreOpt,
) -> None:
    """Create or update every object in a manifest (all or nothing)."""
    objs = _manifests(filename)
    store = open_store(datastore)
    with one_line_errors():
        _, outcomes = store.apply_with_outcomes(objs)
    for obj, outcome in zip(objs, outcomes, strict=True):
        typer.echo(f"{_label(obj)} {outcome}")


def get(
    kind: str = typer.Argument(..., help="kind: pods, services, ippools, ..."),
    name: str | None = typer.Argument(None),
    namespace: str | None = NamespaceOpt,
    all_namespaces: bool = typer.Option(False, "--all-namespaces", "-A"),
    output: str | None = typer.Option(None, "--output", "-o", help="yaml, json or wide"),
    datastore: str = DatastoreOpt,
) -> None:
    """Show objects as a table, or as YAML/JSON."""
    k = _kind(kind)
    if output not in (None, "yaml", "json", "wide"):
        fail(f"--output must be yaml, json or wide, not {output!r}")
    if namespace and all_namespaces:
        fail("--namespace and --all-namespaces cannot be used together")
    ns = None if all_namespaces or not k.namespaced else (namespace or "default")
    store = open_store(datastore)
    with one_line_errors():
        if name is not None:
            found = store.get(k.name, name, ns)
            if found is None:
                where = f" in namespace {ns}" if ns else ""
                fail(f'{k.aliases[0]} "{name}" not found{where}')
            objs = [found]
        else:
            objs = store.list(k.name, ns)[0]
    if output in ("yaml", "json"):
        data = objs[0] if name else {"apiVersion": "v1", "kind": "List", "items": objs}
        typer.echo(_dump(data, output))
    elif not objs:
        typer.echo(f"No resources found{f' in {ns} namespace' if ns else ''}.", err=True)
    else:
        _console().print(_table(k, objs, wide=output == "wide"))


def delete(
    kind: str | None = typer.Argument(None),
    name: str | None = typer.Argument(None),
    namespace: str | None = NamespaceOpt,
    filename: str | None = typer.Option(None, "--filename", "-f", help="delete what it names"),
    datastore: str = DatastoreOpt,
) -> None:
    """Delete one object, or every object a manifest names (only if all of them exist)."""
    if filename is not None:
        if kind or name:
            fail("give either KIND NAME or -f FILE, not both")
        targets: list[tuple[Kind, Any, Any]] = []
        for obj in _manifests(filename):
            meta = obj.get("metadata") or {}
            targets.append((_kind(str(obj.get("kind"))), meta.get("name"), meta.get("namespace")))
    elif kind and name:
        targets = [(_kind(kind), name, namespace)]
    else:
        fail("give KIND NAME, or -f FILE")
    store = open_store(datastore)
    with one_line_errors():
        for k, n, ns in targets:
            if not isinstance(n, str) or store.get(k.name, n, ns) is None:
                where = f" in namespace {ns or 'default'}" if k.namespaced else ""
                fail(f'{k.aliases[0]} "{n}" not found{where}')
        for k, n, ns in targets:
            store.delete(k.name, n, ns)
            typer.echo(f'{k.aliases[0]} "{n}" deleted')


def patch(
    kind: str = typer.Argument(...),
    name: str = typer.Argument(...),
    namespace: str | None = NamespaceOpt,
    patch_text: str = typer.Option(..., "--patch", "-p", help="JSON merge patch (RFC 7386)"),
    datastore: str = DatastoreOpt,
) -> None:
    """Merge-patch one object. Patching the missing FelixConfiguration "default" creates it."""
    k = _kind(kind)
    try:
        change = json.loads(patch_text)
    except json.JSONDecodeError as err:
        fail(f"--patch is not valid JSON: {err}")
    if not isinstance(change, dict):
        fail("--patch must be a JSON object")
    store = open_store(datastore)
    verb = "patched"
    with one_line_errors():
        try:
            store.patch(k.name, name, namespace, change)
        except NotFound:
            if (k.name, name) != ("FelixConfiguration", "default"):
                raise
            skeleton = {"apiVersion": k.api_version, "kind": k.name, "metadata": {"name": name}}
            store.create(merge_patch(skeleton, change))
            verb = "created"
    typer.echo(f"{k.aliases[0]}/{name} {verb}")
    if (change.get("spec") or {}).get("bpfEnabled") is False:
        warn(BPF_OFF_WARNING)


def register(app: typer.Typer) -> None:
    """Add apply, get, delete and patch to ``app``."""
    for command in (apply, get, delete, patch):
        app.command()(command)

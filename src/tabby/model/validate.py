"""validate(): check an object against its kind's schema and return a normalised copy.

Normalisation: apiVersion becomes the kind's canonical one, defaults are filled (namespace
"default" for namespaced kinds; see each schema), a namespace on a cluster-scoped object is
dropped (as the API server does), CIDRs lose their host bits. The input is never modified.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tabby.model import calico, core, policy
from tabby.model.errors import FieldError, ValidationError
from tabby.model.kinds import Kind, lookup
from tabby.model.schema import Struct

SCHEMAS: dict[str, Struct] = {
    "Namespace": core.namespace,
    "Pod": core.pod,
    "Node": core.node,
    "Service": core.service,
    "Deployment": core.deployment,
    "EndpointSlice": core.endpoint_slice,
    "NetworkPolicy": policy.network_policy,
    "FelixConfiguration": calico.felix_configuration,
    "IPPool": calico.ip_pool,
    "BGPConfiguration": calico.bgp_configuration,
    "BGPPeer": calico.bgp_peer,
    "IPAMBlock": calico.ipam_block,
    "IPAMHandle": calico.ipam_handle,
}


def ref(obj: Mapping[str, Any]) -> str:
    """How messages name an object: ``Service default/web``, ``IPPool pool1``."""
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    name = meta.get("name", "<no name>")
    kind = obj.get("kind", "<no kind>")
    ns = meta.get("namespace")
    return f"{kind} {ns}/{name}" if ns else f"{kind} {name}"


def kind_of(obj: Mapping[str, Any]) -> Kind:
    if "kind" not in obj:
        raise ValidationError(f"{ref(obj)}: kind: required", "kind")
    try:
        return lookup(obj["kind"])
    except ValidationError as err:
        raise type(err)(f"{ref(obj)}: kind: {err}", "kind") from None


def validate(obj: Any) -> dict[str, Any]:
    """A normalised, validated copy of ``obj``; raises ValidationError naming the field."""
    if not isinstance(obj, Mapping):
        raise ValidationError(f"an object must be a mapping, got {type(obj).__name__}")
    kind = kind_of(obj)
    meta = obj.get("metadata")
    if kind.namespaced and isinstance(meta, Mapping) and not meta.get("namespace"):
        obj = {**obj, "metadata": {**meta, "namespace": "default"}}
    where = ref({**obj, "kind": kind.name})
    version = obj.get("apiVersion")
    if version not in kind.api_versions:
        raise ValidationError(
            f"{where}: apiVersion: {kind.name} needs {' or '.join(kind.api_versions)}, "
            f"got {version!r}",
            "apiVersion",
        )
    try:
        out = SCHEMAS[kind.name](obj, "")
    except FieldError as err:
        raise ValidationError(f"{where}: {err.path}: {err.message}", err.path) from None
    out["apiVersion"] = kind.api_version
    out["kind"] = kind.name
    if not kind.namespaced:
        out["metadata"].pop("namespace", None)
    return {"apiVersion": out.pop("apiVersion"), "kind": out.pop("kind"), **out}

"""Resources kept packed in memory: what the agent holds of 20,000 Services and their slices.

A decoded Kubernetes object is a tree of dicts, lists and freshly decoded strings (json repeats
every key per object): about 7.6 KB per Service + EndpointSlice as the datastore returns them.
The agent needs a Service and its slices again only when one of them changes, so the index keeps
each one as ``marshal`` bytes (about 0.7 KB per Service + slice) and unpacks the few it
recomputes. Schema-free on purpose: every field calc may read survives; only metadata calc never
reads (uid, resourceVersion, timestamps, managed fields, kubectl's last-applied copy) and the
apiVersion/kind (the index knows them) are dropped.
"""

from __future__ import annotations

import marshal
from typing import Any

Obj = dict[str, Any]

_DROP_TOP = frozenset(("apiVersion", "kind", "metadata"))
_DROP_META = frozenset(
    ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields", "selfLink")
)
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def pack(obj: Obj) -> bytes:
    """``obj`` without what calc never reads, as marshal bytes (JSON types only)."""
    slim = {k: v for k, v in obj.items() if k not in _DROP_TOP}
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k not in _DROP_META}
    annotations = meta.get("annotations")
    if annotations and LAST_APPLIED in annotations:
        meta["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
    slim["metadata"] = meta
    return marshal.dumps(slim)


def unpack(blob: bytes) -> Obj:
    obj: Obj = marshal.loads(blob)
    return obj

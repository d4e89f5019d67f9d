"""Schemas shared by every kind: ObjectMeta and LabelSelector."""

from __future__ import annotations

import re
from typing import Any

from tabby.model.errors import FieldError
from tabby.model.schema import (
    Struct,
    anything,
    at,
    enum,
    integer,
    item,
    list_of,
    map_of,
    string,
)

_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def object_name(value: Any, path: str) -> str:
    """A DNS-1123 subdomain, as Kubernetes requires of most object names."""
    name = string(value, path)
    if not name or len(name) > 253 or not _SUBDOMAIN.match(name):
        raise FieldError(
            path, f"{name!r} must be lower-case alphanumerics, '-' or '.' (at most 253)"
        )
    return name


metadata = Struct(
    {
        "name": object_name,
        "namespace": object_name,
        "generateName": string,
        "labels": map_of(string),
        "annotations": map_of(string),
        "uid": string,
        "resourceVersion": string,
        "creationTimestamp": string,
        "generation": integer(0),
        "ownerReferences": list_of(Struct({}, open=True)),
        "deletionTimestamp": string,
        "deletionGracePeriodSeconds": integer(0),
        "finalizers": list_of(string),
        "managedFields": list_of(Struct({}, open=True)),  # server-side apply's bookkeeping
        "selfLink": string,
    },
    required=("name",),
)


def _requirement_values(req: dict[str, Any], path: str) -> dict[str, Any]:
    values = req.get("values", [])
    if req["operator"] in ("In", "NotIn") and not values:
        raise FieldError(at(path, "values"), f"must be non-empty for operator {req['operator']}")
    if req["operator"] in ("Exists", "DoesNotExist") and values:
        raise FieldError(at(path, "values"), f"must be empty for operator {req['operator']}")
    return req


label_selector = Struct(
    {
        "matchLabels": map_of(string),
        "matchExpressions": list_of(
            Struct(
                {
                    "key": string,
                    "operator": enum("In", "NotIn", "Exists", "DoesNotExist"),
                    "values": list_of(string),
                },
                required=("key", "operator"),
                post=_requirement_values,
            )
        ),
    }
)

free = Struct({}, open=True)
"""A mapping whose contents are not checked (status blocks, probes)."""

__all__ = ["anything", "free", "item", "label_selector", "metadata", "object_name"]

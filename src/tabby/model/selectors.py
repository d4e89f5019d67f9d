"""Kubernetes LabelSelector semantics.

A LabelSelector is ``{"matchLabels": {...}, "matchExpressions": [...]}``; all its terms must
hold (AND). An empty selector ``{}`` matches every object; ``None`` (an absent selector) matches
nothing — which is what an absent peer selector means in NetworkPolicy. A Service's
``spec.selector`` is a plain map: wrap it with ``from_map`` (and treat an absent or empty Service
selector as "no selector: endpoints managed elsewhere" before matching).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def from_map(labels: Mapping[str, str]) -> dict[str, Any]:
    """The LabelSelector equivalent of a plain ``key: value`` map (Service spec.selector)."""
    return {"matchLabels": dict(labels)}


def _requirement(req: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key, op, values = req["key"], req["operator"], req.get("values") or []
    if op == "In":
        return key in labels and labels[key] in values
    if op == "NotIn":
        return key not in labels or labels[key] not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    raise ValueError(f"unknown label selector operator {op!r}")


def match_labels(selector: Mapping[str, Any] | None, labels: Mapping[str, str] | None) -> bool:
    """Does ``selector`` select an object carrying ``labels``? See the module docstring."""
    if selector is None:
        return False
    labels = labels or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    return all(_requirement(r, labels) for r in selector.get("matchExpressions") or [])

"""Validated resources (Kubernetes- and Calico-shaped). No I/O; the lowest layer."""

from tabby.model.errors import UnknownKind, ValidationError
from tabby.model.kinds import KINDS, Kind, lookup
from tabby.model.selectors import match_labels
from tabby.model.validate import validate

__all__ = ["KINDS", "Kind", "UnknownKind", "ValidationError", "lookup", "match_labels", "validate"]

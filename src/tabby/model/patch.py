"""JSON merge patch (RFC 7386): pure, used by the datastores and the CLI."""

from __future__ import annotations

import copy
from typing import Any


def merge_patch(target: Any, patch: Any) -> Any:
    """``target`` with ``patch`` merged in, per RFC 7386; neither argument is modified.

    A mapping patch merges key by key and ``null`` removes a key; any other patch value
    (lists included) replaces the target wholesale.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out

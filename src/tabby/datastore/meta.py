"""Server-managed metadata, as the API server keeps it: shared by every datastore."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from tabby.datastore.api import Obj

SERVER_MANAGED = ("resourceVersion", "uid", "creationTimestamp")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def same(new: Obj, old: Obj, managed: tuple[str, ...] = SERVER_MANAGED) -> bool:
    """Equal apart from server-managed metadata (an apply of it writes nothing)."""
    strip = [
        {**o, "metadata": {k: v for k, v in o["metadata"].items() if k not in managed}}
        for o in (new, old)
    ]
    return strip[0] == strip[1]


def stamp_metadata(obj: Obj, old: Obj | None) -> None:
    """uid and creationTimestamp: kept from the stored object, made for a new one."""
    meta = obj["metadata"]
    meta["uid"] = old["metadata"]["uid"] if old else str(uuid.uuid4())
    meta["creationTimestamp"] = old["metadata"]["creationTimestamp"] if old else now()

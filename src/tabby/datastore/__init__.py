"""Datastores: the only code that talks to stored state. ``open_datastore`` picks one by URL."""

from __future__ import annotations

from tabby.datastore.api import (
    AlreadyExists,
    Compacted,
    Conflict,
    Datastore,
    DatastoreError,
    Event,
    NotFound,
    Obj,
    Unavailable,
)

SQLITE_PREFIX = "sqlite://"


def open_datastore(url: str) -> Datastore:
    """The datastore at ``url``. Only ``sqlite:///abs/path.db`` (embedded) exists today.

    Raises DatastoreError (one line) for another scheme, a relative path or an unusable file.
    """
    if url.startswith(SQLITE_PREFIX):
        path = url[len(SQLITE_PREFIX) :]
        if not path.startswith("/"):
            raise DatastoreError(
                f"datastore {url!r}: needs an absolute path, as in sqlite:///run/tabby/store.db"
            )
        from tabby.datastore.embedded import EmbeddedDatastore

        return EmbeddedDatastore(path)
    raise DatastoreError(
        f"datastore {url!r}: only sqlite:///path is supported "
        "(etcd:// and kubernetes datastores are not implemented yet)"
    )


__all__ = [
    "AlreadyExists",
    "Compacted",
    "Conflict",
    "Datastore",
    "DatastoreError",
    "Event",
    "NotFound",
    "Obj",
    "Unavailable",
    "open_datastore",
]

"""Datastores: the only code that talks to stored state. ``open_datastore`` picks one by URL."""

from __future__ import annotations

from urllib.parse import parse_qsl

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
    """The datastore at ``url``. Only ``sqlite:///abs/path.db`` (embedded) exists today, with
    an optional ``?service-cidr=10.96.0.0/12`` (default 100.64.0.0/13, kOps').

    Raises DatastoreError (one line) for another scheme, a relative path, an unknown option or
    an unusable file.
    """
    if url.startswith(SQLITE_PREFIX):
        path, _, query = url[len(SQLITE_PREFIX) :].partition("?")
        if not path.startswith("/"):
            raise DatastoreError(
                f"datastore {url!r}: needs an absolute path, as in sqlite:///run/tabby/store.db"
            )
        options = dict(parse_qsl(query, keep_blank_values=True))
        unknown = sorted(set(options) - {"service-cidr"})
        if unknown:
            raise DatastoreError(f"datastore {url!r}: unknown option {unknown[0]!r}")
        from tabby.datastore.embedded import EmbeddedDatastore

        if "service-cidr" in options:
            return EmbeddedDatastore(path, service_cidr=options["service-cidr"])
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

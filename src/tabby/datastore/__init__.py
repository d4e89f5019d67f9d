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
ETCD_PREFIX = "etcd://"
ETCD_UNIX_PREFIX = "etcd+unix://"


def open_datastore(url: str) -> Datastore:
    """The datastore at ``url``:

    - ``sqlite:///abs/path.db``: the embedded store (one file, one host);
    - ``etcd://HOST:PORT[,HOST:PORT...]``: etcd v3 over gRPC, no TLS;
    - ``etcd+unix:///abs/path``: etcd v3 on a unix socket (the lab's: reachable from every
      network namespace of the host).

    Each takes an optional ``?service-cidr=10.96.0.0/12`` (default 100.64.0.0/13, kOps').
    Raises DatastoreError (one line) for another scheme, a relative path, an unknown option or
    an unusable file.
    """
    if url.startswith((ETCD_PREFIX, ETCD_UNIX_PREFIX)):
        return _open_etcd(url)
    if url.startswith(SQLITE_PREFIX):
        path, _, query = url[len(SQLITE_PREFIX) :].partition("?")
        if not path.startswith("/"):
            raise DatastoreError(
                f"datastore {url!r}: needs an absolute path, as in sqlite:///run/tabby/store.db"
            )
        options = _options(url, query)
        from tabby.datastore.embedded import EmbeddedDatastore

        if "service-cidr" in options:
            return EmbeddedDatastore(path, service_cidr=options["service-cidr"])
        return EmbeddedDatastore(path)
    raise DatastoreError(
        f"datastore {url!r}: use sqlite:///path, etcd://HOST:PORT or etcd+unix:///path "
        "(the kubernetes datastore is not implemented yet)"
    )


def _options(url: str, query: str) -> dict[str, str]:
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - {"service-cidr"})
    if unknown:
        raise DatastoreError(f"datastore {url!r}: unknown option {unknown[0]!r}")
    return options


def _open_etcd(url: str) -> Datastore:
    unix = url.startswith(ETCD_UNIX_PREFIX)
    rest, _, query = url[len(ETCD_UNIX_PREFIX if unix else ETCD_PREFIX) :].partition("?")
    options = _options(url, query)
    if unix:
        if not rest.startswith("/"):
            raise DatastoreError(
                f"datastore {url!r}: needs an absolute socket path, as in etcd+unix:///run/etcd.sock"
            )
        target = f"unix:{rest}"
    else:
        endpoints = rest.rstrip("/").split(",")
        if not all(e.rpartition(":")[0] and e.rpartition(":")[2].isdigit() for e in endpoints):
            raise DatastoreError(f"datastore {url!r}: needs HOST:PORT, as in etcd://127.0.0.1:2379")
        target = ",".join(endpoints)
    from tabby.datastore.etcd import EtcdDatastore

    if "service-cidr" in options:
        return EtcdDatastore(target, service_cidr=options["service-cidr"], name=url)
    return EtcdDatastore(target, name=url)


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

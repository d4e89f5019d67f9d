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
KUBERNETES = "kubernetes"
KUBERNETES_PREFIX = "kubernetes://"
TYPHA_PREFIX = "typha://"


def open_datastore(url: str) -> Datastore:
    """The datastore at ``url``:

    - ``sqlite:///abs/path.db``: the embedded store (one file, one host);
    - ``etcd://HOST:PORT[,HOST:PORT...]``: etcd v3 over gRPC, no TLS;
    - ``etcd+unix:///abs/path``: etcd v3 on a unix socket (the lab's: reachable from every
      network namespace of the host).
    - ``typha://HOST:PORT?datastore=<percent-encoded url>``: reads through a ``tabby typha``
      fan-out, writes to the datastore named (datastore/typha.py); that URL carries the options.

    The sqlite and etcd ones take an optional ``?service-cidr=10.96.0.0/12`` (default
    100.64.0.0/13, kOps').

    - ``kubernetes``: the Kubernetes API, in-cluster (the pod's service account) when run in a
      pod, else as kubectl finds it (``$KUBECONFIG``, then ``~/.kube/config``);
    - ``kubernetes://``: the Kubernetes API named by ``$KUBECONFIG`` (or ``~/.kube/config``);
    - ``kubernetes:///abs/path/kubeconfig``: the Kubernetes API named by that kubeconfig.

    These take an optional ``?context=NAME`` (a kubeconfig context; default: the current one);
    the API server allocates service addresses itself, so no ``service-cidr``.

    Raises DatastoreError (one line) for another scheme, a relative path, an unknown option or
    an unusable file.
    """
    if url.startswith(TYPHA_PREFIX):
        from tabby.datastore.typha import open_typha

        return open_typha(url)
    if url == KUBERNETES or url.startswith((KUBERNETES + "?", KUBERNETES_PREFIX)):
        return _open_kubernetes(url)
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
        f"datastore {url!r}: use sqlite:///path, etcd://HOST:PORT or etcd+unix:///path, "
        "kubernetes or kubernetes:///path/to/kubeconfig"
    )


def _options(url: str, query: str) -> dict[str, str]:
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - {"service-cidr"})
    if unknown:
        raise DatastoreError(f"datastore {url!r}: unknown option {unknown[0]!r}")
    return options


def _open_kubernetes(url: str) -> Datastore:
    location: str | None
    if url.startswith(KUBERNETES_PREFIX):
        location, _, query = url[len(KUBERNETES_PREFIX) :].partition("?")
        if location and not location.startswith("/"):
            raise DatastoreError(
                f"datastore {url!r}: needs an absolute kubeconfig path, as in "
                "kubernetes:///etc/tabby/kubeconfig (or kubernetes:// for $KUBECONFIG)"
            )
    else:
        location, query = None, url.partition("?")[2]
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - {"context"})
    if unknown:
        why = " (the API server allocates service addresses)" if "service-cidr" in unknown else ""
        raise DatastoreError(f"datastore {url!r}: unknown option {unknown[0]!r}{why}")
    from tabby.datastore.kubernetes import KubernetesDatastore, config_for

    return KubernetesDatastore(config_for(location, options.get("context")), name=url)


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

"""The Kubernetes API datastore (Calico's default mode): the Datastore protocol over kube-apiserver.

Kinds and where they live (one REST resource each, cluster-wide list + watch):

- Nodes, Pods, Services, Namespaces (``v1``), EndpointSlices (``discovery.k8s.io/v1``),
  NetworkPolicies (``networking.k8s.io/v1``): the built-in APIs;
- FelixConfiguration, IPPool: CRDs in ``crd.projectcalico.org/v1`` as Calico keeps them. tabby
  speaks ``projectcalico.org/v3`` (the manifests users write): the apiVersion is rewritten on the
  way out and back on the way in, the rest of the object is identical;
- IPAMBlock, IPAMHandle: tabby's own CRDs in ``tabby.dev/v1`` (their shape is not Calico's).
  The CRD manifests are ``deploy/crds/*.yaml``;
- Deployments (``apps/v1``) can be applied, read and deleted, but are not watched (``Kind.watched``
  is False): kube-controller-manager owns them on a real cluster, only the lab's kubelet reads them.

What is relied on (documented in docs/design/datastore.md, section Kubernetes):

- A ``resourceVersion`` is opaque per the API, but every kube-apiserver backed by one etcd
  writes etcd's revision there, for every resource (CRDs included): the global ``revision`` of
  the protocol is that integer. ``revision()`` is the resourceVersion of a one-item list of
  Namespaces (a quorum read: the newest revision). Servers whose resourceVersions are not
  integers are refused with a one-line error.
- ``watch(since)`` runs one informer per kind, merged into one stream: each kind's events come
  in revision order; across kinds they come as they arrive (the agent only needs per-object
  order). ``since <= 0`` starts from the current state (ADDED for every object), as history
  from revision 0 is never kept by an API server.

The informer (``_Informer``: list -> watch -> relist on 410, Calico's and client-go's
reflector, written here because lightkube's own watch drops the deletes missed during a 410):

- it seeds its known state from the newest full list this datastore made of the kind at or
  after ``since`` (the caller's own list, so a relist diffs against what the caller holds), or
  lists itself;
- it watches from ``since`` with ``allowWatchBookmarks=true`` and a server-side
  ``timeoutSeconds``, remembering the resourceVersion of every event and bookmark, and resumes
  from it after a normal close (server timeout), a dropped connection or an error (exponential
  backoff with jitter, ``BACKOFF_S``);
- a 410 Gone (history compacted) while it is still replaying events older than its seed means
  the caller's revision is too old: the stream raises Compacted (the caller relists, as with
  the other datastores). Afterwards, a 410 makes it relist and diff against its known state:
  DELETED for what vanished, ADDED/MODIFIED for what is new or changed (compared by
  resourceVersion), then it watches from the list's resourceVersion. No delete is lost; the
  known state is each object's resourceVersion and a tombstone (kind, name, namespace, labels),
  as Calico's watcher cache keeps revisions only, so a DELETED found by a relist carries those
  and not the object's spec;
- without the API server for ``reconnect_timeout_s`` the stream raises Unavailable.

Writes: validated with ``model.validate`` first (all of an apply before anything is sent), then
create (POST) or replace (PUT with the read resourceVersion: optimistic concurrency, retried on
409 for apply and patch); status goes through the ``/status`` subresource for the kinds that
have one. An apply of N objects is N requests: it is not atomic against the server's own
failures (the API has no multi-object transaction); validation and the pod-IP check (every pod
IP inside an IPPool, done before the first write) make that rare. Service admission (cluster IP
and node ports) is the API server's. Merge patches are merged, validated and sent as a
replace, so what is stored is what was validated.

Why a loop thread: lightkube's AsyncClient is asyncio, the protocol is synchronous and used from
plain threads (agent, CLI, CNI). One daemon thread per process runs the loop every
KubernetesDatastore shares; sync calls are submitted with ``run_coroutine_threadsafe``.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import copy
import functools
import os
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx2
import msgspec
from lightkube import AsyncClient, KubeConfig
from lightkube.core.resource import ApiInfo
from lightkube.generic_resource import (
    GenericGlobalResource,
    GenericGlobalStatus,
    GenericNamespacedResource,
    GenericNamespacedStatus,
    create_api_info,
)

from tabby.datastore.aioloop import shared_loop
from tabby.datastore.api import (
    AlreadyExists,
    Compacted,
    Conflict,
    DatastoreError,
    Event,
    EventType,
    NotFound,
    Obj,
    Outcome,
    Unavailable,
)
from tabby.datastore.meta import check_pod_ips, pods_with_ips, same
from tabby.model import KINDS, Kind, ValidationError, lookup, validate
from tabby.model.patch import merge_patch
from tabby.model.validate import ref

from . import services

WIRE_VERSIONS = {  # tabby's canonical apiVersion -> the one stored in the API server
    "FelixConfiguration": "crd.projectcalico.org/v1",
    "IPPool": "crd.projectcalico.org/v1",
    "BGPConfiguration": "crd.projectcalico.org/v1",
    "BGPPeer": "crd.projectcalico.org/v1",
}
STATUS_SUBRESOURCE = frozenset({"Pod", "Service", "Node", "Namespace"})
SERVER_MANAGED = ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields")
LIST_CHUNK = 500  # items per list page (limit/continue)
REQUEST_TIMEOUT_S = 10.0  # one request (not a watch)
CALL_TIMEOUT_S = 60.0  # one datastore call, retries included
WATCH_TIMEOUT_S = (300, 600)  # server-side timeoutSeconds, drawn per watch (client-go's range)
WATCH_IDLE_SLACK_S = 30.0  # a watch silent this long past its timeoutSeconds is dead
BACKOFF_S = (0.2, 30.0)  # first and longest wait between failed attempts (doubled, jittered)
RECONNECT_TIMEOUT_S = 30.0
STOP_CHECK_S = 0.25  # how often a blocked watcher looks at ``stop``
WRITE_ATTEMPTS = 16  # optimistic-concurrency retries of apply and patch
_ALL = "*"  # lightkube: every namespace

T = TypeVar("T")
Key = tuple[str, str]  # namespace ("" if cluster-scoped), name
# What an informer keeps of each object it knows (Calico's watcher cache keeps the revision and
# key only), keyed by "namespace/name" ("/name" when cluster-scoped; neither part may hold a
# "/"): one bytes object, the resourceVersion (8 bytes, to diff a relist) then the labels
# (msgspec JSON, empty when none) for the tombstone of an object a relist no longer finds (its
# identity is the key and the kind). ~190 bytes per object, 8 MB at 20,000 Services + slices;
# full objects would cost ~3 KB each (120 MB), the (resourceVersion, tombstone JSON) pair keyed
# by a (namespace, name) tuple that this replaced ~490 bytes (20 MB).
Known = bytes


# --- the shared event loop -----------------------------------------------------------------------

# --- configuration -------------------------------------------------------------------------------


def config_for(location: str | None, context: str | None = None) -> Any:
    """lightkube's configuration for a datastore URL's location part.

    ``None``: in-cluster (the pod's service account) when running in a pod, else as kubectl
    (``$KUBECONFIG``, then ``~/.kube/config``); ``""``: ``$KUBECONFIG`` or ``~/.kube/config``;
    an absolute path: that kubeconfig. ``context``: a kubeconfig context (default: current).
    """
    try:
        if location is None:
            config = KubeConfig.from_env()
        elif location == "":
            path = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
            config = KubeConfig.from_file(path.split(os.pathsep)[0])
        else:
            config = KubeConfig.from_file(location)
        if context is not None:
            return config.get(context_name=context)
        return config
    except Exception as err:  # noqa: BLE001 - lightkube raises several kinds; one line for users
        detail = _one_line(str(err)) or type(err).__name__
        raise DatastoreError(f"kubernetes datastore: no usable configuration: {detail}") from None


# --- objects on the wire -------------------------------------------------------------------------


def wire_version(kind: Kind) -> str:
    return WIRE_VERSIONS.get(kind.name, kind.api_version)


@functools.cache
def _resource(kind_name: str, status: bool = False) -> Any:
    """A lightkube generic resource class for ``kind_name`` (not registered globally)."""
    kind = lookup(kind_name)
    group, _, version = wire_version(kind).rpartition("/")
    info = create_api_info(group, version, kind.name, kind.plural)
    if status:
        sub = ApiInfo(
            resource=info.resource,
            parent=info.resource,
            plural=kind.plural,
            verbs=["get", "patch", "put"],
            action="status",
        )
        base = GenericNamespacedStatus if kind.namespaced else GenericGlobalStatus
        return type(f"{kind.name}Status", (base,), {"_api_info": sub})
    base = GenericNamespacedResource if kind.namespaced else GenericGlobalResource
    return type(kind.name, (base,), {"_api_info": info})


_DaemonSet: Any = type(
    "DaemonSet",
    (GenericNamespacedResource,),
    {"_api_info": create_api_info("apps", "v1", "DaemonSet", "daemonsets")},
)


def _to_wire(obj: Obj) -> Obj:
    kind = lookup(obj["kind"])
    return {**obj, "apiVersion": wire_version(kind)}


def _from_wire(obj: Obj) -> Obj:
    """An object as tabby holds it: canonical apiVersion, no managedFields (large, unused)."""
    kind = lookup(obj.get("kind") or "")
    obj["apiVersion"] = kind.api_version
    obj["kind"] = kind.name
    obj.get("metadata", {}).pop("managedFields", None)
    return obj


def _key_of(obj: Obj) -> Key:
    meta = obj["metadata"]
    return (meta.get("namespace") or "", meta["name"])


def _known_key(obj: Obj) -> str:
    meta = obj["metadata"]
    return f"{meta.get('namespace') or ''}/{meta['name']}"


def _known(obj: Obj) -> Known:
    labels = (obj.get("metadata") or {}).get("labels")
    return _rv(obj).to_bytes(8, "big") + (msgspec.json.encode(labels) if labels else b"")


def _known_rv(known: Known) -> int:
    return int.from_bytes(known[:8], "big")


def _tombstone(kind: Kind, key: str, known: Known, revision: int) -> Obj:
    """The last state a relist can give of an object it no longer finds: identity and labels."""
    namespace, _, name = key.partition("/")
    meta: Obj = {"name": name, **({"namespace": namespace} if namespace else {})}
    if len(known) > 8:
        meta["labels"] = msgspec.json.decode(known[8:])
    meta["resourceVersion"] = str(revision)
    return {"apiVersion": kind.api_version, "kind": kind.name, "metadata": meta}


def _rv(obj: Obj) -> int:
    return _revision(obj.get("metadata", {}).get("resourceVersion"))


def _revision(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DatastoreError(
            f"kubernetes datastore: resourceVersion {value!r} is not an integer: this API "
            "server is not backed by etcd revisions, which tabby relies on"
        ) from None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Gone(Exception):
    """A 410 from the API server (history or a continue token expired)."""


def _status_error(status: Obj, what: str) -> Exception:
    """The datastore error for a Kubernetes Status (an error response or a watch ERROR)."""
    code = int(status.get("code") or 0)
    reason = status.get("reason") or ""
    message = _one_line(status.get("message") or reason or f"HTTP {code}")
    if code == 410:
        return _Gone(message)
    if code == 404:
        return NotFound(f"{what} not found")
    if code == 409 and reason == "AlreadyExists":
        return AlreadyExists(f"{what} already exists")
    if code == 409:
        return Conflict(f"{what} has changed ({message}): read it again and retry")
    if code in (400, 422):
        return ValidationError(message)
    if code == 429 or code >= 500:
        return Unavailable(f"kubernetes datastore: {what}: {message}")
    return DatastoreError(f"kubernetes datastore: {what}: {message}")


def _decode(content: bytes) -> Any:
    return msgspec.json.decode(content)


# --- the datastore -------------------------------------------------------------------------------


class KubernetesDatastore:
    """The Datastore protocol over the Kubernetes API (see the module docstring)."""

    def __init__(
        self,
        config: Any,
        name: str = "kubernetes",
        reconnect_timeout_s: float = RECONNECT_TIMEOUT_S,
        watch_timeout_s: tuple[int, int] = WATCH_TIMEOUT_S,
        backoff_s: tuple[float, float] = BACKOFF_S,
    ) -> None:
        """``config``: a lightkube KubeConfig or SingleConfig (see ``config_for``)."""
        self.name = name
        self.reconnect_timeout_s = reconnect_timeout_s
        self.watch_timeout_s = watch_timeout_s
        self.backoff_s = backoff_s
        self._loop = shared_loop()
        self._client: Any = self._call(self._open(config))
        self._generic: Any = self._client._client  # lightkube's request builder and sender
        self._seeds: dict[str, tuple[int, dict[str, Known]]] = {}  # kind -> newest full list
        self._seeds_lock = threading.Lock()
        self.relists = 0  # informer relists after a 410 (tests and metrics)
        self._watch_down: dict[str, str] = {}  # kind -> why its informer's stream is down

    async def _open(self, config: Any) -> Any:
        timeout = httpx2.Timeout(REQUEST_TIMEOUT_S)
        return AsyncClient(config=config, timeout=timeout, field_manager="tabby", trust_env=False)

    # --- plumbing ------------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the shared loop; transport failures become one line."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(CALL_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise Unavailable(
                f"datastore {self.name}: no answer in {CALL_TIMEOUT_S:.0f} s"
            ) from None
        except _Gone as err:
            raise Compacted(f"datastore {self.name}: {err}; relist and watch again") from None
        except (httpx2.HTTPError, OSError, TimeoutError) as err:
            raise self._transport_error(err) from None

    def _transport_error(self, err: BaseException) -> Unavailable:
        detail = _one_line(str(err)) or type(err).__name__
        return Unavailable(f"datastore {self.name}: {detail}")

    def _request(
        self,
        method: str,
        kind: Kind,
        *,
        name: str | None = None,
        namespace: str | None = None,
        body: Obj | None = None,
        params: dict[str, Any] | None = None,
        status: bool = False,
        watch: bool = False,
        timeout: httpx2.Timeout | None = None,
    ) -> Any:
        """An httpx request for ``method`` on ``kind`` (lightkube builds the path and auth)."""
        res = _resource(kind.name, status)
        obj = res(_to_wire(body)) if body is not None and method in ("post", "put") else body
        if kind.namespaced:
            ns = namespace if namespace else (_ALL if method in ("list",) else "default")
        else:
            ns = None
        br = self._generic.prepare_request(
            method, res=res, obj=obj, name=name, namespace=ns, watch=watch, params=params
        )
        if method == "delete" and body is not None:
            br.data, br.headers = body, {"Content-Type": "application/json"}
        if timeout is not None:
            br.timeout = timeout
        return self._generic.build_adapter_request(br)

    async def _send(self, request: Any, what: str) -> Any:
        """Send ``request``; the decoded JSON answer, or the datastore error for its Status."""
        resp = await self._generic.send(request)
        if resp.status_code >= 400:
            try:
                status = _decode(resp.content)
            except msgspec.DecodeError:
                status = {"code": resp.status_code, "message": resp.text[:200]}
            if not isinstance(status, dict):
                status = {"code": resp.status_code}
            status.setdefault("code", resp.status_code)
            raise _status_error(status, what)
        return _decode(resp.content)

    # --- reads ---------------------------------------------------------------------------------

    def revision(self) -> int:
        return self._call(self._revision())

    async def _revision(self) -> int:
        ns = lookup("Namespace")
        answer = await self._send(self._request("list", ns, params={"limit": 1}), "namespaces")
        return _revision(answer.get("metadata", {}).get("resourceVersion"))

    async def _list(self, kind: Kind, namespace: str | None = None) -> tuple[list[Obj], int]:
        """Every object of ``kind``, page by page (all pages at the first page's revision)."""
        for _ in range(3):  # an expired continue token (410) restarts the list
            out: list[Obj] = []
            params: dict[str, Any] = {"limit": LIST_CHUNK}
            try:
                while True:
                    answer = await self._send(
                        self._request("list", kind, namespace=namespace, params=params),
                        kind.plural,
                    )
                    for item in answer.get("items") or []:
                        item.setdefault("kind", kind.name)
                        out.append(_from_wire(item))
                    meta = answer.get("metadata") or {}
                    if not meta.get("continue"):
                        return out, _revision(meta.get("resourceVersion"))
                    params = {"limit": LIST_CHUNK, "continue": meta["continue"]}
            except _Gone:
                continue
        raise Unavailable(f"datastore {self.name}: list {kind.plural}: continue tokens expired")

    def list(self, kind: str, namespace: str | None = None) -> tuple[list[Obj], int]:
        k = lookup(kind)
        objs, at = self._call(self._list(k, namespace if k.namespaced else None))
        objs.sort(key=lambda o: _key_of(o))
        if not (k.namespaced and namespace):
            with self._seeds_lock:  # the seed of the next watch of this kind
                self._seeds[k.name] = (at, {_known_key(o): _known(o) for o in objs})
        return objs, at

    def iter_list(self, kind: str) -> Iterator[Obj]:
        """list(kind) one page at a time (StreamingList): pages of LIST_CHUNK, all at the first
        page's revision (``continue`` tokens), decoded as they come. An expired token in the
        middle (410: the server compacted past the list's revision) raises Compacted: the
        caller has seen part of the list and starts again, as after a compacted watch. Unlike
        list(), the order is the server's (namespace, name for kube-apiserver's etcd keys)."""
        k = lookup(kind)
        known: dict[str, Known] = {}
        params: dict[str, Any] = {"limit": LIST_CHUNK}
        while True:
            items, meta = self._call(self._page(k, params))
            for obj in items:
                known[_known_key(obj)] = _known(obj)
                yield obj
            if not meta.get("continue"):
                break
            params = {"limit": LIST_CHUNK, "continue": meta["continue"]}
        with self._seeds_lock:  # the seed of the next watch of this kind
            self._seeds[k.name] = (_revision(meta.get("resourceVersion")), known)

    async def _page(self, kind: Kind, params: dict[str, Any]) -> tuple[builtins.list[Obj], Obj]:
        """One list page of ``kind``: its objects and the list's metadata."""
        answer = await self._send(self._request("list", kind, params=params), kind.plural)
        items: builtins.list[Obj] = []
        for item in answer.pop("items", None) or []:
            item.setdefault("kind", kind.name)
            items.append(_from_wire(item))
        return items, answer.get("metadata") or {}

    async def _get(self, kind: Kind, name: str, namespace: str | None) -> Obj | None:
        what = _ref(kind, name, namespace)
        try:
            obj = await self._send(self._request("get", kind, name=name, namespace=namespace), what)
        except NotFound:
            return None
        return _from_wire(obj)

    def get(self, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        k = lookup(kind)
        return self._call(self._get(k, name, namespace))

    # --- writes --------------------------------------------------------------------------------

    async def _create(self, obj: Obj) -> Obj:
        kind = lookup(obj["kind"])
        body = copy.deepcopy(obj)
        for field in SERVER_MANAGED:
            body["metadata"].pop(field, None)
        ns = body["metadata"].get("namespace")
        request = self._request("post", kind, namespace=ns, body=body)
        stored = _from_wire(await self._send(request, ref(obj)))
        return await self._write_status(kind, obj, stored)

    async def _replace(self, obj: Obj, version: str) -> Obj:
        """PUT ``obj`` if the stored resourceVersion is still ``version`` (else Conflict)."""
        kind = lookup(obj["kind"])
        body = copy.deepcopy(obj)
        body["metadata"]["resourceVersion"] = version
        meta = body["metadata"]
        request = self._request(
            "put", kind, name=meta["name"], namespace=meta.get("namespace"), body=body
        )
        stored = _from_wire(await self._send(request, ref(obj)))
        return await self._write_status(kind, obj, stored)

    async def _write_status(self, kind: Kind, wanted: Obj, stored: Obj) -> Obj:
        """Kinds with a status subresource ignore status in the main resource: write it there."""
        if kind.name not in STATUS_SUBRESOURCE or "status" not in wanted:
            return stored
        if stored.get("status") == wanted["status"]:
            return stored
        body = {**stored, "status": wanted["status"]}
        meta = body["metadata"]
        request = self._request(
            "put", kind, name=meta["name"], namespace=meta.get("namespace"), body=body, status=True
        )
        return _from_wire(await self._send(request, ref(wanted)))

    async def _check_pod_ips(self, objs: Sequence[Obj]) -> None:
        """Every Pod's IPs lie in some IPPool, when any IPPool exists (the other datastores
        check it in their write transaction; here it is checked before the first write)."""
        pods = pods_with_ips(objs)
        if not pods:
            return
        stored, _ = await self._list(lookup("IPPool"))
        by_name = {p["metadata"]["name"]: p for p in stored}
        by_name.update({o["metadata"]["name"]: o for o in objs if o["kind"] == "IPPool"})
        check_pod_ips(pods, by_name.values())

    def apply_with_outcomes(self, objs: Sequence[Obj]) -> tuple[int, builtins.list[Outcome]]:
        valid = [validate(o) for o in objs]  # all validated before anything is sent

        async def run() -> tuple[int, builtins.list[Outcome]]:
            await self._check_pod_ips(valid)
            outcomes: builtins.list[Outcome] = []
            written = 0
            for obj in valid:
                outcome, revision = await self._apply_one(obj)
                outcomes.append(outcome)
                written = max(written, revision)
            return written or await self._revision(), outcomes

        return self._call(run())

    async def _apply_one(self, obj: Obj) -> tuple[Outcome, int]:
        """Create or replace one object; (outcome, revision written or 0)."""
        kind = lookup(obj["kind"])
        meta = obj["metadata"]
        for _ in range(WRITE_ATTEMPTS):
            old = await self._get(kind, meta["name"], meta.get("namespace"))
            try:
                if old is None:
                    return "created", _rv(await self._create(obj))
                new = copy.deepcopy(obj)
                if "status" not in new and "status" in old:
                    new["status"] = old["status"]  # apply does not clear status, as kubectl's
                if same(new, old, SERVER_MANAGED):
                    return "unchanged", 0
                stored = await self._replace(new, old["metadata"]["resourceVersion"])
            except (AlreadyExists, Conflict):
                continue  # someone wrote in between: read again
            if _rv(stored) == _rv(old):
                return "unchanged", 0  # the server found nothing to change (its defaults)
            return "configured", _rv(stored)
        raise Conflict(f"{ref(obj)}: gave up after {WRITE_ATTEMPTS} conflicting writes: retry")

    def apply(self, objs: Sequence[Obj]) -> int:
        return self.apply_with_outcomes(objs)[0]

    def create(self, obj: Obj) -> Obj:
        valid = validate(obj)

        async def run() -> Obj:
            await self._check_pod_ips([valid])
            return await self._create(valid)

        return self._call(run())

    def update(self, obj: Obj) -> Obj:
        valid = validate(obj)
        version = valid["metadata"].get("resourceVersion")
        if not version:
            raise Conflict(f"{ref(valid)}: metadata.resourceVersion is required to update")

        async def run() -> Obj:
            await self._check_pod_ips([valid])
            try:
                return await self._replace(valid, version)
            except Conflict:
                raise Conflict(
                    f"{ref(valid)} has changed (resourceVersion {version} is no longer current): "
                    "read it again and retry"
                ) from None

        return self._call(run())

    def patch(self, kind: str, name: str, namespace: str | None, patch: Obj) -> Obj:
        if not isinstance(patch, dict):
            raise ValidationError("a merge patch must be a JSON object")
        k = lookup(kind)
        ns = (namespace or "default") if k.namespaced else None

        async def run() -> Obj:
            for _ in range(WRITE_ATTEMPTS):
                old = await self._get(k, name, ns)
                if old is None:
                    raise NotFound(f"{_ref(k, name, ns)} not found")
                version = patch.get("metadata", {}).get("resourceVersion")
                if version is not None and version != old["metadata"]["resourceVersion"]:
                    raise Conflict(f"{ref(old)} has changed (resourceVersion {version} is stale)")
                merged = merge_patch(old, patch)
                new = validate(services.drop_type_dependent(merged, old))
                if _key_of(new) != _key_of(old) or new["kind"] != old["kind"]:
                    raise ValidationError(
                        f"{ref(old)}: a patch cannot change kind, name or namespace"
                    )
                if same(new, old, SERVER_MANAGED):
                    return old
                await self._check_pod_ips([new])
                try:
                    return await self._replace(new, old["metadata"]["resourceVersion"])
                except Conflict:
                    if version is not None:
                        raise
            raise Conflict(f"{_ref(k, name, ns)}: gave up after {WRITE_ATTEMPTS} conflicts: retry")

        return self._call(run())

    def delete(self, kind: str, name: str, namespace: str | None = None) -> int:
        k = lookup(kind)
        ns = (namespace or "default") if k.namespaced else None

        async def run() -> int:
            request = self._request("delete", k, name=name, namespace=ns)
            answer = await self._send(request, _ref(k, name, ns))
            # The API server answers with the object as deleted (resourceVersion: the deletion's
            # revision), or a Status for kinds with graceful deletion left to finish.
            if answer.get("kind") == "Status":
                return await self._revision()
            return _rv(answer)

        return self._call(run())

    # --- DaemonSets (not tabby kinds: only the kube-proxy hand-over touches them) -------------

    def _daemonset_request(
        self, method: str, namespace: str, name: str, patch: Obj | None = None
    ) -> Any:
        headers = {"Content-Type": "application/merge-patch+json"} if patch is not None else None
        br = self._generic.prepare_request(
            method, res=_DaemonSet, obj=patch, name=name, namespace=namespace, headers=headers
        )
        return self._generic.build_adapter_request(br)

    def get_daemonset(self, namespace: str, name: str) -> Obj | None:
        """The DaemonSet ``namespace/name`` as the API server holds it, or None."""

        async def run() -> Obj | None:
            try:
                answer = await self._send(
                    self._daemonset_request("get", namespace, name), f"daemonset {namespace}/{name}"
                )
            except NotFound:
                return None
            return cast(Obj, answer)

        return self._call(run())

    def merge_patch_daemonset(self, namespace: str, name: str, patch: Obj) -> Obj:
        """A JSON merge patch (RFC 7386; what ``kubectl patch --type merge`` sends) of the
        DaemonSet ``namespace/name``; the API server applies it atomically. Returns the stored
        object; NotFound if there is no such DaemonSet."""
        request = self._daemonset_request("patch", namespace, name, patch)
        return cast(Obj, self._call(self._send(request, f"daemonset {namespace}/{name}")))

    # --- watch ---------------------------------------------------------------------------------

    def watch_problem(self) -> str | None:
        down = dict(self._watch_down)  # written by the loop thread
        return "; ".join(f"watch {k}: {v}" for k, v in sorted(down.items())) or None

    def watch(self, since_revision: int, stop: threading.Event | None = None) -> Iterator[Event]:
        """Every change above ``since_revision``: one informer per kind, merged."""
        out: queue.Queue[builtins.list[Event] | BaseException] = queue.Queue()
        with self._seeds_lock:
            seeds = {k.name: self._seeds.pop(k.name, None) for k in KINDS}
        informers = [
            _Informer(self, kind, since_revision, seeds[kind.name], out.put)
            for kind in KINDS
            if kind.watched
        ]
        del seeds  # the informers own them now (this frame lives as long as the watch)
        tasks = [asyncio.run_coroutine_threadsafe(i.run(), self._loop) for i in informers]
        try:
            while stop is None or not stop.is_set():
                try:
                    item = out.get(timeout=STOP_CHECK_S)
                except queue.Empty:
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield from item
        finally:
            for task in tasks:
                task.cancel()

    async def _stream(self, kind: Kind, revision: str) -> AsyncIterator[tuple[str, Obj]]:
        """One watch request of ``kind`` from ``revision``: (type, object) per line, until the
        server ends the stream; an ERROR line raises its error."""
        low, high = self.watch_timeout_s
        timeout_s = random.randint(low, high)
        params = {
            "resourceVersion": revision,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": timeout_s,
        }
        # No read timeout but a dead-connection bound: the server ends the stream by then.
        limits = httpx2.Timeout(REQUEST_TIMEOUT_S, read=timeout_s + WATCH_IDLE_SLACK_S)
        request = self._request("list", kind, params=params, watch=True, timeout=limits)
        resp = await self._generic.send(request, stream=True)
        try:
            if resp.status_code >= 400:
                await resp.aread()
                try:
                    status = _decode(resp.content)
                except msgspec.DecodeError:
                    status = {"message": resp.text[:200]}
                status = status if isinstance(status, dict) else {}
                status.setdefault("code", resp.status_code)
                raise _status_error(status, f"watch {kind.plural}")
            self._watch_down.pop(kind.name, None)  # connected: the stream is up again
            async for line in resp.aiter_lines():
                if not line.strip():
                    continue
                event = _decode(line)
                if event.get("type") == "ERROR":
                    raise _status_error(event.get("object") or {}, f"watch {kind.plural}")
                yield event["type"], event["object"]
        finally:
            await resp.aclose()

    def close(self) -> None:
        try:
            self._call(self._client.close())
        except DatastoreError:
            pass


def _ref(kind: Kind, name: str, namespace: str | None) -> str:
    if kind.namespaced:
        return f"{kind.name} {namespace or 'default'}/{name}"
    return f"{kind.name} {name}"


class _Backoff:
    """Exponential backoff with full jitter between ``first`` and ``longest`` seconds."""

    def __init__(self, first: float, longest: float) -> None:
        self.first, self.longest = first, longest
        self.next = first

    def reset(self) -> None:
        self.next = self.first

    async def sleep(self) -> None:
        await asyncio.sleep(random.uniform(self.next / 2, self.next))
        self.next = min(self.next * 2, self.longest)


class _Informer:
    """One kind's list -> watch -> (410: relist and diff) loop; see the module docstring."""

    def __init__(
        self,
        ds: KubernetesDatastore,
        kind: Kind,
        since: int,
        seed: tuple[int, dict[str, Known]] | None,
        emit: Callable[[builtins.list[Event] | BaseException], None],
    ) -> None:
        self.ds, self.kind, self.since, self.emit = ds, kind, since, emit
        self.revision = since  # of the last event or bookmark delivered
        self.seed_revision = 0
        self.known: dict[str, Known] = {}  # "namespace/name" -> resourceVersion, labels
        if seed is not None and seed[0] >= since > 0:
            self.seed_revision, self.known = seed  # no copy: the datastore gave it away

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # noqa: BLE001 - handed to the watching thread
            self.emit(err)

    async def _run(self) -> None:
        backoff = _Backoff(*self.ds.backoff_s)
        down_since = 0.0
        relist = False
        while True:
            try:
                if self.seed_revision == 0:
                    await self._seed()
                if relist:
                    await self._relist()
                    relist = False
                started = time.monotonic()
                lines = 0
                async for type_, raw in self.ds._stream(self.kind, str(self.revision)):
                    lines += 1
                    backoff.reset()
                    down_since = 0.0
                    self._on_line(type_, raw)
                if lines == 0 and time.monotonic() - started < 1.0:
                    await backoff.sleep()  # an empty stream ended at once: do not spin
            except _Gone:
                if self.revision < self.seed_revision:
                    raise Compacted(
                        f"datastore {self.ds.name}: {self.kind.plural}: revision {self.since} "
                        "has been compacted; relist and watch again"
                    ) from None
                relist = True
            except (Unavailable, httpx2.HTTPError, OSError, TimeoutError) as err:
                now = time.monotonic()
                down_since = down_since or now
                detail = _one_line(str(err)) or type(err).__name__
                self.ds._watch_down[self.kind.name] = detail
                if now - down_since > self.ds.reconnect_timeout_s:
                    raise Unavailable(
                        f"datastore {self.ds.name}: watch {self.kind.plural}: {detail}"
                    ) from None
                await backoff.sleep()

    def _on_line(self, type_: str, raw: Obj) -> None:
        revision = _rv(raw)
        if type_ == "BOOKMARK":  # only the resourceVersion is meaningful
            self.revision = max(self.revision, revision)
            return
        if type_ not in ("ADDED", "MODIFIED", "DELETED"):
            return
        obj = _from_wire(raw if raw.get("kind") else {**raw, "kind": self.kind.name})
        self.revision = revision
        if revision > self.seed_revision:  # older events replay what the seed already holds
            if type_ == "DELETED":
                self.known.pop(_known_key(obj), None)
            else:
                self.known[_known_key(obj)] = _known(obj)
        self.emit([Event(cast(EventType, type_), self.kind.name, obj, revision)])

    async def _seed(self) -> None:
        """No list of the caller's to start from: list now. ``since <= 0`` asks for the
        current state, so every object is ADDED and the watch starts at the list."""
        objs, at = await self.ds._list(self.kind)
        self.known, self.seed_revision = {_known_key(o): _known(o) for o in objs}, at
        if self.since <= 0:
            self.revision = at
            if objs:
                self.emit([Event("ADDED", self.kind.name, o, at) for o in objs])

    async def _relist(self) -> None:
        """After a 410: list, emit the difference from the known state (DELETED for what
        vanished: no delete is lost), and watch on from the list's revision."""
        objs, at = await self.ds._list(self.kind)
        fresh = {_known_key(o): o for o in objs}
        events: builtins.list[Event] = []
        for key in sorted(set(self.known) - set(fresh)):
            last = _tombstone(self.kind, key, self.known[key], at)
            events.append(Event("DELETED", self.kind.name, last, at))
        for key, obj in sorted(fresh.items()):
            before = self.known.get(key)
            if before is None or _known_rv(before) != _rv(obj):
                type_: EventType = "ADDED" if before is None else "MODIFIED"
                events.append(Event(type_, self.kind.name, obj, at))
        self.ds.relists += 1
        self.known = {key: _known(obj) for key, obj in fresh.items()}
        self.seed_revision = self.revision = at
        if events:
            self.emit(events)

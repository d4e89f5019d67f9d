"""A fake kube-apiserver that speaks the real REST protocol, for tests only (never the product).

HAND-WRITTEN from the Kubernetes API reference ("API Concepts": efficient detection of changes,
watch bookmarks, retrieving large results sets in chunks, resource versions, conflicts; the
Status kind) and informed by notes/tooling.md Appendix D. Nothing here was recorded from a real
server. It listens on 127.0.0.1 only, on a free port, in the test process.

What it does, as kube-apiserver does:
- one global resourceVersion (an integer, as etcd's revision) bumped by every write, stamped in
  ``metadata.resourceVersion``; lists carry it in ``metadata.resourceVersion``;
- LIST of a kind (all namespaces or one), chunked with ``limit``/``continue`` (every page from
  the snapshot of the first; a token older than the compaction answers 410 Expired);
- WATCH (``?watch=true``): chunked JSON lines ADDED/MODIFIED/DELETED/BOOKMARK/ERROR. Without a
  resourceVersion (or "0") it first sends ADDED for the current objects; from an RV it replays
  the history after it, or answers an ERROR event with Status 410 Expired when that history is
  compacted. ``allowWatchBookmarks=true`` gets BOOKMARK events carrying only the current RV;
  ``timeoutSeconds`` ends the stream cleanly;
- create (POST), replace (PUT, with the resourceVersion precondition: 409 Conflict), merge
  patch (PATCH application/merge-patch+json), delete (the deleted object back, its RV the
  deletion's revision; DeleteOptions preconditions), GET; the ``/status`` subresource for Pods,
  Services, Nodes and Namespaces (the main resource ignores status, create drops it except for
  Nodes); an update that changes nothing writes nothing (same RV, no event);
- Service admission (cluster IP, node ports) via tabby's ServiceAllocator (written after
  kube-apiserver's rules); its errors are 422 Invalid;
- CRDs are read from ``deploy/crds/*.yaml`` (group, served versions, plural, scope): a CRD
  manifest that does not load makes every test fail.

Simplifications: no authentication, no namespace-existence admission, no defaulting beyond
Services, no server-side apply, no field/label selectors, no schema validation of CRs.

Test controls: ``compact()`` drops history, ``close_watches()`` ends every stream cleanly (an
API server timing out or restarting), ``drop_watches()`` cuts them mid-stream (no final
chunk), ``inject(code, count)`` fails the next requests, ``requests`` records every request.
"""

from __future__ import annotations

import base64
import copy
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

from tabby.datastore import services
from tabby.model import ValidationError
from tabby.model.patch import merge_patch

Obj = dict[str, Any]
CRD_DIR = Path(__file__).resolve().parents[2] / "deploy" / "crds"


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status_subresource: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


BUILTIN = (
    Resource("", "v1", "namespaces", "Namespace", False, True),
    Resource("", "v1", "nodes", "Node", False, True),
    Resource("", "v1", "pods", "Pod", True, True),
    Resource("", "v1", "services", "Service", True, True),
    Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True),
    Resource("apps", "v1", "daemonsets", "DaemonSet", True, True),  # kube-proxy's (hand-over)
)
STATUS_DROPPED_ON_CREATE = frozenset({"Pod", "Service", "Namespace"})


def crd_resources(crd_dir: Path = CRD_DIR) -> list[Resource]:
    """One Resource per served version of every CRD manifest in ``crd_dir``."""
    out = []
    for path in sorted(crd_dir.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        assert crd["kind"] == "CustomResourceDefinition", path
        spec = crd["spec"]
        for version in spec["versions"]:
            if version.get("served"):
                out.append(
                    Resource(
                        spec["group"],
                        version["name"],
                        spec["names"]["plural"],
                        spec["names"]["kind"],
                        spec["scope"] == "Namespaced",
                        "status" in (version.get("subresources") or {}),
                    )
                )
    return out


def status(code: int, reason: str, message: str, **details: Any) -> Obj:
    out: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        out["details"] = details
    return out


class ApiError(Exception):
    def __init__(self, body: Obj) -> None:
        super().__init__(body["message"])
        self.body = body


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _strip_rv(obj: Obj) -> Obj:
    return {**obj, "metadata": {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}}


class FakeApiServer:
    """The store, its history and the HTTP server (see the module docstring)."""

    def __init__(
        self,
        bookmark_interval_s: float = 0.5,
        service_cidr: str = services.DEFAULT_SERVICE_CIDR,
        first_revision: int = 1000,
    ) -> None:
        self.resources = [*BUILTIN, *crd_resources()]
        self.bookmark_interval_s = bookmark_interval_s
        self.service_cidr = service_cidr
        self.cv = threading.Condition()
        self.rv = first_revision
        self.objects: dict[tuple[Resource, str, str], Obj] = {}
        self.log: list[tuple[int, str, Resource, Obj]] = []
        self.compacted = 0
        self.generation = 0  # bumped by close_watches
        self.requests: list[tuple[float, str, str, dict[str, str]]] = []
        self.gone_sent = 0  # 410s answered (watch ERROR events and expired continue tokens)
        self._snapshots: dict[str, tuple[int, list[Obj]]] = {}  # continue token id -> pages
        self._watch_socks: set[socket.socket] = set()
        self._inject: list[tuple[int, bool]] = []  # (code, watches only)
        self.httpd = _Server(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # --- lifecycle and controls ------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> FakeApiServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.drop_watches()
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig naming this server (no credentials: the fake has no authentication)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def compact(self, revision: int | None = None) -> None:
        """Drop the history up to ``revision`` (default: all of it), as etcd's compaction."""
        with self.cv:
            self.compacted = self.rv if revision is None else revision
            self.log = [e for e in self.log if e[0] > self.compacted]

    def close_watches(self) -> None:
        """End every open watch cleanly (the server's timeout or a restart)."""
        with self.cv:
            self.generation += 1
            self.cv.notify_all()

    def drop_watches(self) -> None:
        """Cut every open watch connection mid-stream (no terminating chunk)."""
        with self.cv:
            socks = list(self._watch_socks)
            self._watch_socks.clear()
        for sock in socks:  # first, so no stream gets to write its final chunk
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.close_watches()

    def inject(self, code: int, count: int, watches_only: bool = False) -> None:
        """Answer the next ``count`` requests (watches only, if asked) with ``code``."""
        with self.cv:
            self._inject.extend([(code, watches_only)] * count)

    def watch_requests(self, plural: str | None = None) -> list[dict[str, str]]:
        return [
            q
            for _, _, path, q in self.requests
            if q.get("watch") in ("true", "1") and (plural is None or path.endswith("/" + plural))
        ]

    def list_requests(self, plural: str) -> list[dict[str, str]]:
        """The LIST requests (pages included) of ``plural``."""
        return [
            q
            for _, method, path, q in self.requests
            if method == "GET"
            and q.get("watch") not in ("true", "1")
            and path.endswith("/" + plural)
        ]

    # --- direct writes (as another client would make them) --------------------------------------

    def resource(self, kind: str) -> Resource:
        for r in self.resources:
            if r.kind == kind:
                return r
        raise KeyError(kind)

    def put_object(self, obj: Obj) -> Obj:
        """Create or replace ``obj`` (wire apiVersion) without preconditions."""
        res = self.resource(obj["kind"])
        ns = obj["metadata"].get("namespace", "default") if res.namespaced else ""
        with self.cv:
            old = self.objects.get((res, ns, obj["metadata"]["name"]))
            if old is None:
                return self.create(res, ns, copy.deepcopy(obj), keep_status=True)
            body = copy.deepcopy(obj)
            body["metadata"].pop("resourceVersion", None)
            return self.replace(res, ns, obj["metadata"]["name"], body, keep_status=True)

    def load(self, objs: list[Obj]) -> int:
        """Bulk-load objects (wire apiVersions) as a restore from a backup would: no admission
        (Services must carry their clusterIP), one revision each, status kept; for benches that
        need thousands of objects (admission re-reads every Service per write). Returns the
        last revision."""
        with self.cv:
            for obj in objs:
                res = self.resource(obj["kind"])
                body = copy.deepcopy(obj)
                ns = body["metadata"].setdefault("namespace", "default") if res.namespaced else ""
                if not res.namespaced:
                    body["metadata"].pop("namespace", None)
                body["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=_now())
                key = (res, ns, body["metadata"]["name"])
                self.objects[key] = body
                self._bump("ADDED", res, body)
            return self.rv

    def delete_object(self, kind: str, name: str, namespace: str = "") -> Obj:
        res = self.resource(kind)
        return self.delete(res, namespace if res.namespaced else "", name, None)

    # --- the store (callers hold no lock; each takes it) ------------------------------------------

    def _bump(self, type_: str, res: Resource, obj: Obj) -> Obj:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.log.append((self.rv, type_, res, copy.deepcopy(obj)))
        self.cv.notify_all()
        return obj

    def _admit(self, res: Resource, new: Obj, old: Obj | None) -> None:
        if res.kind != "Service":
            return
        stored = [o for (r, _, _), o in self.objects.items() if r.kind == "Service"]
        try:
            services.ServiceAllocator(self.service_cidr, stored).admit(new, old)
        except ValidationError as err:
            name = new["metadata"]["name"]
            raise ApiError(
                status(422, "Invalid", str(err), name=name, kind="Service", group="")
            ) from None

    def _check_body(self, res: Resource, ns: str, body: Any, name: str | None = None) -> Obj:
        if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict):
            raise ApiError(status(400, "BadRequest", "the body must be an object with metadata"))
        if body.get("kind") != res.kind or body.get("apiVersion") != res.api_version:
            raise ApiError(
                status(
                    400,
                    "BadRequest",
                    f"the API version in the data ({body.get('apiVersion')}) does not match the "
                    f"expected API version ({res.api_version}) or kind {body.get('kind')!r}",
                )
            )
        meta = body["metadata"]
        if not meta.get("name"):
            raise ApiError(
                status(422, "Invalid", f"{res.kind} is invalid: metadata.name: Required")
            )
        if name is not None and meta["name"] != name:
            raise ApiError(status(400, "BadRequest", "the name of the object does not match"))
        if res.namespaced:
            if meta.setdefault("namespace", ns) != ns:
                raise ApiError(
                    status(
                        400,
                        "BadRequest",
                        "the namespace of the provided object does not match the namespace sent "
                        "on the request",
                    )
                )
        else:
            meta.pop("namespace", None)
        return body

    def create(self, res: Resource, ns: str, body: Any, keep_status: bool = False) -> Obj:
        with self.cv:
            obj = self._check_body(res, ns, body)
            meta = obj["metadata"]
            if meta.get("resourceVersion"):
                raise ApiError(
                    status(
                        500,
                        "InternalError",
                        "resourceVersion should not be set on objects to be created",
                    )
                )
            key = (res, ns, meta["name"])
            if key in self.objects:
                raise ApiError(
                    status(
                        409,
                        "AlreadyExists",
                        f'{res.plural} "{meta["name"]}" already exists',
                        name=meta["name"],
                        kind=res.plural,
                    )
                )
            if res.kind in STATUS_DROPPED_ON_CREATE and not keep_status:
                obj.pop("status", None)
            self._admit(res, obj, None)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            self.objects[key] = obj
            return copy.deepcopy(self._bump("ADDED", res, obj))

    def _current(self, res: Resource, ns: str, name: str) -> Obj:
        old = self.objects.get((res, ns, name))
        if old is None:
            raise ApiError(
                status(
                    404, "NotFound", f'{res.plural} "{name}" not found', name=name, kind=res.plural
                )
            )
        return old

    def _conflict(self, res: Resource, name: str) -> ApiError:
        return ApiError(
            status(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {res.plural} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again",
                name=name,
                kind=res.plural,
            )
        )

    def replace(
        self,
        res: Resource,
        ns: str,
        name: str,
        body: Any,
        subresource: str | None = None,
        keep_status: bool = False,
    ) -> Obj:
        with self.cv:
            obj = self._check_body(res, ns, body, name)
            old = self._current(res, ns, name)
            version = obj["metadata"].get("resourceVersion")
            if version and version != old["metadata"]["resourceVersion"]:
                raise self._conflict(res, name)
            return self._store(res, ns, name, old, obj, subresource, keep_status)

    def _store(
        self,
        res: Resource,
        ns: str,
        name: str,
        old: Obj,
        new: Obj,
        subresource: str | None,
        keep_status: bool = False,
    ) -> Obj:
        if subresource == "status":
            new = {**copy.deepcopy(old), "status": new.get("status")}
            if new["status"] is None:
                new.pop("status")
        elif res.status_subresource and not keep_status:
            new.pop("status", None)
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
        for field in ("uid", "creationTimestamp"):
            new["metadata"][field] = old["metadata"][field]
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if subresource is None:
            self._admit(res, new, copy.deepcopy(old))
        if new == old:
            return copy.deepcopy(old)  # nothing changed: nothing written, same resourceVersion
        self.objects[(res, ns, name)] = new
        return copy.deepcopy(self._bump("MODIFIED", res, new))

    def patch(self, res: Resource, ns: str, name: str, patch: Any, subresource: str | None) -> Obj:
        with self.cv:
            old = self._current(res, ns, name)
            if not isinstance(patch, dict):
                raise ApiError(status(400, "BadRequest", "a merge patch must be a JSON object"))
            version = (patch.get("metadata") or {}).get("resourceVersion")
            if version and version != old["metadata"]["resourceVersion"]:
                raise self._conflict(res, name)
            new = merge_patch(old, patch)
            self._check_body(res, ns, new, name)
            return self._store(res, ns, name, old, new, subresource)

    def delete(self, res: Resource, ns: str, name: str, options: Any) -> Obj:
        with self.cv:
            old = self._current(res, ns, name)
            pre = (options or {}).get("preconditions") or {}
            if (
                pre.get("resourceVersion")
                and pre["resourceVersion"] != old["metadata"]["resourceVersion"]
            ):
                raise self._conflict(res, name)
            if pre.get("uid") and pre["uid"] != old["metadata"]["uid"]:
                raise self._conflict(res, name)
            del self.objects[(res, ns, name)]
            return copy.deepcopy(self._bump("DELETED", res, copy.deepcopy(old)))

    def get(self, res: Resource, ns: str, name: str) -> Obj:
        with self.cv:
            return copy.deepcopy(self._current(res, ns, name))

    def _matching(self, res: Resource, ns: str | None) -> list[Obj]:
        return [
            o
            for (r, n, _), o in sorted(self.objects.items(), key=lambda kv: kv[0][1:])
            if r == res and (ns is None or n == ns)
        ]

    def list(self, res: Resource, ns: str | None, query: dict[str, str]) -> Obj:
        limit = int(query.get("limit") or 0)
        with self.cv:
            token = query.get("continue")
            if token:
                try:
                    state = json.loads(base64.urlsafe_b64decode(token))
                    at, items = self._snapshots[state["id"]]
                    start = int(state["start"])
                except (ValueError, KeyError):
                    raise ApiError(status(400, "BadRequest", "invalid continue token")) from None
                if at < self.compacted:  # compact(R) keeps R readable, as etcd
                    self.gone_sent += 1
                    raise ApiError(
                        status(
                            410,
                            "Expired",
                            "The provided continue parameter is too old to display a consistent "
                            "list result. You can start a new list without the continue parameter.",
                        )
                    )
            else:
                at, items, start = self.rv, copy.deepcopy(self._matching(res, ns)), 0
            page = items[start : start + limit] if limit else items[start:]
            meta: Obj = {"resourceVersion": str(at)}
            if limit and start + limit < len(items):
                snap = state["id"] if token else uuid.uuid4().hex
                self._snapshots[snap] = (at, items)
                next_token = json.dumps({"id": snap, "start": start + limit})
                meta["continue"] = base64.urlsafe_b64encode(next_token.encode()).decode()
        return {
            "kind": f"{res.kind}List",
            "apiVersion": res.api_version,
            "metadata": meta,
            "items": page,
        }

    def watch_events(
        self, res: Resource, ns: str | None, query: dict[str, str], sock: socket.socket
    ) -> Iterator[Obj]:
        """The events of one watch request, as they happen; ends at the timeout, at
        close_watches/drop_watches, or after an ERROR."""
        timeout_s = float(query.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout_s
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        rv = query.get("resourceVersion")
        with self.cv:
            self._watch_socks.add(sock)
            generation = self.generation
            if rv in (None, "", "0"):
                initial = [{"type": "ADDED", "object": o} for o in self._matching(res, ns)]
                last = self.rv
                initial = copy.deepcopy(initial)
            elif int(rv) < self.compacted:
                self.gone_sent += 1
                initial = [
                    {
                        "type": "ERROR",
                        "object": status(
                            410,
                            "Expired",
                            f"too old resource version: {rv} ({self.compacted})",
                        ),
                    }
                ]
                last = -1
            else:
                initial, last = [], int(rv)
        try:
            yield from initial
            if last < 0:
                return
            next_bookmark = time.monotonic() + self.bookmark_interval_s
            while True:
                with self.cv:
                    if self.generation != generation:
                        return
                    pending = [
                        {"type": t, "object": copy.deepcopy(o)}
                        for (erv, t, r, o) in self.log
                        if erv > last
                        and r == res
                        and (ns is None or o["metadata"].get("namespace") == ns)
                    ]
                    newest = self.rv
                    if not pending:
                        now = time.monotonic()
                        if now >= deadline:
                            return
                        if bookmarks and now >= next_bookmark:
                            next_bookmark = now + self.bookmark_interval_s
                            mark = {"resourceVersion": str(newest)}
                            obj = {
                                "kind": res.kind,
                                "apiVersion": res.api_version,
                                "metadata": mark,
                            }
                            pending = [{"type": "BOOKMARK", "object": obj}]
                        else:
                            wait = min(deadline, next_bookmark if bookmarks else deadline) - now
                            self.cv.wait(timeout=max(0.0, min(wait, 1.0)))
                            continue
                    last = newest
                yield from pending
        finally:
            with self.cv:
                self._watch_socks.discard(sock)

    def take_injected(self, is_watch: bool) -> int | None:
        with self.cv:
            for i, (code, watches_only) in enumerate(self._inject):
                if is_watch or not watches_only:
                    del self._inject[i]
                    return code
        return None

    def route(self, path: str) -> tuple[Resource, str | None, str | None, str | None]:
        """(resource, namespace or None, name, subresource) of a request path; ApiError 404."""
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["api"] and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(status(404, "NotFound", f"the server could not find {path}"))
        by_plural = {
            r.plural: r for r in self.resources if r.group == group and r.version == version
        }
        ns: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] in by_plural:
            ns, rest = rest[1], rest[2:]
        if not rest or rest[0] not in by_plural or len(rest) > 3:
            raise ApiError(status(404, "NotFound", f"the server could not find {path}"))
        res = by_plural[rest[0]]
        if ns is not None and not res.namespaced:
            raise ApiError(status(404, "NotFound", f"the server could not find {path}"))
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if sub is not None and (sub != "status" or not res.status_subresource):
            raise ApiError(status(404, "NotFound", f"the server could not find {path}"))
        return res, ns, name, sub


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog (5) drops the SYNs of a burst of watches (one per kind);
    # the clients then wait for the 1 s SYN retransmission.
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client closing is no error
            super().handle_error(request, client_address)


def _handler(api: FakeApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _json(self, code: int, obj: Obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if not raw:
                return None
            try:
                return json.loads(raw)
            except ValueError:
                raise ApiError(status(400, "BadRequest", "the body is not JSON")) from None

        def _serve(self, method: str) -> None:
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            is_watch = method == "GET" and query.get("watch") in ("true", "1")
            api.requests.append((time.monotonic(), method, url.path, query))
            try:
                body = self._body() if method in ("POST", "PUT", "PATCH", "DELETE") else None
                code = api.take_injected(is_watch)
                if code is not None:
                    reason = "InternalError" if code >= 500 else "TooManyRequests"
                    raise ApiError(status(code, reason, f"injected failure {code}"))
                if url.path == "/version":
                    return self._json(200, {"major": "1", "minor": "34", "gitVersion": "v1.34.0"})
                res, ns, name, sub = api.route(url.path)
                if method == "GET" and name is None:
                    if is_watch:
                        return self._watch(res, ns, query)
                    return self._json(200, api.list(res, ns, query))
                if method == "POST" and name is None and sub is None:
                    return self._json(201, api.create(res, ns or "", body))
                if name is None:
                    raise ApiError(status(405, "MethodNotAllowed", f"{method} needs a name"))
                nsk = ns or ""
                if method == "GET":
                    return self._json(200, api.get(res, nsk, name))
                if method == "PUT":
                    return self._json(200, api.replace(res, nsk, name, body, sub))
                if method == "PATCH":
                    ctype = self.headers.get("Content-Type", "")
                    if ctype.split(";")[0].strip() != "application/merge-patch+json":
                        raise ApiError(
                            status(415, "UnsupportedMediaType", f"{ctype} not supported")
                        )
                    return self._json(200, api.patch(res, nsk, name, body, sub))
                if method == "DELETE" and sub is None:
                    return self._json(200, api.delete(res, nsk, name, body))
                raise ApiError(status(405, "MethodNotAllowed", f"{method} not allowed here"))
            except ApiError as err:
                self._json(err.body["code"], err.body)

        def _watch(self, res: Resource, ns: str | None, query: dict[str, str]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            try:
                for event in api.watch_events(res, ns, query, self.request):
                    line = (json.dumps(event) + "\n").encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:  # dropped (drop_watches) or the client went away
                self.close_connection = True

        def do_GET(self) -> None:  # noqa: N802 - http.server's names
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def do_PUT(self) -> None:  # noqa: N802
            self._serve("PUT")

        def do_PATCH(self) -> None:  # noqa: N802
            self._serve("PATCH")

        def do_DELETE(self) -> None:  # noqa: N802
            self._serve("DELETE")

    return Handler

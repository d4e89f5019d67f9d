"""The etcd v3 datastore (Calico's etcd mode): the Datastore protocol over a real etcd.

Key layout: ``/tabby/v1/<Kind>/<namespace or _>/<name>`` (``_`` for cluster-scoped kinds) holds
the object as compact JSON *without* ``metadata.resourceVersion``: that is the key's
``mod_revision``, filled in on every read, as kube-apiserver does with its etcd keys.

Invariants:
- etcd's revision is the global revision. Every write is ONE etcd transaction, so an apply of N
  objects commits all of them at one revision (the embedded store gives them consecutive ones;
  the contract only promises increasing revisions and resourceVersion == the revision of the
  object's last write).
- Writes are optimistic compare-and-swap: an attempt reads what it needs, computes (validation
  happened before the first attempt; Service admission, the pod IP check, outcomes), then commits
  with compares on everything it read: each key's ``mod_revision`` (0 when absent), and for each
  prefix it scanned (Services for admission, IPPools for the pod IP check) "no key of the prefix
  written after the scan". A failed compare retries the attempt from fresh reads, so two writers
  (threads, processes or hosts) never allocate the same cluster IP or node port. Deleting a
  Service only frees values, so a deletion racing an allocation can only make it conservative;
  IPPools are few and also compared key by key, so a pool deleted under a pod write is seen.
- ``watch`` yields every change of ``/tabby/v1/`` above the revision given, in revision order (the
  events of one transaction share its revision), DELETED carrying the object's last state (the
  watch asks for ``prev_kv``). History below etcd's compaction revision raises Compacted (relist).
  A broken stream (etcd restarted) is resumed from the revision after the last delivered event,
  with backoff; after ``reconnect_timeout_s`` without etcd it raises Unavailable.

Why a loop thread: etcd3aio (the maintained client, see notes/tooling.md) is asyncio-only, while
the protocol is synchronous and used from plain threads (agent, CLI, CNI, lab). One daemon thread
per process runs an event loop that every EtcdDatastore shares (grpc.aio channels are bound to
their loop, and the lab and CLI open datastores freely); sync calls are submitted to it with
``run_coroutine_threadsafe``. The watch stream is driven by hand on etcd3aio's stub rather than
by its ``WatchService.watch``, which resumes after a disconnect from the last *header* revision
+ 1 and so would skip history a catch-up stream had not delivered yet.

etcd limits a transaction to ``--max-txn-ops`` operations (128 by default) and a request to
``--max-request-bytes``: an apply is one transaction, so raise them for large applies (the lab
and the tests start etcd with generous values).
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import copy
import ipaddress
import json
import os
import queue
import random
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

# gRPC's fork handlers only log "skipping fork() handlers" when a process with a live channel
# forks (the lab spawns agents and pods): our children exec at once and never use gRPC.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc  # noqa: E402 - after the environment it reads
import grpc.aio  # noqa: E402
from etcd3aio import EtcdError, prefix_range_end  # noqa: E402
from etcd3aio._protobuf import (  # noqa: E402
    Compare,
    RequestOp,
    WatchCreateRequest,
    WatchRequest,
    WatchStub,
)
from etcd3aio.kv import KVService  # noqa: E402

from tabby.datastore import services
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
from tabby.datastore.meta import check_pod_ips, pods_with_ips, same, stamp_metadata
from tabby.model import Kind, UnknownKind, ValidationError, lookup, validate
from tabby.model.patch import merge_patch
from tabby.model.validate import ref

ROOT = "/tabby/v1/"
CLUSTER_SCOPED = "_"  # the namespace segment of cluster-scoped kinds
RPC_TIMEOUT_S = 10.0  # one etcd call
CALL_TIMEOUT_S = 60.0  # one datastore call, CAS retries included
LIST_PAGE = 1000  # keys per range request of a list (all pages read at one revision)
COMPACTED_READ = "required revision has been compacted"  # etcd's error for such a read
CAS_ATTEMPTS = 64
STOP_CHECK_S = 0.25  # how often a blocked watcher looks at ``stop``; changes wake it at once
RECONNECT_TIMEOUT_S = 30.0
_RECONNECT_BACKOFF_S = (0.1, 2.0)
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", -1),  # a page of big objects may exceed 4 MiB
    ("grpc.max_send_message_length", -1),  # etcd's --max-request-bytes is the real bound
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
_PUT, _DELETE = 0, 1  # mvccpb.Event.EventType

T = TypeVar("T")


# --- the shared event loop -----------------------------------------------------------------------


def _close_channel(loop: asyncio.AbstractEventLoop, channel: grpc.aio.Channel) -> None:
    """Finalizer of an EtcdDatastore nobody closed: close its channel on the loop."""
    if not loop.is_closed():
        loop.call_soon_threadsafe(lambda: loop.create_task(channel.close()))


# --- keys and values -----------------------------------------------------------------------------


def object_key(kind: Kind, name: str, namespace: str | None) -> str:
    ns = (namespace or "default") if kind.namespaced else CLUSTER_SCOPED
    return f"{ROOT}{kind.name}/{ns}/{name}"


def kind_prefix(kind: Kind, namespace: str | None = None) -> str:
    if kind.namespaced and namespace:
        return f"{ROOT}{kind.name}/{namespace}/"
    return f"{ROOT}{kind.name}/"


def _key_of(obj: Obj) -> str:
    meta = obj["metadata"]
    return object_key(lookup(obj["kind"]), meta["name"], meta.get("namespace"))


def _encode(obj: Obj) -> bytes:
    meta = {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}
    return json.dumps({**obj, "metadata": meta}, separators=(",", ":")).encode()


def _decode(value: bytes, revision: int) -> Obj:
    obj: Obj = json.loads(value)
    obj["metadata"]["resourceVersion"] = str(revision)
    return obj


def _ref_of_key(key: str) -> str:
    kind, ns, name = key[len(ROOT) :].split("/", 2)
    return f"{kind} {name if ns == CLUSTER_SCOPED else f'{ns}/{name}'}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- one write attempt ---------------------------------------------------------------------------


class _Attempt:
    """One optimistic try of a write: records what it read, for the commit's compares."""

    def __init__(self, kv: KVService, service_cidr: str) -> None:
        self.kv = kv
        self.service_cidr = service_cidr
        self.seen: dict[str, int] = {}  # key -> mod_revision read (0: absent)
        self.cache: dict[str, Obj | None] = {}  # key -> what this attempt sees (its own writes)
        self.scanned: dict[str, int] = {}  # prefix -> revision of the scan
        self.ops: dict[str, RequestOp] = {}  # key -> its one write (etcd: one op per key)
        self.written: dict[str, Obj] = {}
        self._services: services.ServiceAllocator | None = None

    async def prefetch(self, keys: Sequence[str]) -> None:
        todo = sorted({k for k in keys if k not in self.cache})
        await asyncio.gather(*(self.get(k) for k in todo))

    async def get(self, key: str) -> Obj | None:
        if key not in self.cache:
            resp = await self.kv.get(key, timeout=RPC_TIMEOUT_S)
            if resp.kvs:
                kv = resp.kvs[0]
                self.seen[key] = int(kv.mod_revision)
                self.cache[key] = _decode(kv.value, kv.mod_revision)
            else:
                self.seen[key] = 0
                self.cache[key] = None
        obj = self.cache[key]
        return copy.deepcopy(obj) if obj is not None else None

    async def scan(self, prefix: str, compare_each: bool = False) -> list[Obj]:
        """Every object under ``prefix``; the commit fails if one is written meanwhile (and,
        with ``compare_each``, if one is deleted)."""
        resp = await self.kv.get(prefix, prefix_range_end(prefix), timeout=RPC_TIMEOUT_S)
        self.scanned[prefix] = int(resp.header.revision)
        out = []
        for kv in resp.kvs:
            key = kv.key.decode()
            if compare_each:
                self.seen.setdefault(key, int(kv.mod_revision))
            out.append(_decode(kv.value, kv.mod_revision))
        return out

    def put(self, obj: Obj, old: Obj | None) -> Obj:
        meta = obj["metadata"]
        stamp_metadata(obj, old)
        meta.pop("resourceVersion", None)  # stamped with the commit's revision
        key = _key_of(obj)
        self.ops[key] = KVService.txn_op_put(key, _encode(obj))
        self.written[key] = obj
        self.cache[key] = copy.deepcopy(obj)
        return obj

    def remove(self, key: str) -> None:
        self.ops[key] = KVService.txn_op_delete(key)
        self.cache[key] = None

    async def admit(self, obj: Obj, old: Obj | None) -> Obj:
        """Service admission (datastore/services.py) against every stored Service."""
        if obj["kind"] != "Service":
            return obj
        if self._services is None:
            stored = await self.scan(kind_prefix(lookup("Service")))
            # This attempt's own earlier writes replace what was scanned.
            mine = {k: o for k, o in self.written.items() if o["kind"] == "Service"}
            stored = [s for s in stored if _key_of(s) not in mine] + list(mine.values())
            self._services = services.ServiceAllocator(self.service_cidr, stored)
        return self._services.admit(obj, old)

    async def check_pod_ips(self) -> None:
        """Every written Pod's IPs lie in some IPPool, when any IPPool exists."""
        pods = pods_with_ips(self.written.values())
        if not pods:
            return
        stored = await self.scan(kind_prefix(lookup("IPPool")), compare_each=True)
        by_key = {_key_of(p): p for p in stored}
        by_key.update({k: o for k, o in self.written.items() if o["kind"] == "IPPool"})
        check_pod_ips(pods, by_key.values())

    def compares(self) -> list[Compare]:
        out = [
            KVService.txn_compare_create_revision(key, 0)
            if rev == 0
            else _compare_mod(key, rev, Compare.EQUAL)
            for key, rev in sorted(self.seen.items())
        ]
        for prefix, rev in sorted(self.scanned.items()):
            out.append(_compare_mod(prefix, rev + 1, Compare.LESS, prefix_range_end(prefix)))
        return out

    def stamp(self, revision: int) -> None:
        for obj in self.written.values():
            obj["metadata"]["resourceVersion"] = str(revision)


def _compare_mod(key: str, revision: int, result: int, range_end: bytes | None = None) -> Compare:
    compare = Compare(result=result, target=Compare.MOD, key=key.encode(), mod_revision=revision)
    if range_end is not None:
        compare.range_end = range_end
    return compare


# --- the datastore -------------------------------------------------------------------------------


class EtcdDatastore:
    """The Datastore protocol over etcd v3 (see the module docstring)."""

    def __init__(
        self,
        target: str,
        service_cidr: str = services.DEFAULT_SERVICE_CIDR,
        reconnect_timeout_s: float = RECONNECT_TIMEOUT_S,
        name: str | None = None,
    ) -> None:
        """``target``: a gRPC target, ``HOST:PORT`` or ``unix:/path``. ``service_cidr`` is
        kube-apiserver's --service-cluster-ip-range: every writer of one etcd passes the same."""
        self.target = _grpc_target(target)
        self.name = name or f"etcd://{target}"
        try:
            nets = services.parse_service_cidrs(service_cidr)
        except ValueError as err:
            raise DatastoreError(f"datastore {self.name}: service CIDR: {err}") from None
        self.service_cidr = ",".join(str(n) for n in nets)
        self.reconnect_timeout_s = reconnect_timeout_s
        self._watch_down: str | None = None  # why the watch stream is down (retrying), or None
        self._loop = shared_loop()
        self._channel, self._kv, self._watch_stub = self._call(self._open())
        weakref.finalize(self, _close_channel, self._loop, self._channel)

    async def _open(self) -> tuple[grpc.aio.Channel, KVService, Any]:
        channel = grpc.aio.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        return channel, KVService(channel), WatchStub(channel)

    # --- plumbing ------------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the shared loop; etcd and transport failures become one line."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(CALL_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise Unavailable(
                f"datastore {self.name}: no answer in {CALL_TIMEOUT_S:.0f} s"
            ) from None
        except EtcdError as err:
            raise Unavailable(f"datastore {self.name}: {_one_line(str(err))}") from None
        except grpc.aio.AioRpcError as err:
            raise self._rpc_error(err) from None
        except (TimeoutError, OSError) as err:
            raise Unavailable(
                f"datastore {self.name}: {_one_line(str(err)) or 'timeout'}"
            ) from None

    def _rpc_error(self, err: grpc.aio.AioRpcError) -> DatastoreError:
        detail = _one_line(err.details() or "")
        if err.code() in _TRANSIENT:
            return Unavailable(f"datastore {self.name}: {err.code().name} ({detail})")
        if COMPACTED_READ in detail:  # a paged list's revision was compacted under it
            return Compacted(f"datastore {self.name}: {detail}; relist and watch again")
        if "too many operations" in detail or "request is too large" in detail:
            detail += " (one apply is one etcd transaction: raise etcd's --max-txn-ops"
            detail += " / --max-request-bytes, or apply in parts)"
        return DatastoreError(f"datastore {self.name}: {err.code().name}: {detail}")

    def _write(self, body: Callable[[_Attempt], Awaitable[T]]) -> tuple[T, int]:
        """Run ``body`` in compare-and-swap attempts until one commits; (its result, revision)."""

        async def attempts() -> tuple[T, int]:
            for n in range(CAS_ATTEMPTS):
                attempt = _Attempt(self._kv, self.service_cidr)
                result = await body(attempt)
                resp = await self._kv.txn(
                    attempt.compares(), list(attempt.ops.values()), timeout=RPC_TIMEOUT_S
                )
                if resp.succeeded:
                    attempt.stamp(int(resp.header.revision))
                    return result, int(resp.header.revision)
                await asyncio.sleep(random.uniform(0, 0.002 * (n + 1)))  # de-synchronise writers
            raise Conflict(
                f"datastore {self.name}: gave up after {CAS_ATTEMPTS} conflicting attempts "
                "(heavy write contention): retry"
            )

        return self._call(attempts())

    # --- reads ---------------------------------------------------------------------------------

    def revision(self) -> int:
        async def read() -> int:
            resp = await self._kv.get(ROOT, count_only=True, timeout=RPC_TIMEOUT_S)
            return int(resp.header.revision)

        return self._call(read())

    def list(self, kind: str, namespace: str | None = None) -> tuple[list[Obj], int]:
        prefix = kind_prefix(lookup(kind), namespace)

        async def read() -> tuple[list[Obj], int]:
            out: list[Obj] = []
            start, end, at = prefix.encode(), prefix_range_end(prefix), 0
            while True:  # pages, all at the first page's revision: one consistent snapshot
                resp = await self._kv.get(
                    start, end, revision=at, limit=LIST_PAGE, timeout=RPC_TIMEOUT_S
                )
                at = at or int(resp.header.revision)
                out.extend(_decode(kv.value, kv.mod_revision) for kv in resp.kvs)
                if not resp.more or not resp.kvs:
                    return out, at
                start = resp.kvs[-1].key + b"\0"

        return self._call(read())

    def iter_list(self, kind: str) -> Iterator[Obj]:
        """list(kind) one page at a time (StreamingList): range reads of LIST_PAGE keys, all at
        the first page's revision, decoded as they are handed over. etcd compacting that
        revision in the middle raises Compacted: the caller has seen part of the list and
        starts again, as after a compacted watch."""
        prefix = kind_prefix(lookup(kind))
        start, end, at = prefix.encode(), prefix_range_end(prefix), 0
        while True:
            resp = self._call(
                self._kv.get(start, end, revision=at, limit=LIST_PAGE, timeout=RPC_TIMEOUT_S)
            )
            at = at or int(resp.header.revision)
            for kv in resp.kvs:
                yield _decode(kv.value, kv.mod_revision)
            if not resp.more or not resp.kvs:
                return
            start = resp.kvs[-1].key + b"\0"

    def get(self, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        key = object_key(lookup(kind), name, namespace)

        async def read() -> Obj | None:
            resp = await self._kv.get(key, timeout=RPC_TIMEOUT_S)
            return _decode(resp.kvs[0].value, resp.kvs[0].mod_revision) if resp.kvs else None

        return self._call(read())

    # --- writes --------------------------------------------------------------------------------

    def apply_with_outcomes(self, objs: Sequence[Obj]) -> tuple[int, builtins.list[Outcome]]:
        valid = [validate(o) for o in objs]  # all validated before anything is written

        async def body(txn: _Attempt) -> builtins.list[Outcome]:
            outcomes: builtins.list[Outcome] = []
            await txn.prefetch([_key_of(o) for o in valid])
            for obj in copy.deepcopy(valid):  # a retried attempt starts from the input again
                old = await txn.get(_key_of(obj))
                if old is not None and "status" not in obj and "status" in old:
                    obj["status"] = old["status"]  # apply does not clear status, as kubectl's
                obj = await txn.admit(obj, old)  # before the comparison: it fills allocated fields
                if old is not None and same(obj, old):
                    outcomes.append("unchanged")
                    continue
                txn.put(obj, old)
                outcomes.append("configured" if old else "created")
            await txn.check_pod_ips()
            return outcomes

        outcomes, revision = self._write(body)
        return revision, outcomes

    def apply(self, objs: Sequence[Obj]) -> int:
        return self.apply_with_outcomes(objs)[0]

    def create(self, obj: Obj) -> Obj:
        valid = validate(obj)

        async def body(txn: _Attempt) -> Obj:
            new = copy.deepcopy(valid)
            if await txn.get(_key_of(new)) is not None:
                raise AlreadyExists(f"{ref(new)} already exists")
            txn.put(await txn.admit(new, None), None)
            await txn.check_pod_ips()
            return new

        return self._write(body)[0]

    def update(self, obj: Obj) -> Obj:
        valid = validate(obj)
        version = valid["metadata"].get("resourceVersion")
        if not version:
            raise Conflict(f"{ref(valid)}: metadata.resourceVersion is required to update")

        async def body(txn: _Attempt) -> Obj:
            new = copy.deepcopy(valid)
            old = await txn.get(_key_of(new))
            if old is None:
                raise NotFound(f"{ref(new)} not found")
            if old["metadata"]["resourceVersion"] != version:
                raise Conflict(
                    f"{ref(new)} has changed (resourceVersion {version} is no longer current): "
                    "read it again and retry"
                )
            txn.put(await txn.admit(new, old), old)
            await txn.check_pod_ips()
            return new

        return self._write(body)[0]

    def patch(self, kind: str, name: str, namespace: str | None, patch: Obj) -> Obj:
        if not isinstance(patch, dict):
            raise ValidationError("a merge patch must be a JSON object")
        key = object_key(lookup(kind), name, namespace)

        async def body(txn: _Attempt) -> Obj:
            old = await txn.get(key)
            if old is None:
                raise NotFound(f"{_ref_of_key(key)} not found")
            version = patch.get("metadata", {}).get("resourceVersion")
            if version is not None and version != old["metadata"]["resourceVersion"]:
                raise Conflict(f"{ref(old)} has changed (resourceVersion {version} is stale)")
            merged = merge_patch(copy.deepcopy(old), copy.deepcopy(patch))
            new = validate(services.drop_type_dependent(merged, old))
            if _key_of(new) != key:
                raise ValidationError(f"{ref(old)}: a patch cannot change kind, name or namespace")
            new = await txn.admit(new, old)
            if same(new, old):
                return old
            txn.put(new, old)
            await txn.check_pod_ips()
            return new

        return self._write(body)[0]

    def delete(self, kind: str, name: str, namespace: str | None = None) -> int:
        key = object_key(lookup(kind), name, namespace)

        async def body(txn: _Attempt) -> None:
            if await txn.get(key) is None:
                raise NotFound(f"{_ref_of_key(key)} not found")
            txn.remove(key)

        return self._write(body)[1]

    def compact(self, revision: int) -> None:
        """Drop the history below ``revision`` (etcd's compaction; watches from older revisions
        then raise Compacted). Production etcds compact themselves (--auto-compaction-*)."""
        self._call(self._kv.compact(revision, physical=True, timeout=RPC_TIMEOUT_S))

    # --- watch ---------------------------------------------------------------------------------

    def watch_problem(self) -> str | None:
        return self._watch_down

    def watch(self, since_revision: int, stop: threading.Event | None = None) -> Iterator[Event]:
        """Every change above ``since_revision``, in order; blocks on the etcd watch stream."""
        out: queue.Queue[builtins.list[Event] | BaseException] = queue.Queue()
        pump = asyncio.run_coroutine_threadsafe(self._pump(since_revision + 1, out), self._loop)
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
            pump.cancel()

    async def _pump(
        self, revision: int, out: queue.Queue[builtins.list[Event] | BaseException]
    ) -> None:
        """Feed ``out`` from etcd watch streams, resuming after the last delivered event."""
        backoff_s, down_since = _RECONNECT_BACKOFF_S[0], 0.0
        while True:
            try:
                async for resp in self._stream(revision):
                    backoff_s, down_since = _RECONNECT_BACKOFF_S[0], 0.0
                    self._watch_down = None
                    if resp.compact_revision > 0:
                        out.put(
                            Compacted(
                                f"revision {revision - 1} has been compacted (oldest available: "
                                f"{resp.compact_revision}); relist and watch again"
                            )
                        )
                        return
                    if resp.canceled:
                        reason = _one_line(resp.cancel_reason) or "canceled by etcd"
                        out.put(DatastoreError(f"datastore {self.name}: watch: {reason}"))
                        return
                    events = [e for e in map(_event, resp.events) if e is not None]
                    if resp.events:
                        revision = int(resp.events[-1].kv.mod_revision) + 1
                    if events:
                        out.put(events)
                problem = "watch stream closed by etcd"
            except grpc.aio.AioRpcError as err:
                if err.code() not in _TRANSIENT:
                    out.put(self._rpc_error(err))
                    return
                problem = f"{err.code().name} ({_one_line(err.details() or '')})"
            except Exception as err:  # noqa: BLE001 - handed to the watcher's thread
                out.put(DatastoreError(f"datastore {self.name}: watch: {_one_line(str(err))}"))
                return
            now = time.monotonic()
            down_since = down_since or now
            self._watch_down = f"watch: {problem} (retrying for {now - down_since:.0f} s)"
            if now - down_since > self.reconnect_timeout_s:
                out.put(Unavailable(f"datastore {self.name}: watch: {problem}"))
                return
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, _RECONNECT_BACKOFF_S[1])

    async def _stream(self, revision: int) -> AsyncIterator[Any]:
        """One etcd watch stream over ROOT from ``revision``."""

        async def requests() -> AsyncIterator[Any]:
            create = WatchCreateRequest(
                key=ROOT.encode(),
                range_end=prefix_range_end(ROOT),
                start_revision=revision,
                prev_kv=True,
            )
            yield WatchRequest(create_request=create)
            await asyncio.Event().wait()  # keep the request side open: closing ends the watch

        call = self._watch_stub.Watch(requests())
        try:
            async for resp in call:
                yield resp
        finally:
            call.cancel()

    def close(self) -> None:
        channel = self._channel
        try:
            self._call(channel.close())
        except DatastoreError:
            pass


def _grpc_target(target: str) -> str:
    """``HOST:PORT[,HOST:PORT...]`` or ``unix:/path`` as a gRPC target: IPv4 literals use the
    ipv4 resolver (several endpoints, round robin), names the DNS one."""
    if target.startswith("unix:"):
        return target
    hosts = [endpoint.rpartition(":")[0] for endpoint in target.split(",")]
    try:
        for host in hosts:
            ipaddress.IPv4Address(host)
    except ValueError:
        return f"dns:///{target}"
    return f"ipv4:{target}"


def _event(ev: Any) -> Event | None:
    """A datastore Event from an etcd one; None for keys that are not objects of a known kind."""
    key = ev.kv.key.decode()
    try:
        kind_name, ns, name = key[len(ROOT) :].split("/", 2)
        kind = lookup(kind_name)
    except (ValueError, UnknownKind):
        return None
    revision = int(ev.kv.mod_revision)
    type_: EventType
    if ev.type == _PUT:
        type_ = "ADDED" if ev.kv.create_revision == ev.kv.mod_revision else "MODIFIED"
        return Event(type_, kind.name, _decode(ev.kv.value, revision), revision)
    if ev.type != _DELETE:
        return None
    if ev.prev_kv.key:
        obj = _decode(ev.prev_kv.value, revision)
    else:  # no previous value (should not happen: we ask for it): name what was deleted
        meta = {"name": name, **({"namespace": ns} if ns != CLUSTER_SCOPED else {})}
        obj = {"apiVersion": kind.api_version, "kind": kind.name, "metadata": meta}
        obj["metadata"]["resourceVersion"] = str(revision)
    return Event("DELETED", kind.name, obj, revision)

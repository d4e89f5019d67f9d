"""The fan-out client: the Datastore protocol served by ``tabby typha`` instead of the datastore.

``typha://HOST:PORT?datastore=<url>`` (the real datastore's URL, percent-encoded) reads through
the fan-out and writes to the real datastore. The agent cannot tell it apart from a datastore:
``revision``, ``list`` and ``watch`` answer from a local replica that the fan-out keeps in step
(snapshot, then deltas); ``get`` and every write go to the real datastore, so read-modify-write
loops (IPAM's compare-and-swap on blocks) see every committed write. Without ``datastore=`` the
client is read-only and ``get`` answers from the replica. ``consistent(ds)`` is the store to read
from when a read must see every committed write: IPAM uses it, as calico-node's start-up talks to
the datastore while Felix reads through Typha.

Invariants:
- The replica (objects, revision, recent events) changes only as whole frames, under its lock:
  ``list`` at revision R followed by ``watch(R)`` sees every change after R exactly once, as
  with a datastore.
- A reconnect (the server restarted, or dropped us for being slow) brings a fresh snapshot; the
  replica bridges it as the diff against what it had (ADDED/MODIFIED/DELETED at the snapshot's
  revision), so a watch goes on without a relist. Only a snapshot older than the replica (the
  datastore went back in time) breaks the history: watchers raise Compacted and relist.
- The replica keeps the newest ``history`` events; a watch from before them raises Compacted.
- The replica keeps every object encoded, as its frame carried it (the JSON bytes of the
  object, cut out of the frame undecoded; only kind, name, namespace and resourceVersion are
  read): 20,000 Services and slices decoded would be ~100 MB in each agent, encoded they are
  ~20 MB. Reads decode: ``iter_list`` one object at a time (StreamingList: the agent's service
  index packs each as it comes, so the list is never decoded whole), ``list`` and ``get`` the
  objects they return, which are the caller's to keep; the recent events (``history``) hold
  decoded objects.
- The server is considered dead after DEAD_AFTER_HEARTBEATS heartbeats of silence: the client
  reconnects with jittered backoff; after ``reconnect_timeout_s`` without a server, reads and
  watches raise Unavailable.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import random
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from typing import cast
from urllib.parse import parse_qsl, quote

import msgspec

from tabby.datastore.api import (
    Compacted,
    Datastore,
    DatastoreError,
    Event,
    EventType,
    Obj,
    Outcome,
    Unavailable,
)
from tabby.datastore.typha_wire import (
    DEAD_AFTER_HEARTBEATS,
    HANDSHAKE_TIMEOUT_S,
    VERSIONS,
    ProtocolError,
    Refused,
    frame,
    hello,
    read_body,
    read_frame,
)
from tabby.model import lookup

log = logging.getLogger("tabby.typha.client")
PREFIX = "typha://"
DEFAULT_HISTORY = 4096  # events kept for watch(since): covers the agent's list -> watch gap
CONNECT_TIMEOUT_S = 30.0  # the first snapshot must arrive within this, or reads raise Unavailable
RECONNECT_TIMEOUT_S = 60.0
BACKOFF_S = (0.1, 2.0)
STOP_CHECK_S = 0.25  # how often a blocked watch looks at ``stop``; changes wake it at once


class _Meta(msgspec.Struct):
    name: str
    namespace: str | None = None
    resourceVersion: str | None = None  # noqa: N815 - the wire's name


class _Head(msgspec.Struct):
    """What the replica reads of an object: the rest stays encoded."""

    kind: str
    metadata: _Meta


class _WireEvent(msgspec.Struct):
    type: str
    kind: str
    rev: int
    obj: msgspec.Raw


class _Frame(msgspec.Struct):
    """A frame after the handshake (typha_wire's table); objects are left encoded."""

    t: str
    rev: int = 0
    objs: list[msgspec.Raw] = msgspec.field(default_factory=list)
    events: list[_WireEvent] = msgspec.field(default_factory=list)
    reason: str = ""


_frame_decoder = msgspec.json.Decoder(_Frame)
_head_decoder = msgspec.json.Decoder(_Head)
_obj_decoder = msgspec.json.Decoder(dict[str, object])


def _head(data: bytes) -> _Head:
    try:
        return _head_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise ProtocolError(f"an object without kind or metadata.name: {err}") from None


def _decode(data: bytes) -> Obj:
    return _obj_decoder.decode(data)


class Replica:
    """What one client knows: every served object (encoded), the revision it is at, recent
    events (decoded)."""

    def __init__(self, history: int = DEFAULT_HISTORY) -> None:
        self.cond = threading.Condition()
        self.objects: dict[str, dict[tuple[str, str], bytes]] = defaultdict(dict)
        self.kinds: tuple[str, ...] = ()  # what the server serves (from its welcome)
        self.revision = 0
        self.synced = False  # a first snapshot is in
        self.connected = False  # a snapshot is in on the current connection
        self.down_since: float | None = time.monotonic()
        self.epoch = 0  # bumped when the history cannot be continued: watchers must relist
        self.floor = 0  # watch(since) needs since >= floor
        self.keep = history
        self.history: deque[Event] = deque()
        self.failed: DatastoreError | None = None  # refused: retrying will not help
        self.bytes_received = 0
        self.snapshots = 0
        self._staging: dict[str, dict[tuple[str, str], bytes]] | None = None

    # --- applying frames (the connection's task) ---------------------------------------------

    def on_frame(self, body: bytes) -> str:
        """Apply one frame's body (JSON, undecoded); returns its message type."""
        try:
            msg = _frame_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            raise ProtocolError(f"a frame does not decode: {err}") from None
        t = msg.t
        if t == "events":
            self._on_events(msg.events)
        elif t == "bookmark":
            with self.cond:
                if self.connected:
                    self.revision = max(self.revision, msg.rev)
        elif t == "snapshot":
            staging = self._staging if self._staging is not None else defaultdict(dict)
            for raw in msg.objs:
                data = bytes(raw)  # a copy: the frame's buffer is not kept alive
                head = _head(data)
                staging[head.kind][head.metadata.namespace or "", head.metadata.name] = data
            self._staging = staging
        elif t == "synced":
            self._on_synced(msg.rev, self._staging or defaultdict(dict))
            self._staging = None
        elif t == "bye":
            log.info("typha closes the connection: %s", msg.reason)
        else:
            raise ProtocolError(f"unexpected message {t!r}")
        return t

    def _on_events(self, events: list[_WireEvent]) -> None:
        # The hot path: every client runs it for every event (locals on purpose).
        if not self.connected:
            raise ProtocolError("events before the snapshot")
        objects, keep, history = self.objects, self.keep, self.history
        with self.cond:
            revision = self.revision
            for e in events:
                type_, kind, rev = e.type, e.kind, e.rev
                data = bytes(e.obj)
                meta = _head(data).metadata
                key = (meta.namespace or "", meta.name)
                if type_ == "DELETED":
                    objects[kind].pop(key, None)
                elif type_ == "ADDED" or type_ == "MODIFIED":
                    objects[kind][key] = data
                else:
                    raise ProtocolError(f"unknown event type {type_!r}")
                if rev > revision:
                    revision = rev
                if keep:
                    history.append(Event(cast(EventType, type_), kind, _decode(data), rev))
            self.revision = revision
            if keep:
                self._trim()
            else:
                self.floor = revision
            self.cond.notify_all()

    def _on_synced(self, rev: int, fresh: dict[str, dict[tuple[str, str], bytes]]) -> None:
        with self.cond:
            self.snapshots += 1
            if not self.synced:
                self.floor = rev
            elif rev < self.revision:  # the datastore went back in time: history is broken
                log.warning(
                    "typha snapshot at %d is older than ours (%d): relist", rev, self.revision
                )
                self.epoch += 1
                self.history.clear()
                self.floor = rev
            else:  # a reconnect: bridge the gap with the diff, at the snapshot's revision
                for kind in set(self.objects) | set(fresh):
                    old, new = self.objects.get(kind, {}), fresh.get(kind, {})
                    for key, data in old.items():
                        if key not in new:
                            self._remember(Event("DELETED", kind, _decode(data), rev))
                    for key, data in new.items():
                        before = old.get(key)
                        if before is None:
                            self._remember(Event("ADDED", kind, _decode(data), rev))
                        elif _version(before) != _version(data):
                            self._remember(Event("MODIFIED", kind, _decode(data), rev))
                self._trim()
            self.objects = fresh
            self.revision = max(rev, self.revision) if self.synced else rev
            self.synced = self.connected = True
            self.down_since = None
            self.cond.notify_all()

    def _remember(self, ev: Event) -> None:
        if self.keep:
            self.history.append(ev)
        else:
            self.floor = ev.revision

    def _trim(self) -> None:
        while len(self.history) > self.keep:
            self.floor = self.history.popleft().revision

    def mark_down(self) -> None:
        with self.cond:
            if self.connected or self.down_since is None:
                self.down_since = time.monotonic()
            self.connected = False
            self._staging = None
            self.cond.notify_all()

    def fail(self, err: DatastoreError) -> None:
        with self.cond:
            self.failed = err
            self.cond.notify_all()

    # --- reading (any thread) ----------------------------------------------------------------

    def versions(self) -> dict[tuple[str, str, str], str]:
        """(kind, namespace, name) -> resourceVersion of every object: a state to compare."""
        with self.cond:
            return {
                (kind, *key): _version(data)
                for kind, objs in self.objects.items()
                for key, data in objs.items()
            }


async def follow(
    host: str,
    port: int,
    replica: Replica,
    name: str = "",
    kinds: tuple[str, ...] = (),
    versions: tuple[int, ...] = VERSIONS,
    backoff_s: tuple[float, float] = BACKOFF_S,
) -> None:
    """Keep ``replica`` in step with the fan-out at host:port until cancelled: connect, hello,
    snapshot, deltas; on a lost or silent connection, reconnect (jittered backoff) and resync.
    Returns when the server refuses us (``replica.failed`` says why)."""
    delay = backoff_s[0]
    while True:
        got_snapshot = False
        try:
            await _session(host, port, replica, name, kinds, versions)
            problem = "closed by the server"
        except Refused as err:
            log.error("%s", err)
            replica.fail(err)
            return
        except TimeoutError:
            problem = "silent for too long"
        except (OSError, EOFError, ProtocolError, asyncio.IncompleteReadError) as err:
            problem = str(err) or type(err).__name__
        finally:
            got_snapshot = replica.connected
            replica.mark_down()
        if got_snapshot:
            delay = backoff_s[0]
        log.debug("typha %s:%d: %s; reconnecting", host, port, problem)
        await asyncio.sleep(random.uniform(delay / 2, delay))
        delay = min(delay * 2, backoff_s[1])


async def _session(
    host: str,
    port: int,
    replica: Replica,
    name: str,
    kinds: tuple[str, ...],
    versions: tuple[int, ...],
) -> None:
    # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation that
    # lands as the read completes, and close() relies on cancelling this task.
    async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
        reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(frame(hello(name, kinds, versions)))
        async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
            await writer.drain()
            msg, size = await read_frame(reader)
        if msg["t"] == "refused":
            raise Refused(f"typha {host}:{port} refused this client: {msg.get('reason', '')}")
        if msg["t"] != "welcome" or msg.get("version") not in versions:
            raise ProtocolError(f"typha {host}:{port}: expected a welcome, got {msg['t']!r}")
        replica.kinds = tuple(msg.get("kinds", ()))
        replica.bytes_received += size
        dead_after_s = DEAD_AFTER_HEARTBEATS * float(msg.get("heartbeat_s", 5.0))
        while True:
            async with asyncio.timeout(dead_after_s):
                body = await read_body(reader)
            replica.bytes_received += 4 + len(body)
            if replica.on_frame(body) == "bye":
                return
    finally:
        writer.close()


class TyphaDatastore:
    """The Datastore protocol over a fan-out (see the module docstring)."""

    def __init__(
        self,
        host: str,
        port: int,
        direct_url: str | None = None,
        name: str = "",
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        reconnect_timeout_s: float = RECONNECT_TIMEOUT_S,
        history: int = DEFAULT_HISTORY,
        versions: tuple[int, ...] = VERSIONS,
    ) -> None:
        self.address = f"{host}:{port}"
        self.direct_url = direct_url
        self.connect_timeout_s = connect_timeout_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self.replica = Replica(history)
        self._direct: Datastore | None = None
        self._direct_lock = threading.Lock()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(
            follow(host, port, self.replica, name, versions=versions)
        )
        self._thread = threading.Thread(target=self._run, name="typha-client", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._task)
        self._loop.close()

    # --- the real datastore, for get and writes ----------------------------------------------

    def direct(self) -> Datastore | None:
        """The real datastore behind the fan-out (opened on first use), or None if not given."""
        if self.direct_url is None:
            return None
        with self._direct_lock:
            if self._direct is None:
                from tabby.datastore import open_datastore

                self._direct = open_datastore(self.direct_url)
            return self._direct

    def _writer(self) -> Datastore:
        ds = self.direct()
        if ds is None:
            raise DatastoreError(
                f"typha://{self.address} is read-only: add ?datastore=<url> to write through"
            )
        return ds

    # --- reads ---------------------------------------------------------------------------------

    def _check(self, waited_s: float = 0.0) -> None:
        """Raise what a read should raise now (under the replica's lock)."""
        r = self.replica
        if self._closed:
            raise DatastoreError(f"typha://{self.address}: closed")
        if r.failed is not None:
            raise r.failed
        if r.down_since is not None:
            down_s = time.monotonic() - r.down_since
            limit_s = self.reconnect_timeout_s if r.synced else self.connect_timeout_s
            if down_s > limit_s or (not r.synced and waited_s > limit_s):
                raise Unavailable(f"typha://{self.address}: no server for {down_s:.0f} s")

    def _ready(self) -> None:
        """Wait for the first snapshot."""
        r = self.replica
        started = time.monotonic()
        with r.cond:
            while True:
                self._check(time.monotonic() - started)
                if r.synced:
                    return
                r.cond.wait(STOP_CHECK_S)

    def revision(self) -> int:
        self._ready()
        return self.replica.revision

    def _encoded(self, kind: str, namespace: str | None) -> tuple[builtins.list[bytes], int]:
        """The encoded objects of ``kind`` in list order, and the revision: one consistent
        read (references only: the replica's bytes are never changed in place)."""
        k = lookup(kind)
        self._ready()
        r = self.replica
        with r.cond:
            if k.name not in r.kinds:
                raise DatastoreError(
                    f"typha://{self.address} does not serve {k.name} "
                    f"(it serves {', '.join(r.kinds)})"
                )
            objs = r.objects.get(k.name, {})
            keys = sorted(objs)
            if k.namespaced and namespace:
                keys = [key for key in keys if key[0] == namespace]
            return [objs[key] for key in keys], r.revision

    def list(self, kind: str, namespace: str | None = None) -> tuple[builtins.list[Obj], int]:
        encoded, revision = self._encoded(kind, namespace)
        return [_decode(data) for data in encoded], revision

    def iter_list(self, kind: str) -> Iterator[Obj]:
        """list(kind) one object at a time (StreamingList), decoded as it is handed over: the
        caller never holds the whole list decoded."""
        encoded, _ = self._encoded(kind, None)
        for data in encoded:
            yield _decode(data)

    def get(self, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        ds = self.direct()
        if ds is not None:
            return ds.get(kind, name, namespace)
        k = lookup(kind)
        self._ready()
        with self.replica.cond:
            ns = (namespace or "default") if k.namespaced else ""
            data = self.replica.objects.get(k.name, {}).get((ns, name))
        return _decode(data) if data is not None else None

    def watch(self, since_revision: int, stop: threading.Event | None = None) -> Iterator[Event]:
        """Every change above ``since_revision``, in order, from the replica's recent events."""
        self._ready()
        r = self.replica
        epoch, since = r.epoch, since_revision
        while stop is None or not stop.is_set():
            with r.cond:
                self._check()
                if r.epoch != epoch or since < r.floor:
                    raise Compacted(
                        f"typha://{self.address}: revision {since} is no longer in this client's "
                        f"history (oldest available: {r.floor}); relist and watch again"
                    )
                batch: builtins.list[Event] = []
                for ev in reversed(r.history):
                    if ev.revision <= since:
                        break
                    batch.append(ev)
                if not batch:
                    r.cond.wait(STOP_CHECK_S)
                    continue
            batch.reverse()
            yield from batch
            since = batch[-1].revision

    # --- writes: to the real datastore ---------------------------------------------------------

    def apply(self, objs: Sequence[Obj]) -> int:
        return self._writer().apply(objs)

    def apply_with_outcomes(self, objs: Sequence[Obj]) -> tuple[int, builtins.list[Outcome]]:
        return self._writer().apply_with_outcomes(objs)

    def create(self, obj: Obj) -> Obj:
        return self._writer().create(obj)

    def update(self, obj: Obj) -> Obj:
        return self._writer().update(obj)

    def delete(self, kind: str, name: str, namespace: str | None = None) -> int:
        return self._writer().delete(kind, name, namespace)

    def patch(self, kind: str, name: str, namespace: str | None, patch: Obj) -> Obj:
        return self._writer().patch(kind, name, namespace, patch)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self.replica.cond:
            self.replica.cond.notify_all()
        if not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop just finished by itself
                self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(timeout=5.0)
        with self._direct_lock:
            if self._direct is not None:
                self._direct.close()


def open_typha(url: str) -> TyphaDatastore:
    """``typha://HOST:PORT[?datastore=<percent-encoded url>]`` (see the module docstring)."""
    rest, _, query = url[len(PREFIX) :].partition("?")
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise DatastoreError(f"datastore {url!r}: needs HOST:PORT, as in typha://127.0.0.1:5473")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - {"datastore"})
    if unknown:
        raise DatastoreError(f"datastore {url!r}: unknown option {unknown[0]!r}")
    direct = options.get("datastore") or None
    if direct is not None and direct.startswith(PREFIX):
        raise DatastoreError(f"datastore {url!r}: the datastore behind typha cannot be typha")
    return TyphaDatastore(host.strip("[]"), int(port), direct)


def typha_url(address: str, datastore: str | None) -> str:
    """The URL of the fan-out at ``address`` (HOST:PORT) writing through to ``datastore``."""
    url = f"{PREFIX}{address}"
    return f"{url}?datastore={quote(datastore, safe='')}" if datastore else url


def consistent(ds: Datastore) -> Datastore:
    """The store to read from when a read must see every committed write (compare-and-swap
    loops): the real datastore behind a fan-out client, else ``ds`` itself."""
    if isinstance(ds, TyphaDatastore):
        return ds.direct() or ds
    return ds


def _version(data: bytes) -> str:
    return _head(data).metadata.resourceVersion or ""

"""The embedded datastore: one SQLite file, shared safely by several processes.

Invariants:
- ``meta.revision`` is the one global revision. A write transaction gives each object it writes
  the next revision (so an apply of N objects commits revisions r+1..r+N at once, atomically) and
  appends one row per object to ``events`` in the same transaction.
- ``meta.compacted`` is the highest revision whose event has been dropped; events above it are
  all present. Only the newest ``keep_events`` events are kept; watching from a revision below
  ``compacted`` raises Compacted.
- Writes run under ``BEGIN IMMEDIATE`` (one writer at a time, across processes), the database is
  in WAL mode (readers never block), and ``busy_timeout`` absorbs writer contention.
- Services are admitted inside the write transaction (datastore/services.py: cluster IPs and node
  ports allocated and checked against every stored Service), so allocation is atomic with the
  rest of the write and race-free across processes.
- After every committed write the sidecar ``<db>.notify`` file is touched; watchers block on
  inotify for it, so a change reaches a watcher in any process within milliseconds. The inotify
  timeout only bounds how late a watcher notices ``stop``.
- A write of at least ``BULK_CHECKPOINT`` objects checkpoints the WAL itself, after its notify:
  SQLite's own checkpoint (at 1,000 WAL pages) would otherwise land on whichever small write
  comes next, tens of milliseconds of copying before that write's watchers are woken.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from inotify_simple import INotify, flags

from tabby.datastore import services
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
from tabby.model import Kind, ValidationError, lookup, validate
from tabby.model.patch import merge_patch
from tabby.model.validate import ref

DEFAULT_KEEP_EVENTS = 100_000
STOP_CHECK_MS = 250  # how often a blocked watcher looks at ``stop``; changes wake it at once
WATCH_BATCH = 1000
BULK_CHECKPOINT = 256  # objects in one write from which the writer checkpoints what it wrote

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    revision INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (kind, namespace, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER PRIMARY KEY, type TEXT NOT NULL, kind TEXT NOT NULL, body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 0), ('compacted', 0);
"""

Key = tuple[str, str, str]  # kind, namespace ("" if cluster-scoped), name


def _key(kind: Kind, name: str, namespace: str | None) -> Key:
    return (kind.name, (namespace or "default") if kind.namespaced else "", name)


def _key_of(obj: Obj) -> Key:
    kind = lookup(obj["kind"])
    return _key(kind, obj["metadata"]["name"], obj["metadata"].get("namespace"))


class _Txn:
    """One write transaction: reads see its own writes; every write takes the next revision."""

    def __init__(
        self, db: sqlite3.Connection, service_cidr: str = services.DEFAULT_SERVICE_CIDR
    ) -> None:
        self.db = db
        self.revision: int = db.execute("SELECT value FROM meta WHERE key='revision'").fetchone()[0]
        self.written: list[Obj] = []
        self.service_cidr = service_cidr
        self._services: services.ServiceAllocator | None = None  # built on first use

    def get(self, key: Key) -> Obj | None:
        row = self.db.execute(
            "SELECT body FROM objects WHERE kind=? AND namespace=? AND name=?", key
        ).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, obj: Obj, old: Obj | None) -> Obj:
        """Store ``obj`` (validated) over ``old``, stamping server-managed metadata."""
        self.revision += 1
        meta = obj["metadata"]
        stamp_metadata(obj, old)
        meta["resourceVersion"] = str(self.revision)
        body = json.dumps(obj, separators=(",", ":"))
        self.db.execute(
            "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?)",
            (*_key_of(obj), self.revision, body),
        )
        self._event("MODIFIED" if old else "ADDED", obj["kind"], body)
        self.written.append(obj)
        return obj

    def remove(self, key: Key, old: Obj) -> int:
        self.revision += 1
        self.db.execute("DELETE FROM objects WHERE kind=? AND namespace=? AND name=?", key)
        old["metadata"]["resourceVersion"] = str(self.revision)
        self._event("DELETED", key[0], json.dumps(old, separators=(",", ":")))
        return int(self.revision)

    def _event(self, type_: EventType, kind: str, body: str) -> None:
        row = (self.revision, type_, kind, body)
        self.db.execute("INSERT INTO events VALUES (?, ?, ?, ?)", row)

    def admit(self, obj: Obj, old: Obj | None) -> Obj:
        """What the API server does to ``obj`` before storing it over ``old``: today, a
        Service's cluster IP and node ports are allocated and checked (datastore/services.py).

        Reads every stored Service once per transaction; admitted Services keep it current.
        """
        if obj["kind"] != "Service":
            return obj
        if self._services is None:
            rows = self.db.execute("SELECT body FROM objects WHERE kind='Service'").fetchall()
            stored = (json.loads(r[0]) for r in rows)
            self._services = services.ServiceAllocator(self.service_cidr, stored)
        return self._services.admit(obj, old)

    def check_pod_ips(self) -> None:
        """Every written Pod's IPs lie in some IPPool, when any IPPool exists."""
        pods = pods_with_ips(self.written)
        if not pods:
            return
        rows = self.db.execute("SELECT body FROM objects WHERE kind='IPPool'").fetchall()
        check_pod_ips(pods, [json.loads(r[0]) for r in rows])

    def finish(self, keep_events: int) -> None:
        self.db.execute("UPDATE meta SET value=? WHERE key='revision'", (self.revision,))
        horizon = self.revision - keep_events
        compacted = self.db.execute("SELECT value FROM meta WHERE key='compacted'").fetchone()[0]
        if horizon > compacted:
            self.db.execute("DELETE FROM events WHERE revision <= ?", (horizon,))
            self.db.execute("UPDATE meta SET value=? WHERE key='compacted'", (horizon,))


class EmbeddedDatastore:
    """The Datastore protocol over one SQLite file (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        keep_events: int = DEFAULT_KEEP_EVENTS,
        service_cidr: str = services.DEFAULT_SERVICE_CIDR,
    ):
        """``service_cidr`` is kube-apiserver's --service-cluster-ip-range: every process that
        writes Services to one file must pass the same one."""
        self.path = Path(path)
        self.notify_path = self.path.with_name(self.path.name + ".notify")
        self.keep_events = keep_events
        try:
            nets = services.parse_service_cidrs(service_cidr)
        except ValueError as err:
            raise DatastoreError(f"datastore {self.path}: service CIDR: {err}") from None
        self.service_cidr = ",".join(str(n) for n in nets)
        self._lock = threading.RLock()
        with self._errors():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.notify_path.touch(exist_ok=True)
            self._db = self._connect()
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    # --- plumbing ------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout=30000")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn SQLite and file-system failures into a one-line Unavailable."""
        try:
            yield
        except (sqlite3.Error, OSError) as err:
            raise Unavailable(f"datastore {self.path}: {err}") from None

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several SELECTs."""
        with self._lock, self._errors():
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    @contextmanager
    def _write(self) -> Iterator[_Txn]:
        with self._lock, self._errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                txn = _Txn(self._db, self.service_cidr)
                start = txn.revision
                yield txn
                if txn.revision != start:
                    txn.finish(self.keep_events)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            if txn.revision != start:
                self._notify()
            if txn.revision - start >= BULK_CHECKPOINT:
                with contextlib.suppress(Unavailable):  # the write stands; SQLite copies later
                    self.checkpoint()

    def checkpoint(self) -> tuple[int, int]:
        """Copy the WAL's committed pages into the database file, as far as no reader still
        needs them (PASSIVE: waits for no one); (pages in the WAL, pages copied so far)."""
        with self._lock, self._errors():
            _busy, wal, done = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return int(wal), int(done)

    def _revision(self) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key='revision'").fetchone()[0])

    def _notify(self) -> None:
        try:
            os.utime(self.notify_path)
        except FileNotFoundError:
            self.notify_path.touch()

    # --- reads ---------------------------------------------------------------------------------

    def revision(self) -> int:
        with self._read():
            return self._revision()

    def list(self, kind: str, namespace: str | None = None) -> tuple[list[Obj], int]:
        k = lookup(kind)
        query, args = "SELECT body FROM objects WHERE kind=?", [k.name]
        if k.namespaced and namespace:
            query, args = query + " AND namespace=?", [*args, namespace]
        with self._read() as db:
            rows = db.execute(query + " ORDER BY namespace, name", args).fetchall()
            return [json.loads(r[0]) for r in rows], self._revision()

    def iter_list(self, kind: str) -> Iterator[Obj]:
        """list(kind) one object at a time (StreamingList): rows are fetched in batches and
        decoded as they are handed over, within one read transaction."""
        k = lookup(kind)
        with self._read() as db:
            cursor = db.execute(
                "SELECT body FROM objects WHERE kind=? ORDER BY namespace, name", (k.name,)
            )
            while rows := cursor.fetchmany(WATCH_BATCH):
                for (body,) in rows:
                    yield json.loads(body)

    def get(self, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        with self._read() as db:
            return _Txn(db).get(_key(lookup(kind), name, namespace))

    # --- writes --------------------------------------------------------------------------------

    def apply_with_outcomes(self, objs: Sequence[Obj]) -> tuple[int, builtins.list[Outcome]]:
        valid = [validate(o) for o in objs]  # all validated before anything is written
        outcomes: builtins.list[Outcome] = []
        with self._write() as txn:
            for obj in valid:
                old = txn.get(_key_of(obj))
                if old is not None and "status" not in obj and "status" in old:
                    obj["status"] = old["status"]  # apply does not clear status, as kubectl's
                obj = txn.admit(obj, old)  # before the comparison: it fills allocated fields
                if old is not None and same(obj, old):
                    outcomes.append("unchanged")
                    continue
                txn.put(obj, old)
                outcomes.append("configured" if old else "created")
            txn.check_pod_ips()
        return txn.revision, outcomes

    def apply(self, objs: Sequence[Obj]) -> int:
        return self.apply_with_outcomes(objs)[0]

    def create(self, obj: Obj) -> Obj:
        obj = validate(obj)
        with self._write() as txn:
            if txn.get(_key_of(obj)) is not None:
                raise AlreadyExists(f"{ref(obj)} already exists")
            txn.put(txn.admit(obj, None), None)
            txn.check_pod_ips()
        return obj

    def update(self, obj: Obj) -> Obj:
        obj = validate(obj)
        version = obj["metadata"].get("resourceVersion")
        if not version:
            raise Conflict(f"{ref(obj)}: metadata.resourceVersion is required to update")
        with self._write() as txn:
            old = self._current(txn, obj)
            if old["metadata"]["resourceVersion"] != version:
                raise Conflict(
                    f"{ref(obj)} has changed (resourceVersion {version} is no longer current): "
                    "read it again and retry"
                )
            txn.put(txn.admit(obj, old), old)
            txn.check_pod_ips()
        return obj

    def patch(self, kind: str, name: str, namespace: str | None, patch: Obj) -> Obj:
        if not isinstance(patch, dict):
            raise ValidationError("a merge patch must be a JSON object")
        key = _key(lookup(kind), name, namespace)
        with self._write() as txn:
            old = txn.get(key)
            if old is None:
                raise NotFound(f"{key[0]} {'/'.join(p for p in key[1:] if p)} not found")
            version = patch.get("metadata", {}).get("resourceVersion")
            if version is not None and version != old["metadata"]["resourceVersion"]:
                raise Conflict(f"{ref(old)} has changed (resourceVersion {version} is stale)")
            new = validate(services.drop_type_dependent(merge_patch(old, patch), old))
            if _key_of(new) != key:
                raise ValidationError(f"{ref(old)}: a patch cannot change kind, name or namespace")
            new = txn.admit(new, old)
            if same(new, old):
                return old
            txn.put(new, old)
            txn.check_pod_ips()
        return new

    def delete(self, kind: str, name: str, namespace: str | None = None) -> int:
        key = _key(lookup(kind), name, namespace)
        with self._write() as txn:
            old = txn.get(key)
            if old is None:
                raise NotFound(f"{key[0]} {'/'.join(p for p in key[1:] if p)} not found")
            txn.remove(key, old)
        return txn.revision

    def _current(self, txn: _Txn, obj: Obj) -> Obj:
        old = txn.get(_key_of(obj))
        if old is None:
            raise NotFound(f"{ref(obj)} not found")
        return old

    # --- watch ---------------------------------------------------------------------------------

    def watch(self, since_revision: int, stop: threading.Event | None = None) -> Iterator[Event]:
        """Every change above ``since_revision``, in order; blocks on inotify between changes."""
        with self._errors():
            inotify = INotify()
            # Watch before the first read, so a write landing after a read always wakes us.
            inotify.add_watch(self.notify_path, flags.ATTRIB | flags.MODIFY | flags.CLOSE_WRITE)
            db = self._connect()
        try:
            revision = since_revision
            while stop is None or not stop.is_set():
                inotify.read(timeout=0)  # drain: the read below covers what they announced
                with self._errors():
                    rows = self._events_after(db, revision)
                for rev, type_, kind, body in rows:
                    yield Event(type_, kind, json.loads(body), rev)
                    revision = rev
                if not rows:
                    inotify.read(timeout=STOP_CHECK_MS)
        finally:
            inotify.close()
            db.close()

    def _events_after(self, db: sqlite3.Connection, revision: int) -> builtins.list[Any]:
        db.execute("BEGIN")
        try:
            compacted = db.execute("SELECT value FROM meta WHERE key='compacted'").fetchone()[0]
            if revision < compacted:
                raise Compacted(
                    f"revision {revision} has been compacted (oldest available: {compacted}); "
                    "relist and watch again"
                )
            return db.execute(
                "SELECT revision, type, kind, body FROM events WHERE revision > ? "
                "ORDER BY revision LIMIT ?",
                (revision, WATCH_BATCH),
            ).fetchall()
        finally:
            db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

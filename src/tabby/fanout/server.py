"""The fan-out server (Typha's role): one list + watch on the datastore, served to many agents.

Invariants:
- One datastore watch per server, whatever the number of clients: one thread lists the served
  kinds, then watches, and hands what it reads to the event loop through one ordered inbox.
- The cache (encoded objects, revision) changes only on the event loop, and every change is
  queued for every registered client in the same loop step. A client is registered in the step
  that builds its snapshot, so its snapshot at R plus the frames queued after it is exactly the
  datastore's history after R.
- Each frame is encoded once; the same bytes go to every client.
- Pods, Nodes and IPAM blocks are served as agents read them (calc/intake.py, with their
  resourceVersion), as Calico's Typha serves Felix its syncer's view, not whole objects: a Pod
  as a kube-apiserver serves it is ~4.4 KB of JSON and 0.37 KB kept, in the cache, on the wire
  and in every agent's replica. Writes through a fan-out client go to the datastore itself.
- A client's queue holds at most ``max_queue_frames`` frames: a client that would exceed it is
  dropped (it reconnects and gets a fresh snapshot). The broadcaster never waits for a client, so
  a slow or stalled client never delays the others.
- A relist (after Compacted or a datastore error) reaches clients as the diff against the cache,
  as events at the relist's revision; a datastore that went back in time drops every client.
- A bookmark every ``heartbeat_s`` carries the datastore revision and tells clients the server
  lives; a client that hears nothing for DEAD_AFTER_HEARTBEATS heartbeats reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from tabby.calc.intake import kept
from tabby.datastore.api import Compacted, Datastore, DatastoreError, Event, StreamingList
from tabby.datastore.typha_wire import (
    HANDSHAKE_TIMEOUT_S,
    ProtocolError,
    frame,
    negotiate,
    raw_frame,
    read_frame,
)
from tabby.model import KINDS as MODEL_KINDS

log = logging.getLogger("tabby.typha")

# What agents read (tabby.agent.KINDS): every watched kind but the per-pod IPAM handles.
DEFAULT_KINDS: tuple[str, ...] = tuple(
    k.name for k in MODEL_KINDS if k.watched and k.name != "IPAMHandle"
)
DEFAULT_HEARTBEAT_S = 5.0
DEFAULT_MAX_QUEUE_FRAMES = 1000
FRAME_EVENTS = 500  # events per frame at most
SNAPSHOT_CHUNK = 1000  # objects per snapshot frame
DEFAULT_SNDBUF_BYTES = 1 << 20  # kernel send buffer per client (doubled by Linux), see below
CLOSE_GRACE_S = 1.0  # a dropped client's last bytes get this long before the socket is aborted
RELIST_BACKOFF_S = (0.5, 10.0)

Key = tuple[str, str, str]  # kind, namespace ("" if cluster-scoped), name


@dataclass
class Stats:
    """Counters for the load a server takes off the datastore and puts on the network."""

    datastore_lists: int = 0  # full lists of the served kinds (1 + relists)
    datastore_watches: int = 0  # watches opened on the datastore (one at a time)
    datastore_bytes: int = 0  # JSON bytes taken from the datastore, as served (Pods kept)
    events: int = 0  # datastore events of served kinds
    connections: int = 0
    refused: int = 0
    dropped: int = 0  # clients dropped for falling behind
    snapshots: int = 0
    frames_sent: int = 0
    bytes_sent: int = 0


@dataclass(frozen=True)
class _Relist:
    revision: int
    objects: dict[Key, bytes]


@dataclass(frozen=True)
class _Change:
    key: Key
    obj: bytes | None  # None: deleted
    encoded: bytes  # the event as sent
    revision: int


class _Client:
    def __init__(self, name: str, peer: str, writer: asyncio.StreamWriter, limit: int) -> None:
        self.name, self.peer, self.writer, self.limit = name, peer, writer, limit
        self.queue: deque[bytes] = deque()
        self.wake = asyncio.Event()
        self.gone = False

    def offer(self, data: bytes) -> bool:
        """Queue ``data``; False if the queue is full (the client is too far behind)."""
        if len(self.queue) >= self.limit:
            return False
        self.queue.append(data)
        self.wake.set()
        return True

    def __str__(self) -> str:
        return f"{self.name or '?'} ({self.peer})"


class FanoutServer:
    """Serves ``ds`` to agents over the tabby-typha protocol (datastore/typha_wire.py)."""

    def __init__(
        self,
        ds: Datastore,
        kinds: tuple[str, ...] = DEFAULT_KINDS,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        max_queue_frames: int = DEFAULT_MAX_QUEUE_FRAMES,
        name: str = "tabby-typha",
        sndbuf_bytes: int | None = DEFAULT_SNDBUF_BYTES,
    ) -> None:
        """``sndbuf_bytes`` fixes each client socket's kernel send buffer: left to autotuning,
        Linux grows it to tcp_wmem's maximum (4 MiB here), which a stalled client fills before
        its queue does. None: autotuning."""
        self.ds, self.kinds, self.name = ds, tuple(kinds), name
        self.sndbuf_bytes = sndbuf_bytes
        self.heartbeat_s, self.max_queue_frames = heartbeat_s, max_queue_frames
        self.stats = Stats()
        self.objects: dict[Key, bytes] = {}
        self.revision = 0
        self.clients: set[_Client] = set()
        self._synced: asyncio.Event | None = None
        self._snapshot: list[bytes] | None = None  # frames of the cache as it is; None: stale
        self._inbox: list[_Relist | _Change | int] = []  # int: a revision with nothing served
        self._inbox_lock = threading.Lock()
        self._kicked = False
        self._halt = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._follower: threading.Thread | None = None

    # --- life cycle ----------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Start following the datastore and listening; returns the port bound."""
        self._loop = asyncio.get_running_loop()
        self._synced = asyncio.Event()
        self._halt.clear()
        self._follower = threading.Thread(
            target=self._follow_datastore, name="typha-datastore", daemon=True
        )
        self._follower.start()
        self._server = await asyncio.start_server(self._serve, host, port)
        self._spawn(self._heartbeat())
        bound = int(self._server.sockets[0].getsockname()[1])
        log.info("serving %s on %s:%d", ", ".join(self.kinds), host, bound)
        return bound

    async def close(self) -> None:
        """Stop listening, say bye to every client and stop following the datastore."""
        self._halt.set()
        if self._server is not None:
            self._server.close()
        for client in list(self.clients):
            self._drop(client, "server stopping")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._follower is not None:
            await asyncio.to_thread(self._follower.join, 5.0)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- the datastore side (its own thread) ---------------------------------------------------

    def _follow_datastore(self) -> None:
        backoff_s = RELIST_BACKOFF_S[0]
        while not self._halt.is_set():
            try:
                revision = self.ds.revision()
                objects: dict[Key, bytes] = {}
                for kind in self.kinds:  # streamed when the store can: never decoded whole
                    items = (
                        self.ds.iter_list(kind)
                        if isinstance(self.ds, StreamingList)
                        else self.ds.list(kind)[0]
                    )
                    for obj in items:
                        objects[_key(obj)] = data = _encode(kept(kind, obj))
                        self.stats.datastore_bytes += len(data)
                self.stats.datastore_lists += 1
                self._post(_Relist(revision, objects))
                self.stats.datastore_watches += 1
                for ev in self.ds.watch(revision, stop=self._halt):
                    self._post(self._change(ev) if ev.kind in self.kinds else ev.revision)
                    backoff_s = RELIST_BACKOFF_S[0]
            except Compacted:
                log.info("datastore history compacted: relisting")
            except DatastoreError as e:
                log.warning(
                    "datastore: %s (retrying in %.1f s; clients keep what they have)", e, backoff_s
                )
                self._halt.wait(backoff_s)
                backoff_s = min(backoff_s * 2, RELIST_BACKOFF_S[1])
            except Exception:  # noqa: BLE001 - a bug must not end the only watch; retried
                log.exception("following the datastore failed (retrying)")
                self._halt.wait(backoff_s)
                backoff_s = min(backoff_s * 2, RELIST_BACKOFF_S[1])

    def _change(self, ev: Event) -> _Change:
        data = _encode(kept(ev.kind, ev.obj))
        self.stats.datastore_bytes += len(data)
        encoded = _event_bytes(ev.type, ev.kind, data, ev.revision)
        return _Change(_key(ev.obj), None if ev.type == "DELETED" else data, encoded, ev.revision)

    def _post(self, item: _Relist | _Change | int) -> None:
        """Hand ``item`` to the loop; one wake-up per burst, so a burst becomes a few frames."""
        with self._inbox_lock:
            self._inbox.append(item)
            kick, self._kicked = not self._kicked, True
        if kick and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: we are stopping
                self._loop.call_soon_threadsafe(self._drain)

    # --- the cache and the broadcast (the event loop) ------------------------------------------

    def _drain(self) -> None:
        with self._inbox_lock:
            items, self._inbox, self._kicked = self._inbox, [], False
        batch: list[bytes] = []
        for item in items:
            if isinstance(item, _Change):
                if item.obj is None:
                    self.objects.pop(item.key, None)
                else:
                    self.objects[item.key] = item.obj
                self.revision = max(self.revision, item.revision)
                self._snapshot = None
                self.stats.events += 1
                batch.append(item.encoded)
                if len(batch) >= FRAME_EVENTS:
                    self._broadcast_events(batch)
                    batch = []
            elif isinstance(item, _Relist):
                self._broadcast_events(batch)
                batch = []
                self._relisted(item)
            else:
                self.revision = max(self.revision, item)
        self._broadcast_events(batch)

    def _relisted(self, relist: _Relist) -> None:
        assert self._synced is not None
        if not self._synced.is_set():
            self.objects, self.revision = relist.objects, relist.revision
            self._snapshot = None
            self._synced.set()
            log.info(
                "in sync with the datastore at revision %d (%d objects)",
                relist.revision,
                len(relist.objects),
            )
            return
        if relist.revision < self.revision:
            log.warning(
                "the datastore went back to revision %d (from %d): every client resyncs",
                relist.revision,
                self.revision,
            )
            for client in list(self.clients):
                self._drop(client, "datastore went back in time: resync")
        else:
            events = [
                _event_bytes("DELETED", key[0], old, relist.revision)
                for key, old in self.objects.items()
                if key not in relist.objects
            ]
            for key, new in relist.objects.items():
                old = self.objects.get(key)
                if old != new:
                    kind = "ADDED" if old is None else "MODIFIED"
                    events.append(_event_bytes(kind, key[0], new, relist.revision))
            log.info("relisted at revision %d: %d changes", relist.revision, len(events))
            for i in range(0, len(events), FRAME_EVENTS):
                self._broadcast_events(events[i : i + FRAME_EVENTS])
        self.objects, self.revision = relist.objects, max(self.revision, relist.revision)
        self._snapshot = None

    def _broadcast_events(self, encoded: list[bytes]) -> None:
        if encoded:
            self._broadcast(raw_frame(b'{"t":"events","events":[' + b",".join(encoded) + b"]}"))

    def _broadcast(self, data: bytes) -> None:
        for client in list(self.clients):
            if not client.offer(data):
                self.stats.dropped += 1
                self._drop(client, f"too slow: {client.limit} frames queued; resync")

    def _snapshot_frames(self) -> list[bytes]:
        """The cache as snapshot frames (built once per cache state) and the synced frame."""
        if self._snapshot is None:
            objs = list(self.objects.values())
            rev = self.revision
            frames = [
                raw_frame(
                    b'{"t":"snapshot","rev":%d,"objs":[' % rev
                    + b",".join(objs[i : i + SNAPSHOT_CHUNK])
                    + b"]}"
                )
                for i in range(0, len(objs), SNAPSHOT_CHUNK)
            ]
            frames.append(frame({"t": "synced", "rev": rev}))
            self._snapshot = frames
        return self._snapshot

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            self._broadcast(frame({"t": "bookmark", "rev": self.revision}))

    # --- one client ----------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = ":".join(map(str, writer.get_extra_info("peername")[:2]))
        sock = writer.get_extra_info("socket")
        if self.sndbuf_bytes is not None and sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf_bytes)
        self.stats.connections += 1
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                msg, _ = await read_frame(reader)
        except (OSError, TimeoutError, ProtocolError, asyncio.IncompleteReadError) as e:
            log.info("client %s: no hello (%s)", peer, e or type(e).__name__)
            writer.close()
            return
        version, reason = negotiate(msg, self.kinds)
        if version is None:
            self.stats.refused += 1
            log.warning("refused client %s: %s", peer, reason)
            self._write(writer, frame({"t": "refused", "reason": reason}))
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(CLOSE_GRACE_S):
                    await writer.drain()
            writer.close()
            return
        client = _Client(str(msg.get("name", ""))[:253], peer, writer, self.max_queue_frames)
        welcome = {
            "t": "welcome",
            "version": version,
            "server": self.name,
            "kinds": list(self.kinds),
            "heartbeat_s": self.heartbeat_s,
        }
        self._write(writer, frame(welcome))
        assert self._synced is not None
        while not self._synced.is_set():  # before the first list: heartbeats only
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_s):
                    await self._synced.wait()
            self._write(writer, frame({"t": "bookmark", "rev": 0}))
        snapshot = self._snapshot_frames()
        self.clients.add(client)  # in the same loop step as the snapshot: nothing falls between
        self.stats.snapshots += 1
        log.debug("client %s: snapshot at revision %d", client, self.revision)
        sender = self._spawn(self._send(client, snapshot))
        try:
            await reader.read(1)  # a client sends nothing after its hello: EOF or misbehaviour
        except OSError:
            pass
        if not client.gone:
            self.clients.discard(client)
            client.gone = True
            sender.cancel()
            writer.close()

    async def _send(self, client: _Client, snapshot: list[bytes]) -> None:
        writer = client.writer
        try:
            for data in snapshot:
                self._write(writer, data)
                await writer.drain()
            while not client.gone:
                await client.wake.wait()
                client.wake.clear()
                frames = list(client.queue)
                client.queue.clear()
                writer.writelines(frames)
                for data in frames:
                    self._count(data)
                await writer.drain()
        except OSError:
            pass

    def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        self._count(data)

    def _count(self, data: bytes) -> None:
        self.stats.frames_sent += 1
        self.stats.bytes_sent += len(data)

    def _drop(self, client: _Client, reason: str) -> None:
        """Forget ``client`` at once; its socket gets CLOSE_GRACE_S to flush a bye."""
        if client.gone:
            return
        client.gone = True
        client.wake.set()
        self.clients.discard(client)
        log.info("dropping client %s: %s", client, reason)
        writer = client.writer
        with contextlib.suppress(OSError, RuntimeError):
            self._write(writer, frame({"t": "bye", "reason": reason}))
            writer.close()
        if self._loop is not None:
            self._loop.call_later(CLOSE_GRACE_S, writer.transport.abort)


async def serve(server: FanoutServer, host: str, port: int, stop: asyncio.Event) -> None:
    """Run ``server`` on host:port until ``stop`` is set."""
    await server.start(host, port)
    try:
        await stop.wait()
    finally:
        await server.close()


def _key(obj: dict[str, Any]) -> Key:
    meta = obj["metadata"]
    return obj["kind"], meta.get("namespace") or "", meta["name"]


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _event_bytes(type_: str, kind: str, obj: bytes, revision: int) -> bytes:
    return f'{{"type":"{type_}","kind":"{kind}","rev":{revision},"obj":'.encode() + obj + b"}"

"""The fan-out (tabby typha): one datastore watch served to many agents over loopback.

Each server runs on its own event loop in a thread (as in its own process), on a free loopback
port; clients are the product's client (``follow`` over a ``Replica``; ``TyphaDatastore`` for
the agent's synchronous view) as asyncio tasks of the test's loop. Every state is compared with a
direct list of the embedded datastore as (kind, namespace, name) -> resourceVersion.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import json
import multiprocessing
import random
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tabby import agent
from tabby.calc import names
from tabby.calc.intake import kept
from tabby.cni.ipam import BlockIPAM
from tabby.datastore import Compacted, DatastoreError, Event, open_datastore
from tabby.datastore.api import Obj, StreamingList
from tabby.datastore.embedded import EmbeddedDatastore
from tabby.datastore.typha import Replica, TyphaDatastore, consistent, follow, typha_url
from tabby.datastore.typha_wire import ProtocolError, frame, hello, read_frame
from tabby.fanout import DEFAULT_KINDS, FanoutServer
from tabby.lab import apishapes

N_AGENTS = 200
BURST = 10_000
Versions = dict[tuple[str, str, str], str]


# --- fixtures and helpers -------------------------------------------------------------------------


class CountingDatastore:
    """The embedded store, counting what readers take from it (watches held, JSON bytes)."""

    def __init__(self, inner: EmbeddedDatastore) -> None:
        self.inner = inner
        self.lists = self.watches = self.open_watches = self.bytes = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def list(self, kind: str, namespace: str | None = None) -> tuple[list[Obj], int]:
        items, rev = self.inner.list(kind, namespace)
        with self._lock:
            self.lists += 1
            self.bytes += sum(len(json.dumps(o, separators=(",", ":"))) for o in items)
        return items, rev

    def iter_list(self, kind: str) -> Iterator[Obj]:
        with self._lock:
            self.lists += 1
        for obj in self.inner.iter_list(kind):
            with self._lock:
                self.bytes += len(json.dumps(obj, separators=(",", ":")))
            yield obj

    def watch(self, since_revision: int, stop: threading.Event | None = None) -> Iterator[Event]:
        with self._lock:
            self.watches += 1
            self.open_watches += 1
        try:
            for ev in self.inner.watch(since_revision, stop):
                with self._lock:
                    self.bytes += len(json.dumps(ev.obj, separators=(",", ":")))
                yield ev
        finally:
            with self._lock:
                self.open_watches -= 1


class ApiShapedPods:
    """The embedded store, listing one Pod as a kube-apiserver serves it, as the Kubernetes
    datastore would (the embedded store validates writes against the lab's model, which knows
    the fields tabby reads only)."""

    def __init__(self, inner: EmbeddedDatastore, pod: Obj) -> None:
        self.inner, self.pod = inner, pod

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def list(self, kind: str, namespace: str | None = None) -> tuple[list[Obj], int]:
        if kind == "Pod":
            return [copy.deepcopy(self.pod)], self.inner.revision()
        return self.inner.list(kind, namespace)

    def iter_list(self, kind: str) -> Iterator[Obj]:
        if kind == "Pod":
            yield copy.deepcopy(self.pod)
        else:
            yield from self.inner.iter_list(kind)


class ServerThread:
    """A FanoutServer on its own loop in a thread; restartable on the same port."""

    def __init__(self, ds: Any, **options: Any) -> None:
        self.ds, self.options, self.port = ds, options, 0
        self.server: FanoutServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> int:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = FanoutServer(self.ds, **self.options)
        start = self.server.start("127.0.0.1", self.port)
        self.port = asyncio.run_coroutine_threadsafe(start, self.loop).result(10)
        return self.port

    def stop(self) -> None:
        assert self.loop is not None and self.server is not None and self.thread is not None
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class ServerProcess:
    """A FanoutServer over a CountingDatastore in its own process, as ``tabby typha`` runs:
    sharing this process's GIL with 200 busy clients would measure the GIL, not the fan-out."""

    def __init__(self, path: Path, **options: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_server_process, args=(str(path), child, options))
        self.proc.start()
        if not self.conn.poll(30):
            raise AssertionError("the server process did not start")
        self.port = int(self.conn.recv())

    def stats(self) -> dict[str, int]:
        self.conn.send("stats")
        return dict(self.conn.recv())

    def stop(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send("stop")
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()  # by its handle: the process this test started
            self.proc.join(5)


def _server_process(path: str, conn: Any, options: dict[str, Any]) -> None:
    counting = CountingDatastore(EmbeddedDatastore(path))
    server = FanoutServer(counting, **options)

    async def main() -> None:
        conn.send(await server.start("127.0.0.1", 0))
        while (request := await asyncio.to_thread(conn.recv)) != "stop":
            assert request == "stats"
            conn.send({
                **vars(server.stats),
                "ds_lists": counting.lists,
                "ds_watches": counting.watches,
                "ds_open_watches": counting.open_watches,
                "ds_bytes": counting.bytes,
            })  # fmt: skip
        await server.close()

    asyncio.run(main())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EmbeddedDatastore]:
    ds = EmbeddedDatastore(tmp_path / "store.db")
    yield ds
    ds.close()


@pytest.fixture
def servers() -> Iterator[list[ServerThread]]:
    """Every server a test starts is stopped at its end, even on failure."""
    started: list[ServerThread] = []
    yield started
    for s in started:
        if s.loop is not None and not s.loop.is_closed():
            with contextlib.suppress(Exception):
                s.stop()


def serve(servers: list[ServerThread], ds: Any, **options: Any) -> ServerThread:
    s = ServerThread(ds, **options)
    s.start()
    servers.append(s)
    return s


def direct_versions(ds: Any, kinds: tuple[str, ...] = DEFAULT_KINDS) -> Versions:
    out: Versions = {}
    for kind in kinds:
        for obj in ds.list(kind)[0]:
            meta = obj["metadata"]
            out[(kind, meta.get("namespace") or "", meta["name"])] = meta["resourceVersion"]
    return out


def pod(name: str, ns: str = "default", gen: int = 0) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"gen": str(gen)}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
    }


def service(name: str, ns: str = "default", gen: int = 0) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": {"gen": str(gen)}},
        "spec": {"selector": {"app": name}, "ports": [{"port": 80}]},
    }


def burst(ds: Any, changes: int, seed: int = 9, prefix: str = "o") -> int:
    """Write ``changes`` changes (creates, updates, deletes of Pods and Services, batched as a
    controller would); returns the revision after the last."""
    rng = random.Random(seed)
    live: dict[tuple[str, str, str], int] = {}  # kind, ns, name -> generation
    made = serial = 0
    while made < changes:
        batch: dict[tuple[str, str, str], int] = {}
        deletes: list[tuple[str, str, str]] = []
        for _ in range(min(100, changes - made)):
            roll = rng.random()
            if roll < 0.45 or len(live) < 100:
                serial += 1
                key = (
                    rng.choice(("Pod", "Service")),
                    rng.choice(("default", "web")),
                    f"{prefix}{serial}",
                )
                batch[key] = 0
                continue
            key = rng.choice(list(live))
            if key in batch or key in deletes:
                batch[(key[0], key[1], f"{prefix}{serial}x")] = 0
                serial += 1
            elif roll < 0.8:
                batch[key] = live[key] + 1
            else:
                deletes.append(key)
        objs = [(pod if k[0] == "Pod" else service)(k[2], k[1], gen) for k, gen in batch.items()]
        _, outcomes = ds.apply_with_outcomes(objs)
        made += sum(o != "unchanged" for o in outcomes)
        live.update(batch)
        for key in deletes:
            ds.delete(key[0], key[2], key[1])
            del live[key]
        made += len(deletes)
    return int(ds.revision())


def burst_in_process(path: Path, changes: int, seed: int = 9) -> int:
    """``burst`` from another process, as writers are: in this one, the writer thread would
    queue for the GIL behind 200 busy clients at every SQLite call."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return int(pool.apply(_burst_file, (str(path), changes, seed)))


def _burst_file(path: str, changes: int, seed: int) -> int:
    ds = EmbeddedDatastore(path)
    try:
        return burst(ds, changes, seed)
    finally:
        ds.close()


async def until(check: Any, timeout_s: float, what: Any) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            why = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout_s} s waiting for {why}")
        await asyncio.sleep(0.05)


async def stop_tasks(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
    done, pending = await asyncio.wait(tasks, timeout=10)
    assert not pending, f"{len(pending)} client tasks ignored their cancellation"


# --- 200 agents, 10,000 changes -------------------------------------------------------------------


def test_200_agents_converge_after_a_burst_of_10000_changes(
    store: EmbeddedDatastore, capsys: pytest.CaptureFixture[str]
) -> None:
    burst(store, 300, seed=1, prefix="seed")  # a cluster that exists before the agents start
    # typha's default heartbeat (a client calls the server dead after 3 silent ones): with 1 s,
    # 200 clients in one process on a loaded 2-CPU machine went 3 s unread now and then, and
    # reconnected (214, then 345 snapshots for 200 agents); each real agent is its own process
    srv = ServerProcess(store.path, heartbeat_s=5.0)
    replicas = [Replica(history=0) for _ in range(N_AGENTS)]
    clients_cpu = [0.0]

    async def main() -> tuple[float, float, float, int]:
        tasks = [
            asyncio.create_task(follow("127.0.0.1", srv.port, r, f"n{i}", agent.KINDS))
            for i, r in enumerate(replicas)
        ]
        try:
            started = time.monotonic()
            await until(lambda: all(r.synced for r in replicas), 30, "every first snapshot")
            snapshot_s = time.monotonic() - started
            started, cpu = time.monotonic(), time.process_time()
            final = await asyncio.to_thread(burst_in_process, store.path, BURST)
            written_s = time.monotonic() - started
            await until(
                lambda: all(r.revision >= final for r in replicas),
                90,
                lambda: f"convergence: slowest at {min(r.revision for r in replicas)} of {final}",
            )
            clients_cpu[0] = time.process_time() - cpu
            return snapshot_s, written_s, time.monotonic() - started, final
        finally:
            await stop_tasks(tasks)

    # 200 agents' objects live in this one process: the cyclic GC would walk all of them at
    # every collection and dominate the run (each real agent freezes its own: agent.py). They
    # are compared, then dropped, before the GC runs again.
    gc.disable()
    try:
        snapshot_s, written_s, converged_s, final = asyncio.run(main())
        stats = srv.stats()
        want = direct_versions(store)
        assert len(want) > 1000
        for i, r in enumerate(replicas):
            assert r.versions() == want, f"agent {i} differs from the datastore"
        received = sum(r.bytes_received for r in replicas)
    finally:
        srv.stop()
        replicas.clear()
        gc.enable()

    # with fan-out: one list and one watch on the datastore, whatever the number of agents
    assert stats["ds_watches"] == 1 and stats["ds_open_watches"] == 1
    assert stats["ds_lists"] == len(DEFAULT_KINDS) and stats["datastore_lists"] == 1
    assert stats["dropped"] == 0 and stats["snapshots"] == N_AGENTS
    # what the server sent is what the clients read, but for bookmarks still in flight at the end
    in_flight = stats["bytes_sent"] - received
    assert 0 <= in_flight <= N_AGENTS * 3 * len(frame({"t": "bookmark", "rev": final})), in_flight
    direct_bytes = N_AGENTS * stats["ds_bytes"]  # each agent would list and watch the same
    with capsys.disabled():
        print(
            f"\nfan-out, {N_AGENTS} agents, burst of {BURST} changes ({len(want)} objects after):"
            f"\n  datastore watches held: 1 with fan-out, {N_AGENTS} without;"
            f" lists: {len(DEFAULT_KINDS)} vs {N_AGENTS * len(DEFAULT_KINDS)}"
            f"\n  datastore bytes read: {stats['ds_bytes'] / 1e6:.1f} MB with fan-out,"
            f" {direct_bytes / 1e6:.0f} MB without (x{N_AGENTS});"
            f" server sent {stats['bytes_sent'] / 1e6:.0f} MB in {stats['frames_sent']} frames"
            f"\n  first snapshots {snapshot_s:.2f} s; burst written in {written_s:.2f} s;"
            f" all {N_AGENTS} converged {converged_s:.2f} s after the burst began"
            f"\n  (the {N_AGENTS} clients share this one process: {clients_cpu[0]:.1f} s of its"
            f" CPU, decoding {N_AGENTS} copies of the stream, bound that time)"
        )


# --- back-pressure --------------------------------------------------------------------------------


def test_a_stalled_client_is_dropped_without_stalling_the_others_then_resyncs(
    store: EmbeddedDatastore, servers: list[ServerThread]
) -> None:
    srv = serve(servers, store, heartbeat_s=0.5, max_queue_frames=8, sndbuf_bytes=65536)
    replicas = [Replica(history=0) for _ in range(10)]

    async def main() -> None:
        tasks = [asyncio.create_task(follow("127.0.0.1", srv.port, r)) for r in replicas]
        # the stalled one: a small receive buffer, a hello, then it never reads again
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", srv.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(frame(hello("stalled", ())))
        try:
            await until(lambda: all(r.synced for r in replicas), 10, "first snapshots")
            assert srv.server is not None
            await until(lambda: len(srv.server.clients) == 11, 10, "the stalled client's snapshot")
            final = await asyncio.to_thread(burst, store, 2000)
            await until(lambda: all(r.revision >= final for r in replicas), 30, "the others")
            await until(lambda: srv.server.stats.dropped == 1, 10, "the stalled client dropped")
            assert len(srv.server.clients) == 10
            # the stalled client wakes up: what it reads ends (bye or reset), and it resyncs
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                for _ in range(10_000):
                    msg, _ = await asyncio.wait_for(read_frame(reader), 5)
                    if msg["t"] == "bye":
                        assert "too slow" in msg["reason"]
                        break
            writer.close()
            again = Replica()
            tasks.append(asyncio.create_task(follow("127.0.0.1", srv.port, again)))
            await until(lambda: again.revision >= final, 10, "the resync")
            assert again.versions() == direct_versions(store)
            for r in replicas:
                assert r.snapshots == 1  # never dropped
        finally:
            await stop_tasks(tasks)

    asyncio.run(main())
    want = direct_versions(store)
    assert all(r.versions() == want for r in replicas)


# --- protocol -------------------------------------------------------------------------------------


def test_an_unknown_protocol_version_is_refused_clearly(
    store: EmbeddedDatastore, servers: list[ServerThread]
) -> None:
    srv = serve(servers, store)

    async def raw(msg: dict[str, Any]) -> dict[str, Any]:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(frame(msg))
        answer, _ = await asyncio.wait_for(read_frame(reader), 5)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # and the server closes
        writer.close()
        return answer

    answer = asyncio.run(raw(hello("future", (), versions=(2, 3))))
    assert answer["t"] == "refused"
    assert answer["reason"] == (
        "protocol version 2, 3 not supported: this server speaks 1 "
        "(run the same tabby release on agents and typha)"
    )
    answer = asyncio.run(raw(hello("n1", ("Pod", "Lease"))))
    assert answer["t"] == "refused" and "kinds not served: Lease" in answer["reason"]
    answer = asyncio.run(raw({"t": "GET / HTTP/1.1"}))
    assert answer["t"] == "refused" and "expected a tabby-typha hello" in answer["reason"]

    # the client side says so once, and does not retry
    ds = TyphaDatastore("127.0.0.1", srv.port, versions=(7,))
    try:
        with pytest.raises(DatastoreError, match=r"refused this client: protocol version 7 not"):
            ds.list("Pod")
    finally:
        ds.close()
    assert srv.server is not None and srv.server.stats.refused == 4


def test_garbage_is_not_a_peer() -> None:
    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b"\xff\xff\xff\xffHTTP/1.1 200 OK\r\n")
        with pytest.raises(ProtocolError, match="not a tabby-typha peer"):
            await read_frame(reader)

    asyncio.run(main())


def test_a_silent_server_is_declared_dead_and_the_client_reconnects() -> None:
    """A server that stops sending (no bookmark for 3 heartbeats) is left for a new connection."""
    sessions: list[int] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)
        sessions.append(1)
        welcome = {"t": "welcome", "version": 1, "kinds": ["Pod"], "heartbeat_s": 0.1}
        writer.write(frame(welcome) + frame({"t": "synced", "rev": 5}))
        await asyncio.sleep(30)  # then nothing, ever

    async def main() -> None:
        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        r = Replica()
        task = asyncio.create_task(follow("127.0.0.1", port, r, backoff_s=(0.05, 0.1)))
        await until(lambda: len(sessions) >= 2, 5, "a reconnect")
        await stop_tasks([task])
        server.close()
        assert r.synced and r.revision == 5

    asyncio.run(main())


# --- server restart -------------------------------------------------------------------------------


def test_server_restart_clients_reconnect_and_a_watch_goes_on(
    store: EmbeddedDatastore, servers: list[ServerThread]
) -> None:
    burst(store, 200, seed=3)
    old_pod = store.list("Pod")[0][0]
    old_svc = store.list("Service")[0][0]
    srv = serve(servers, store, heartbeat_s=0.5)
    replicas = [Replica(history=0) for _ in range(20)]
    ds = TyphaDatastore("127.0.0.1", srv.port, history=64)
    seen: list[Event] = []
    stop = threading.Event()
    since = ds.revision()

    def watch() -> None:
        with contextlib.suppress(DatastoreError):
            seen.extend(ds.watch(since, stop))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    async def main() -> None:
        tasks = [
            asyncio.create_task(follow("127.0.0.1", srv.port, r, backoff_s=(0.05, 0.5)))
            for r in replicas
        ]
        try:
            await until(lambda: all(r.synced for r in replicas), 10, "first snapshots")
            await asyncio.to_thread(srv.stop)
            # while no server runs: one object created, one deleted, one changed
            store.apply([pod("born-while-down")])
            store.delete("Pod", old_pod["metadata"]["name"], old_pod["metadata"]["namespace"])
            changed = service(old_svc["metadata"]["name"], old_svc["metadata"]["namespace"], 99)
            store.apply([changed])
            final = store.revision()
            await asyncio.to_thread(srv.start)  # the same port
            await until(lambda: all(r.revision >= final for r in replicas), 15, "resync")
            await until(lambda: ds.replica.revision >= final, 15, "the facade's resync")
            assert all(r.snapshots == 2 for r in replicas)
        finally:
            await stop_tasks(tasks)

    asyncio.run(main())
    want = direct_versions(store)
    assert all(r.versions() == want for r in replicas)
    deadline = time.monotonic() + 5
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    watcher.join(5)
    ds.close()
    # the gap reaches the watcher as the diff, at the new snapshot's revision: no relist
    got = sorted((e.type, e.obj["metadata"]["name"]) for e in seen)
    assert got == sorted(
        [
            ("ADDED", "born-while-down"),
            ("DELETED", old_pod["metadata"]["name"]),
            ("MODIFIED", old_svc["metadata"]["name"]),
        ]
    )
    assert len({e.revision for e in seen}) == 1


def test_a_watch_from_before_the_history_relists(
    store: EmbeddedDatastore, servers: list[ServerThread]
) -> None:
    srv = serve(servers, store)
    ds = TyphaDatastore("127.0.0.1", srv.port, history=10)
    try:
        start = ds.revision()
        final = burst(store, 50, seed=5)
        deadline = time.monotonic() + 10
        while ds.revision() < final and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(Compacted, match="relist and watch again"):
            next(ds.watch(start))
        recent = list(_take(ds.watch(final - 10), 10))
        assert [e.revision for e in recent] == list(range(final - 9, final + 1))
    finally:
        ds.close()


def test_the_client_keeps_its_replica_encoded_and_streams_its_list(
    store: EmbeddedDatastore, servers: list[ServerThread]
) -> None:
    """An agent's relist through the fan-out never holds the list decoded: the replica keeps
    each object as the bytes its frame carried, and iter_list decodes one at a time (the
    agent's service index packs each and drops it). Objects handed out are the caller's."""
    revision = store.apply([pod(f"p{i}", gen=i) for i in range(2000)])
    srv = serve(servers, store)
    ds = TyphaDatastore("127.0.0.1", srv.port)
    try:
        deadline = time.monotonic() + 15
        while ds.revision() < revision:
            assert time.monotonic() < deadline, "the client never caught up"
            time.sleep(0.02)
        assert isinstance(ds, StreamingList)
        held = ds.replica.objects["Pod"]
        assert len(held) == 2000 and all(isinstance(v, bytes) for v in held.values())
        listed, _ = ds.list("Pod")
        # the same objects as agents read them (calc/intake.py), in the same order
        assert listed == [kept("Pod", o) for o in store.list("Pod")[0]]
        names = [o["metadata"]["name"] for o in ds.iter_list("Pod")]
        assert names == [o["metadata"]["name"] for o in listed]
        listed[0]["metadata"]["labels"]["gen"] = "mutated"  # the caller's copy, not the replica's
        assert ds.list("Pod")[0][0]["metadata"]["labels"]["gen"] == "0"
        del listed

        tracemalloc.start()
        try:
            for obj in ds.iter_list("Pod"):  # consumed as the agent does: one at a time
                assert obj["kind"] == "Pod"
            streamed_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            whole, _ = ds.list("Pod")
            list_peak = tracemalloc.get_traced_memory()[1]
            del whole
        finally:
            tracemalloc.stop()
        assert streamed_peak * 10 < list_peak, (streamed_peak, list_peak)
    finally:
        ds.close()


def _take(events: Iterator[Event], n: int) -> Iterator[Event]:
    for i, ev in enumerate(events):
        yield ev
        if i + 1 == n:
            return


# --- the agent over a fan-out ---------------------------------------------------------------------


def _node(name: str, ip: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "annotations": {"projectcalico.org/IPv4Address": f"{ip}/19"}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    }


POOL = {
    "apiVersion": "projectcalico.org/v3",
    "kind": "IPPool",
    "metadata": {"name": "pods"},
    "spec": {"cidr": "100.96.0.0/11", "blockSize": 26, "vxlanMode": "Always"},
}


class _Recorder:
    """Stands in for the dataplane worker: keeps what the agent publishes."""

    def __init__(self) -> None:
        self.published: list[tuple[Any, int]] = []

    def prepare(self, base: Any) -> None:
        pass  # no datapath to load

    def submit(self, state: Any, revision: int) -> None:
        self.published.append((state, revision))


def _agent(node: str, url: str) -> tuple[agent.Agent, _Recorder]:
    a = agent.Agent(node, url, None, "/nonexistent")
    rec = _Recorder()
    a.worker = rec  # type: ignore[assignment]
    return a, rec


def test_the_agent_reads_through_typha_and_writes_ipam_to_the_datastore(
    tmp_path: Path, servers: list[ServerThread]
) -> None:
    """The agent's own list/watch code (Agent._ensure_tunnel_address, _relist, _watch) over a
    typha:// URL programs what it programs from the datastore directly."""
    url = f"sqlite://{tmp_path}/store.db"
    store = open_datastore(url)
    store.apply([_node("n1", "172.20.32.11"), _node("n2", "172.20.64.12"), POOL])
    store.apply([service("web"), pod("a")])
    srv = serve(servers, store)
    ds = open_datastore(typha_url(f"127.0.0.1:{srv.port}", url))
    assert isinstance(ds, TyphaDatastore) and consistent(ds) is ds.direct()
    a, rec = _agent("n1", typha_url(f"127.0.0.1:{srv.port}", url))
    try:
        a._ensure_tunnel_address(ds)  # IPAM: reads and writes the real store
        tunnel_ip = BlockIPAM(store).lookup(names.tunnel_handle("n1"))
        assert tunnel_ip is not None and tunnel_ip.startswith("100.96.")
        revision = a._relist(ds)
        watcher = threading.Thread(target=_run_watch, args=(a, ds, revision), daemon=True)
        watcher.start()
        store.apply([_node("n3", "172.20.32.13"), service("api"), pod("b")])
        store.delete("Pod", "a", "default")
        store.patch("Service", "web", "default", {"spec": {"ports": [{"port": 8080}]}})
        final = store.revision()
        deadline = time.monotonic() + 10
        while rec.published[-1][1] < final and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rec.published[-1][1] == final
        # the same state an agent reading the datastore directly computes
        b, direct = _agent("n1", url)
        b._relist(store)
        assert rec.published[-1][0] == direct.published[-1][0]
        assert {k: dict(v) for k, v in a.resources.items() if v} == {
            k: dict(v) for k, v in b.resources.items() if v
        }
    finally:
        a.stop.set()
        ds.close()  # the agent's watch ends with a DatastoreError (closed)
        store.close()


def _run_watch(a: agent.Agent, ds: Any, revision: int) -> None:
    with contextlib.suppress(DatastoreError):
        a._watch(ds, revision)


# --- URLs and the command -------------------------------------------------------------------------


def test_typha_urls() -> None:
    url = typha_url("127.0.0.1:5473", "sqlite:///run/s.db?service-cidr=10.96.0.0/12")
    assert (
        url
        == "typha://127.0.0.1:5473?datastore=sqlite%3A%2F%2F%2Frun%2Fs.db%3Fservice-cidr%3D10.96.0.0%2F12"
    )
    ds = open_datastore(url)
    try:
        assert isinstance(ds, TyphaDatastore)
        assert ds.direct_url == "sqlite:///run/s.db?service-cidr=10.96.0.0/12"
    finally:
        ds.close()
    for bad, why in (
        ("typha://nohost", "needs HOST:PORT"),
        ("typha://h:1?foo=1", "unknown option 'foo'"),
        ("typha://h:1?datastore=typha://h:2", "cannot be typha"),
    ):
        with pytest.raises(DatastoreError, match=why):
            open_datastore(bad)
    ro = TyphaDatastore("127.0.0.1", 9, connect_timeout_s=0.3)
    try:
        with pytest.raises(DatastoreError, match="read-only"):
            ro.create(pod("x"))
        with pytest.raises(DatastoreError, match="no server for"):
            ro.list("Pod")
    finally:
        ro.close()


def test_agent_kinds_are_served() -> None:
    assert set(agent.KINDS) <= set(DEFAULT_KINDS)


def test_tabby_typha_command(store: EmbeddedDatastore, tmp_path: Path) -> None:
    store.apply([pod("a"), service("web")])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "tabby"), "typha",
            "--datastore", f"sqlite://{tmp_path}/store.db", "--listen", f"127.0.0.1:{port}",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        ds = TyphaDatastore("127.0.0.1", port, connect_timeout_s=15)
        try:
            assert direct_versions(ds, ("Pod", "Service")) == direct_versions(
                store, ("Pod", "Service")
            )
        finally:
            ds.close()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    assert "in sync with the datastore" in out


def test_pods_as_the_api_server_serves_them_are_served_as_agents_read_them(
    store: EmbeddedDatastore, servers: list[ServerThread]
) -> None:
    """A Pod as a kube-apiserver serves it (~5 KB) reaches agents, in the server's cache and on
    the wire, as calc/intake.py keeps it: what the agent computes from it, and its version."""
    big = apishapes.pod("default", "web-0", "n1", "100.96.0.5", {"app": "web"})
    big["metadata"]["resourceVersion"] = "7"
    srv = serve(servers, ApiShapedPods(store, big))
    ds = TyphaDatastore("127.0.0.1", srv.port)
    try:
        deadline = time.monotonic() + 15
        while not ds.list("Pod")[0]:
            assert time.monotonic() < deadline, "the client never got the pod"
            time.sleep(0.02)
        (served,) = ds.list("Pod")[0]
        assert served == kept("Pod", big) and served["metadata"]["resourceVersion"] == "7"
        cached = srv.server.objects[("Pod", "default", "web-0")]
        assert len(cached) * 5 < len(json.dumps(big)), "the cache holds the kept object"
    finally:
        ds.close()

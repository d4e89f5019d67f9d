"""One scenario suite, run against every datastore: the embedded (SQLite) one, etcd v3 and the
Kubernetes API (against tests/fakeapi, a fake kube-apiserver on 127.0.0.1, one per test).

etcd is a real one (Debian's etcd-server), started for the session on 127.0.0.1 on free ports
(never 2379/2380) with its data in a temp dir, stopped by its PID and removed even on failure.
Without the etcd binary the etcd cases fail under CI=true and skip elsewhere.

Revisions are compared relatively: etcd commits one apply at one revision, the embedded store
gives each object its own; both promise increasing revisions and resourceVersion == revision
of the object's last write.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from etcdserver import EtcdServer
from fakeapi import FakeApiServer

from tabby.datastore import (
    AlreadyExists,
    Compacted,
    Conflict,
    DatastoreError,
    Event,
    NotFound,
    Unavailable,
    open_datastore,
)
from tabby.datastore import etcd as etcd_store
from tabby.datastore import kubernetes as kube_store
from tabby.datastore.api import StreamingList
from tabby.datastore.embedded import EmbeddedDatastore
from tabby.datastore.etcd import EtcdDatastore
from tabby.datastore.kubernetes import KubernetesDatastore, config_for
from tabby.model import ValidationError

POOL = {
    "apiVersion": "projectcalico.org/v3",
    "kind": "IPPool",
    "metadata": {"name": "pods"},
    "spec": {"cidr": "100.96.0.0/11"},
}


def pod(name: str, ip: str | None = None, **meta: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **meta},
        "spec": {"containers": [{"name": "c"}]},
    }
    if ip:
        obj["status"] = {"podIP": ip}
    return obj


def service(name: str, type_: str = "ClusterIP") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"type": type_, "ports": [{"port": 80}]},
    }


# --- etcd, for real ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory, etcd_binary: str) -> Iterator[EtcdServer]:
    work = tmp_path_factory.mktemp("etcd")
    server = EtcdServer(work)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.work / "data", ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def wipe(ds: EtcdDatastore) -> None:
    root = etcd_store.ROOT
    ds._call(ds._kv.delete(root, etcd_store.prefix_range_end(root)))


class Backend:
    """Opens fresh stores of one kind and compacts their history."""

    def __init__(
        self,
        name: str,
        tmp_path: Path,
        server: EtcdServer | None,
        api: FakeApiServer | None = None,
    ) -> None:
        self.name, self.tmp_path, self.server, self.api = name, tmp_path, server, api
        self.opened: list[Any] = []

    def open(self) -> Any:
        if self.api is not None:
            kubeconfig = self.api.kubeconfig(self.tmp_path / "kubeconfig")
            ds: Any = KubernetesDatastore(config_for(str(kubeconfig)))
        elif self.server is not None:
            ds: Any = EtcdDatastore(self.server.url.removeprefix("etcd://"))
        else:
            ds = EmbeddedDatastore(self.tmp_path / "store.db")
        self.opened.append(ds)
        return ds

    def compact(self, ds: Any, revision: int) -> None:
        """Drop the history up to ``revision``."""
        if self.api is not None:
            self.api.compact(revision)
            return
        if isinstance(ds, EtcdDatastore):
            ds.compact(revision)
            return
        # The embedded store keeps the newest keep_events events, pruned by the next write.
        keep = ds.revision() + 1 - revision
        trimmer = EmbeddedDatastore(ds.path, keep_events=keep)
        trimmer.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "trim"}}])
        trimmer.close()

    def close(self) -> None:
        for ds in self.opened:
            ds.close()


@pytest.fixture(params=["embedded", pytest.param("etcd", marks=pytest.mark.etcd), "kubernetes"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    server = request.getfixturevalue("etcd_server") if request.param == "etcd" else None
    api = FakeApiServer().start() if request.param == "kubernetes" else None
    b = Backend(request.param, tmp_path, server, api)
    if server is not None:
        wipe(b.open())
    try:
        yield b
    finally:
        b.close()
        if api is not None:
            api.stop()


@pytest.fixture
def ds(backend: Backend) -> Any:
    return backend.open()


def rv(obj: dict[str, Any]) -> int:
    return int(obj["metadata"]["resourceVersion"])


def collect(ds: Any, since: int, count: int, timeout_s: float = 10.0) -> list[Event]:
    """The first ``count`` events after ``since`` (fails on timeout)."""
    stop, seen = threading.Event(), []
    timer = threading.Timer(timeout_s, stop.set)
    timer.start()
    try:
        for ev in ds.watch(since, stop):
            seen.append(ev)
            if len(seen) == count:
                break
    finally:
        timer.cancel()
    assert len(seen) == count, f"only {len(seen)} of {count} events in {timeout_s} s"
    return seen


# --- the scenarios -------------------------------------------------------------------------------


def test_create_update_conflict_delete(ds):
    start = ds.revision()
    created = ds.create(POOL)
    assert rv(created) > start and ds.revision() == rv(created)
    with pytest.raises(AlreadyExists):
        ds.create(POOL)
    stale = dict(created)
    fresh = {**created, "spec": {**created["spec"], "natOutgoing": True}}
    updated = ds.update(fresh)
    assert rv(updated) > rv(created)
    assert updated["metadata"]["uid"] == created["metadata"]["uid"]
    assert ds.get("ippool", "pods") == updated
    with pytest.raises(Conflict):
        ds.update(stale)
    with pytest.raises(Conflict, match="resourceVersion is required"):
        ds.update({**POOL, "metadata": {"name": "pods"}})
    with pytest.raises(NotFound):
        ds.update({**POOL, "metadata": {"name": "nope", "resourceVersion": "1"}})
    deleted_at = ds.delete("ippool", "pods")
    assert deleted_at > rv(updated) and ds.revision() == deleted_at
    assert ds.get("ippool", "pods") is None
    with pytest.raises(NotFound):
        ds.delete("ippool", "pods")


def test_apply_outcomes_and_revisions(ds):
    start = ds.revision()
    rev, outcomes = ds.apply_with_outcomes([POOL, pod("a", "100.96.0.2")])
    assert outcomes == ["created", "created"] and rev > start
    assert rv(ds.get("pod", "a")) == rev  # the last object written carries the apply's revision
    rev2, outcomes = ds.apply_with_outcomes([POOL, pod("a", "100.96.0.3")])
    assert outcomes == ["unchanged", "configured"] and rev2 > rev
    assert rv(ds.get("ippool", "pods")) <= rev  # unchanged objects are not rewritten
    rev3, outcomes = ds.apply_with_outcomes([POOL, pod("a", "100.96.0.3")])
    assert outcomes == ["unchanged", "unchanged"] and rev3 == rev2 == ds.revision()
    objs, at = ds.list("pods")
    assert at == rev2 and [o["metadata"]["name"] for o in objs] == ["a"]
    assert ds.list("pods", namespace="other")[0] == []


def test_list_orders_by_namespace_then_name(ds):
    ds.apply([pod("b"), pod("a"), pod("c", namespace="a-ns"), POOL])
    objs, _ = ds.list("pod")
    got = [(o["metadata"]["namespace"], o["metadata"]["name"]) for o in objs]
    assert got == [("a-ns", "c"), ("default", "a"), ("default", "b")]
    assert [o["metadata"]["name"] for o in ds.list("pod", namespace="a-ns")[0]] == ["c"]
    assert [o["metadata"]["name"] for o in ds.list("ippools")[0]] == ["pods"]


def test_apply_keeps_status_when_manifest_has_none(ds):
    ds.apply([pod("a", "100.96.0.2")])
    ds.apply([{**pod("a"), "metadata": {"name": "a", "labels": {"x": "y"}}}])
    assert ds.get("pod", "a")["status"]["podIP"] == "100.96.0.2"


def test_apply_is_all_or_nothing(ds):
    start = ds.revision()
    bad = pod("c")
    bad["spec"]["containers"][0]["bogus"] = 1
    with pytest.raises(ValidationError, match=r"spec.containers\[0\].bogus: unknown field"):
        ds.apply([POOL, pod("a"), bad])
    assert ds.revision() == start and ds.list("ippool")[0] == []


def test_cross_object_check_rolls_back(ds):
    ds.apply([pod("early", "10.0.0.5")])  # no IPPool yet: anything goes
    before = ds.revision()
    with pytest.raises(ValidationError) as exc:
        ds.apply([POOL, pod("ok", "100.96.0.9"), pod("x", "10.0.0.5")])
    assert str(exc.value) == (
        "Pod default/x: status.podIP: 10.0.0.5 is outside every IPPool (100.96.0.0/11)"
    )
    assert ds.revision() == before and ds.get("pod", "ok") is None
    ds.apply([POOL])
    with pytest.raises(ValidationError, match="outside every IPPool"):
        ds.create(pod("y", "10.0.0.6"))
    host = pod("h", "10.0.0.7")
    host["spec"]["hostNetwork"] = True
    ds.apply([host])  # host-network pods carry the node's IP


def test_merge_patch_validates(ds):
    ds.apply([POOL])
    out = ds.patch("ippools", "pods", None, {"spec": {"natOutgoing": True, "nodeSelector": None}})
    assert out["spec"]["natOutgoing"] is True
    assert out["spec"]["nodeSelector"] == "all()"  # removed, then defaulted again
    assert ds.get("ippool", "pods") == out
    with pytest.raises(ValidationError, match="spec.blockSize"):
        ds.patch("ippool", "pods", None, {"spec": {"blockSize": 4}})
    with pytest.raises(NotFound):
        ds.patch("ippool", "missing", None, {"spec": {}})
    with pytest.raises(Conflict):
        ds.patch("ippool", "pods", None, {"metadata": {"resourceVersion": "1"}})
    rev = ds.revision()
    ds.patch("ippool", "pods", None, {"spec": {"natOutgoing": True}})
    assert ds.revision() == rev  # no change, no write


def test_service_admission_allocates_and_keeps(ds):
    svc = ds.create(service("web", "NodePort"))
    ip, node_port = svc["spec"]["clusterIP"], svc["spec"]["ports"][0]["nodePort"]
    assert ip.startswith("100.6") and 30000 <= node_port <= 32767
    again = ds.apply_with_outcomes([service("web", "NodePort")])[1]
    assert again == ["unchanged"]  # allocated fields are kept, so nothing changed
    clash = service("other")
    clash["spec"]["clusterIP"] = ip
    with pytest.raises(ValidationError, match=f"{ip} is already allocated to default/web"):
        ds.apply([clash])
    out = ds.patch("service", "web", None, {"spec": {"type": "ClusterIP"}})
    assert out["spec"]["clusterIP"] == ip and "nodePort" not in out["spec"]["ports"][0]


def test_watch_from_revision_in_order(backend, ds):
    ds.apply([POOL])
    since = ds.revision()
    ds.apply([pod("a", "100.96.0.2", labels={"app": "x"}), pod("b", "100.96.0.3")])
    ds.patch("pod", "b", None, {"metadata": {"labels": {"v": "2"}}})
    deleted_at = ds.delete("pod", "a")
    expected = [
        ("ADDED", "Pod", "a"),
        ("ADDED", "Pod", "b"),
        ("MODIFIED", "Pod", "b"),
        ("DELETED", "Pod", "a"),
    ]
    if backend.name == "kubernetes":  # a Pod's status is a second write (its subresource)
        expected[1:1] = [("MODIFIED", "Pod", "a")]
        expected[3:3] = [("MODIFIED", "Pod", "b")]
    seen = collect(ds, since, len(expected))
    assert [(e.type, e.kind, e.obj["metadata"]["name"]) for e in seen] == expected
    revisions = [e.revision for e in seen]
    assert revisions == sorted(revisions) and revisions[0] > since
    assert [rv(e.obj) for e in seen] == revisions
    gone = seen[-1]
    assert gone.revision == deleted_at
    assert gone.obj["metadata"]["labels"] == {"app": "x"}  # DELETED carries the last state
    assert gone.obj["status"]["podIP"] == "100.96.0.2"


def test_watch_blocks_until_a_change(ds):
    since = ds.revision()
    got: list[tuple[float, Event]] = []
    stop = threading.Event()

    def watcher() -> None:
        for ev in ds.watch(since, stop):
            got.append((time.monotonic(), ev))
            stop.set()

    t = threading.Thread(target=watcher)
    t.start()
    try:
        time.sleep(0.5)
        assert got == []  # nothing happened: nothing yielded
        written = time.monotonic()
        ds.apply([pod("late")])
        t.join(timeout=5)
        assert not t.is_alive() and len(got) == 1
        latency_ms = (got[0][0] - written) * 1000
        print(f"watch wake-up latency: {latency_ms:.1f} ms")
        assert got[0][1].obj["metadata"]["name"] == "late" and latency_ms < 2000
    finally:
        stop.set()
        t.join(timeout=5)
    idle = threading.Event()
    threading.Timer(0.2, idle.set).start()
    started = time.monotonic()
    assert list(ds.watch(ds.revision(), idle)) == []
    assert time.monotonic() - started < 2  # stop is noticed promptly


def test_compaction_raises_then_relist_and_watch(backend, ds):
    for i in range(6):
        ds.apply([pod(f"p{i}")])
    early = ds.revision() - 5
    horizon = ds.revision() - 1
    backend.compact(ds, horizon)
    with pytest.raises(Compacted, match="relist"):
        next(iter(ds.watch(early)))
    # What the agent does: relist, then watch from the list's revision.
    objs, at = ds.list("pods")
    assert {o["metadata"]["name"] for o in objs} == {f"p{i}" for i in range(6)}
    ds.apply([pod("after")])
    (ev,) = collect(ds, at, 1)
    assert (ev.type, ev.obj["metadata"]["name"]) == ("ADDED", "after")


def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lists of 3 per page, so 7 objects take three pages (etcd range reads, continue tokens)."""
    monkeypatch.setattr(etcd_store, "LIST_PAGE", 3)
    monkeypatch.setattr(kube_store, "LIST_CHUNK", 3)


def test_iter_list_streams_what_list_returns_over_pages(backend, ds, monkeypatch):
    small_pages(monkeypatch)
    ds.apply([pod(f"p{i}") for i in range(7)])
    assert isinstance(ds, StreamingList)
    listed, _ = ds.list("pods")
    assert list(ds.iter_list("pods")) == listed and len(listed) == 7
    if backend.api is not None:  # every page a request of its own, continuing the first
        pages = backend.api.list_requests("pods")
        assert len(pages) == 3 + 3 and sum("continue" in q for q in pages) == 2 + 2
    assert [o["metadata"]["name"] for o in ds.iter_list("services")] == []


# the paged stores only: the embedded store's list is one SQLite read transaction, uncut
@pytest.mark.parametrize(
    "backend", [pytest.param("etcd", marks=pytest.mark.etcd), "kubernetes"], indirect=True
)
def test_iter_list_cut_by_compaction_raises_then_a_clean_relist(backend, ds, monkeypatch):
    """History compacted past a paged list's revision between two pages (an expired continue
    token; etcd's range at a compacted revision): the stream raises Compacted, as a compacted
    watch does, and the agent starts its list again, which then sees everything."""
    small_pages(monkeypatch)
    ds.apply([pod(f"p{i}") for i in range(7)])
    stream = ds.iter_list("pods")
    got = [next(stream) for _ in range(3)]  # the first page
    ds.apply([pod("late")])
    backend.compact(ds, ds.revision())
    with pytest.raises(Compacted, match="relist"):
        got += list(stream)
    assert len(got) == 3
    again = [o["metadata"]["name"] for o in ds.iter_list("pods")]
    assert sorted(again) == sorted([f"p{i}" for i in range(7)] + ["late"])


def test_service_allocation_race_between_two_stores(backend):
    """Two store instances, two threads each: every cluster IP and node port is handed out once."""
    stores = [backend.open(), backend.open()]
    made: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def writer(ds: Any, tag: str) -> None:
        try:
            for i in range(12):
                obj = ds.create(service(f"{tag}-{i}", "NodePort"))
                with lock:
                    made.append(obj)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(stores[i % 2], f"w{i}")) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    stored, _ = stores[0].list("services")
    assert len(made) == len(stored) == 48
    for objs in (made, stored):
        ips = [s["spec"]["clusterIP"] for s in objs]
        ports = [s["spec"]["ports"][0]["nodePort"] for s in objs]
        assert len(set(ips)) == 48 and len(set(ports)) == 48
    assert {s["metadata"]["name"]: s["spec"]["clusterIP"] for s in made} == {
        s["metadata"]["name"]: s["spec"]["clusterIP"] for s in stored
    }


# --- etcd only -----------------------------------------------------------------------------------


@pytest.mark.etcd
def test_etcd_urls(etcd_server):
    port = etcd_server.client_port
    ds = open_datastore(f"etcd://127.0.0.1:{port}?service-cidr=10.96.0.0/12")
    try:
        wipe(ds)
        assert ds.create(service("s"))["spec"]["clusterIP"].startswith("10.")
    finally:
        ds.close()
    for bad, why in [
        ("etcd://127.0.0.1", "HOST:PORT"),
        (f"etcd://127.0.0.1:{port}?bogus=1", "unknown option 'bogus'"),
        ("etcd+unix://relative.sock", "absolute socket path"),
        (f"etcd://127.0.0.1:{port}?service-cidr=nope", "service CIDR"),
    ]:
        with pytest.raises(DatastoreError, match=why):
            open_datastore(bad)


@pytest.mark.etcd
def test_etcd_key_layout_and_paged_list(etcd_server, monkeypatch):
    ds = EtcdDatastore(etcd_server.url.removeprefix("etcd://"))
    try:
        wipe(ds)
        ds.apply([POOL, *(pod(f"p{i:02}") for i in range(7))])
        resp = ds._call(ds._kv.get("/tabby/v1/", etcd_store.prefix_range_end("/tabby/v1/")))
        keys = [kv.key.decode() for kv in resp.kvs]
        assert "/tabby/v1/IPPool/_/pods" in keys and "/tabby/v1/Pod/default/p00" in keys
        assert b"resourceVersion" not in resp.kvs[0].value  # it is the key's mod_revision
        monkeypatch.setattr(etcd_store, "LIST_PAGE", 3)
        objs, at = ds.list("pods")
        assert [o["metadata"]["name"] for o in objs] == [f"p{i:02}" for i in range(7)]
        assert at == ds.revision()
    finally:
        ds.close()


@pytest.mark.etcd
def test_etcd_restart_watch_resumes(tmp_path, etcd_binary):
    server = EtcdServer(tmp_path)
    try:
        server.start()
        ds = EtcdDatastore(server.url.removeprefix("etcd://"), reconnect_timeout_s=60)
        ds.apply([pod("before")])
        since = ds.revision()
        events: list[Event] = []
        failures: list[BaseException] = []
        stop = threading.Event()

        def watcher() -> None:
            try:
                for ev in ds.watch(since, stop):
                    events.append(ev)
                    if ev.obj["metadata"]["name"] == "after":
                        stop.set()
            except BaseException as e:  # noqa: BLE001 - reported below
                failures.append(e)

        t = threading.Thread(target=watcher)
        t.start()
        ds.apply([pod("during")])
        deadline = time.monotonic() + 5
        while not events and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()
        with pytest.raises(Unavailable) as exc:
            ds.apply([pod("nobody-listens")])
        assert "\n" not in str(exc.value)
        server.start()
        ds.apply([pod("after")])
        t.join(timeout=30)
        stop.set()
        assert not failures, failures
        assert [e.obj["metadata"]["name"] for e in events] == ["during", "after"]
        ds.close()
    finally:
        server.stop()
        shutil.rmtree(server.work / "data", ignore_errors=True)


@pytest.mark.etcd
def test_etcd_watch_gives_up_when_etcd_stays_away(tmp_path, etcd_binary):
    server = EtcdServer(tmp_path)
    try:
        server.start()
        ds = EtcdDatastore(server.url.removeprefix("etcd://"), reconnect_timeout_s=1.0)
        since = ds.revision()
        server.stop()
        started = time.monotonic()
        with pytest.raises(Unavailable):  # the agent then relists, with backoff
            next(iter(ds.watch(since)))
        assert time.monotonic() - started < 15
        ds.close()
    finally:
        server.stop()
        shutil.rmtree(server.work / "data", ignore_errors=True)


@pytest.mark.etcd
def test_etcd_allocation_retries_when_another_writer_commits_first(etcd_server, monkeypatch):
    """A writes a Service; between A's read and A's commit, B takes the address A picked:
    A's compare fails, A retries from fresh reads and gets another address."""
    a, b = (EtcdDatastore(etcd_server.url.removeprefix("etcd://")) for _ in range(2))
    try:
        wipe(a)
        original = etcd_store._Attempt.admit
        first_pick: list[str] = []

        async def admit(self: Any, obj: dict[str, Any], old: Any) -> dict[str, Any]:
            out = await original(self, obj, old)
            if not first_pick:
                first_pick.append(out["spec"]["clusterIP"])
                await asyncio.to_thread(b.create, service("b", "NodePort"))
            return out

        monkeypatch.setattr(etcd_store._Attempt, "admit", admit)
        got_a = a.create(service("a", "NodePort"))
        got_b = b.get("service", "b")
        assert got_b["spec"]["clusterIP"] == first_pick[0]  # B got what A first picked
        assert got_a["spec"]["clusterIP"] != got_b["spec"]["clusterIP"]
        assert got_a["spec"]["ports"][0]["nodePort"] != got_b["spec"]["ports"][0]["nodePort"]
    finally:
        a.close()
        b.close()

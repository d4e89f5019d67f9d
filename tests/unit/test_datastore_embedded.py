"""The embedded (SQLite) datastore: revisions, all-or-nothing apply, CAS, patch, list/watch."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from tabby.datastore import (
    AlreadyExists,
    Compacted,
    Conflict,
    DatastoreError,
    NotFound,
    Unavailable,
    open_datastore,
)
from tabby.datastore.embedded import BULK_CHECKPOINT, EmbeddedDatastore
from tabby.model import ValidationError

POOL = {
    "apiVersion": "projectcalico.org/v3",
    "kind": "IPPool",
    "metadata": {"name": "pods"},
    "spec": {"cidr": "100.96.0.0/11"},
}


def pod(name: str, ip: str | None = None, **meta) -> dict:
    obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **meta},
        "spec": {"containers": [{"name": "c"}]},
    }
    if ip:
        obj["status"] = {"podIP": ip}
    return obj


@pytest.fixture
def ds(tmp_path):
    store = EmbeddedDatastore(tmp_path / "store.db")
    yield store
    store.close()


def test_open_datastore_urls(tmp_path):
    store = open_datastore(f"sqlite://{tmp_path}/deep/dir/store.db")
    assert store.revision() == 0
    assert (tmp_path / "deep/dir/store.db").exists()
    with pytest.raises(DatastoreError, match="needs an absolute kubeconfig path"):
        open_datastore("kubernetes://in-cluster")
    with pytest.raises(DatastoreError, match="use sqlite:"):
        open_datastore("mysql://db")
    with pytest.raises(DatastoreError, match="absolute path"):
        open_datastore("sqlite://relative.db")


def test_unreadable_datastore_is_one_line(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DatastoreError) as exc:
        open_datastore(f"sqlite://{bad}")
    assert "\n" not in str(exc.value) and "bad.db" in str(exc.value)


def test_revisions_and_outcomes(ds):
    rev, outcomes = ds.apply_with_outcomes([POOL, pod("a", "100.96.0.2")])
    assert (rev, outcomes) == (2, ["created", "created"])  # consecutive revisions, one per object
    assert ds.get("pod", "a")["metadata"]["resourceVersion"] == "2"
    rev, outcomes = ds.apply_with_outcomes([POOL, pod("a", "100.96.0.3")])
    assert (rev, outcomes) == (3, ["unchanged", "configured"])
    objs, at = ds.list("pods")
    assert at == 3 and [o["metadata"]["name"] for o in objs] == ["a"]
    assert ds.list("pods", namespace="other")[0] == []


def test_apply_keeps_status_when_manifest_has_none(ds):
    ds.apply([pod("a", "100.96.0.2")])
    ds.apply([{**pod("a"), "metadata": {"name": "a", "labels": {"x": "y"}}}])
    assert ds.get("pod", "a")["status"]["podIP"] == "100.96.0.2"


def test_apply_is_all_or_nothing(ds):
    bad = pod("c")
    bad["spec"]["containers"][0]["bogus"] = 1
    with pytest.raises(ValidationError, match=r"spec.containers\[0\].bogus: unknown field"):
        ds.apply([POOL, pod("a"), bad])
    assert ds.revision() == 0 and ds.list("ippool")[0] == []


def test_pod_ip_outside_pools_rolls_back(ds):
    ds.apply([pod("early", "10.0.0.5")])  # no IPPool yet: anything goes
    with pytest.raises(ValidationError) as exc:
        ds.apply([POOL, pod("ok", "100.96.0.9"), pod("x", "10.0.0.5")])
    assert str(exc.value) == (
        "Pod default/x: status.podIP: 10.0.0.5 is outside every IPPool (100.96.0.0/11)"
    )
    assert ds.revision() == 1 and ds.get("pod", "ok") is None
    host = pod("h", "10.0.0.7")
    host["spec"]["hostNetwork"] = True
    ds.apply([POOL, host])  # host-network pods carry the node's IP


def test_create_update_cas_delete(ds):
    created = ds.create(POOL)
    with pytest.raises(AlreadyExists):
        ds.create(POOL)
    stale = dict(created)
    fresh = {**created, "spec": {**created["spec"], "natOutgoing": True}}
    updated = ds.update(fresh)
    assert int(updated["metadata"]["resourceVersion"]) == 2
    assert updated["metadata"]["uid"] == created["metadata"]["uid"]
    with pytest.raises(Conflict):
        ds.update(stale)
    with pytest.raises(NotFound):
        ds.update({**POOL, "metadata": {"name": "nope", "resourceVersion": "1"}})
    assert ds.delete("ippool", "pods") == 3
    with pytest.raises(NotFound):
        ds.delete("ippool", "pods")


def test_merge_patch_validates(ds):
    ds.apply([POOL])
    out = ds.patch("ippools", "pods", None, {"spec": {"natOutgoing": True, "nodeSelector": None}})
    assert out["spec"]["natOutgoing"] is True
    assert out["spec"]["nodeSelector"] == "all()"  # removed, then defaulted again
    with pytest.raises(ValidationError, match="spec.blockSize"):
        ds.patch("ippool", "pods", None, {"spec": {"blockSize": 4}})
    with pytest.raises(NotFound):
        ds.patch("ippool", "missing", None, {"spec": {}})
    with pytest.raises(Conflict):
        ds.patch("ippool", "pods", None, {"metadata": {"resourceVersion": "1"}})
    rev = ds.revision()
    ds.patch("ippool", "pods", None, {"spec": {"natOutgoing": True}})
    assert ds.revision() == rev  # no change, no write


def test_a_bulk_write_checkpoints_what_it_wrote(ds):
    """A small write stays in the WAL (SQLite copies it later); a bulk one is copied into the
    database file by its own writer, so the next small write does not pay for it."""
    before = ds.path.stat().st_size
    ds.apply([pod("p0")])
    assert ds.path.stat().st_size == before
    ds.apply([pod(f"p{i}") for i in range(1, BULK_CHECKPOINT + 1)])
    assert ds.path.stat().st_size > before + 4096
    wal, copied = ds.checkpoint()
    assert wal > 0 and copied == wal


def test_a_bulk_write_stands_when_its_checkpoint_fails(ds, monkeypatch):
    def broken() -> tuple[int, int]:
        raise Unavailable("datastore: disk I/O error")

    monkeypatch.setattr(ds, "checkpoint", broken)
    revision = ds.apply([pod(f"p{i}") for i in range(BULK_CHECKPOINT)])
    assert revision == BULK_CHECKPOINT
    assert len(ds.list("Pod")[0]) == BULK_CHECKPOINT


def test_watch_from_revision_in_order(ds):
    ds.apply([POOL])
    ds.apply([pod("a", "100.96.0.2"), pod("b", "100.96.0.3")])
    ds.delete("pod", "a")
    stop = threading.Event()
    seen = []
    for ev in ds.watch(1, stop):
        seen.append((ev.type, ev.kind, ev.obj["metadata"]["name"], ev.revision))
        if len(seen) == 3:
            stop.set()
    assert seen == [
        ("ADDED", "Pod", "a", 2),
        ("ADDED", "Pod", "b", 3),
        ("DELETED", "Pod", "a", 4),
    ]


def test_watch_stops_promptly_when_idle(ds):
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    start = time.monotonic()
    assert list(ds.watch(0, stop)) == []
    assert time.monotonic() - start < 2


def test_compaction(tmp_path):
    ds = EmbeddedDatastore(tmp_path / "s.db", keep_events=3)
    for i in range(10):
        ds.apply([pod(f"p{i}")])
    with pytest.raises(Compacted):
        next(ds.watch(2))
    stop = threading.Event()
    revisions = []
    for ev in ds.watch(7, stop):
        revisions.append(ev.revision)
        if ev.revision == 10:
            stop.set()
    assert revisions == [8, 9, 10]


WATCHER = """
import sys, time
from tabby.datastore.embedded import EmbeddedDatastore
ds = EmbeddedDatastore(sys.argv[1])
print("ready", flush=True)
for ev in ds.watch(int(sys.argv[2])):
    print(time.monotonic(), ev.revision, ev.obj["metadata"]["name"], flush=True)
    break
"""


def test_watcher_in_another_process_wakes_on_write(ds, tmp_path):
    ds.apply([POOL])
    child = subprocess.Popen(
        [sys.executable, "-c", WATCHER, str(ds.path), str(ds.revision())],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # let the child block on inotify, so we measure a wake-up
        start = time.monotonic()
        ds.apply([pod("wake", "100.96.0.4")])
        line = child.stdout.readline().split()
        latency_ms = (float(line[0]) - start) * 1000
        print(f"cross-process watch latency: {latency_ms:.2f} ms")
        assert line[1:] == ["2", "wake"]
        assert latency_ms < 2000  # sanity bound only; expect a few ms
        assert child.wait(timeout=10) == 0
    finally:
        child.kill()

"""The Kubernetes API datastore beyond the shared contract: the fake API server's protocol, the
wire format (CRD groups, paging), URL forms, and the informer (bookmarks, resume after a dropped
stream, relist on 410 Gone without losing a delete, bounded backoff, giving up).

Everything runs against tests/fakeapi (a hand-written fake kube-apiserver on 127.0.0.1).
"""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakeapi import FakeApiServer

from tabby.datastore import DatastoreError, Event, Unavailable, open_datastore
from tabby.datastore import kubernetes as kube
from tabby.datastore.kubernetes import KubernetesDatastore, config_for


def pod(name: str, ns: str = "default", **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"containers": [{"name": "c"}]},
    }


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer(bookmark_interval_s=0.2).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def kubeconfig(api: FakeApiServer, tmp_path: Path) -> Path:
    return api.kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def ds(kubeconfig: Path) -> Iterator[KubernetesDatastore]:
    store = KubernetesDatastore(
        config_for(str(kubeconfig)), reconnect_timeout_s=30, backoff_s=(0.05, 0.4)
    )
    try:
        yield store
    finally:
        store.close()


class Watcher:
    """ds.watch(since) on a thread; events (or the error) land in a queue."""

    def __init__(self, ds: KubernetesDatastore, since: int) -> None:
        self.stop = threading.Event()
        self.q: queue.Queue[Event | BaseException] = queue.Queue()
        self.seen: list[Event] = []  # every event taken, whole
        self.thread = threading.Thread(target=self._run, args=(ds, since), daemon=True)
        self.thread.start()

    def _run(self, ds: KubernetesDatastore, since: int) -> None:
        try:
            for ev in ds.watch(since, self.stop):
                self.q.put(ev)
        except BaseException as err:  # noqa: BLE001 - checked by the test
            self.q.put(err)

    def take(self, count: int, timeout_s: float = 10.0) -> list[tuple[str, str]]:
        out = []
        deadline = time.monotonic() + timeout_s
        while len(out) < count:
            item = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(item, BaseException):
                raise item
            out.append((item.type, item.obj["metadata"]["name"]))
            self.seen.append(item)
        return out

    def quiet(self, wait_s: float = 0.5) -> bool:
        try:
            item = self.q.get(timeout=wait_s)
        except queue.Empty:
            return True
        raise AssertionError(f"unexpected {item}")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def wait_until(pred: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def http(api: FakeApiServer, method: str, path: str, body: Any = None, ctype: str = "") -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(api.url + path, data=data, method=method)
    req.add_header("Content-Type", ctype or "application/json")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def watch_lines(api: FakeApiServer, path: str, count: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(api.url + path, timeout=5) as resp:
        return [json.loads(resp.readline()) for _ in range(count)]


# --- the fake API server speaks the protocol ---------------------------------------------------


def test_fake_api_protocol(api):
    pods = "/api/v1/namespaces/default/pods"
    for name in ("a", "b", "c"):
        assert http(api, "POST", pods, pod(name))[0] == 201
    code, body = http(api, "POST", pods, pod("a"))
    assert (code, body["reason"]) == (409, "AlreadyExists")
    # Chunked list: every page from the first page's snapshot, even after a write.
    code, page = http(api, "GET", "/api/v1/pods?limit=2")
    assert [o["metadata"]["name"] for o in page["items"]] == ["a", "b"]
    at = page["metadata"]["resourceVersion"]
    http(api, "POST", pods, pod("d"))
    token = page["metadata"]["continue"]
    code, rest = http(api, "GET", f"/api/v1/pods?limit=2&continue={token}")
    assert [o["metadata"]["name"] for o in rest["items"]] == ["c"]
    assert rest["metadata"]["resourceVersion"] == at and "continue" not in rest["metadata"]
    # Replace with a stale resourceVersion: 409; the status subresource keeps the rest.
    _, a = http(api, "GET", pods + "/a")
    stale = {**a, "metadata": {**a["metadata"], "resourceVersion": at}}
    stale["metadata"]["labels"] = {"x": "1"}
    assert http(api, "PUT", pods + "/a", stale)[0] == 409
    code, updated = http(api, "PUT", pods + "/a/status", {**a, "status": {"podIP": "10.0.0.1"}})
    assert code == 200 and updated["status"] == {"podIP": "10.0.0.1"}
    code, same = http(api, "PUT", pods + "/a", updated)
    assert same["metadata"]["resourceVersion"] == updated["metadata"]["resourceVersion"]  # no-op
    patch = {"metadata": {"labels": {"p": "1"}, "resourceVersion": at}}
    assert http(api, "PATCH", pods + "/a", patch, "application/merge-patch+json")[0] == 409
    code, patched = http(
        api,
        "PATCH",
        pods + "/a",
        {"metadata": {"labels": {"p": "1"}}},
        "application/merge-patch+json",
    )
    assert code == 200 and patched["metadata"]["labels"] == {"p": "1"}
    code, gone = http(api, "DELETE", pods + "/b")
    assert code == 200 and int(gone["metadata"]["resourceVersion"]) == api.rv
    assert http(api, "GET", pods + "/b")[1]["reason"] == "NotFound"
    # Watch from an RV replays the history after it; from a compacted one: ERROR 410.
    lines = watch_lines(api, f"/api/v1/pods?watch=true&resourceVersion={at}", 4)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in lines] == [
        ("ADDED", "d"),
        ("MODIFIED", "a"),
        ("MODIFIED", "a"),
        ("DELETED", "b"),
    ]
    (first,) = watch_lines(api, "/api/v1/pods?watch=1", 1)  # no RV: the current state first
    assert first["type"] == "ADDED"
    (mark,) = watch_lines(
        api, f"/api/v1/pods?watch=1&resourceVersion={api.rv}&allowWatchBookmarks=true", 1
    )
    assert mark["type"] == "BOOKMARK" and mark["object"]["metadata"] == {
        "resourceVersion": str(api.rv)
    }
    api.compact()
    (err,) = watch_lines(api, f"/api/v1/pods?watch=1&resourceVersion={at}", 1)
    assert err["type"] == "ERROR" and err["object"]["code"] == 410
    assert err["object"]["reason"] == "Expired"
    assert http(api, "GET", f"/api/v1/pods?limit=2&continue={token}")[0] == 410


# --- wire format and URLs ------------------------------------------------------------------------


def test_calico_kinds_are_crds_in_calico_group_and_read_back_as_v3(api, ds):
    ds.apply(
        [
            {
                "apiVersion": "projectcalico.org/v3",
                "kind": "IPPool",
                "metadata": {"name": "pods"},
                "spec": {"cidr": "100.96.0.0/11", "vxlanMode": "Always"},
            },
            {
                "apiVersion": "tabby.dev/v1",
                "kind": "IPAMBlock",
                "metadata": {"name": "b1"},
                "spec": {"cidr": "100.96.0.0/26", "affinity": "host:n1"},
            },
        ]
    )
    stored = {(r.api_version, r.plural, name) for (r, _, name) in api.objects}
    assert stored == {
        ("crd.projectcalico.org/v1", "ippools", "pods"),
        ("tabby.dev/v1", "ipamblocks", "b1"),
    }
    assert ds.get("ippool", "pods")["apiVersion"] == "projectcalico.org/v3"
    # Written by another client in Calico's own form: read the same way.
    api.put_object(
        {
            "apiVersion": "crd.projectcalico.org/v1",
            "kind": "FelixConfiguration",
            "metadata": {"name": "default", "managedFields": [{"manager": "kubectl"}]},
            "spec": {"bpfEnabled": True},
        }
    )
    felix = ds.get("felixconfiguration", "default")
    assert (
        felix["apiVersion"] == "projectcalico.org/v3" and "managedFields" not in felix["metadata"]
    )


def test_list_is_paged(api, ds, monkeypatch):
    monkeypatch.setattr(kube, "LIST_CHUNK", 3)
    ds.apply([pod(f"p{i:02}") for i in range(8)])
    api.requests.clear()
    objs, at = ds.list("pods")
    assert [o["metadata"]["name"] for o in objs] == [f"p{i:02}" for i in range(8)]
    assert at == api.rv
    continues = [q for _, _, path, q in api.requests if path == "/api/v1/pods" and "continue" in q]
    assert len(continues) == 2


def test_urls(api, kubeconfig, monkeypatch):
    ds = open_datastore(f"kubernetes://{kubeconfig}?context=fake")
    try:
        assert ds.revision() == api.rv
    finally:
        ds.close()
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    for url in ("kubernetes://", "kubernetes"):
        ds = open_datastore(url)
        try:
            assert ds.revision() == api.rv
        finally:
            ds.close()
    for bad, why in [
        ("kubernetes://relative/kubeconfig", "absolute kubeconfig path"),
        (f"kubernetes://{kubeconfig}?service-cidr=10.96.0.0/12", "allocates service addresses"),
        (f"kubernetes://{kubeconfig}?bogus=1", "unknown option 'bogus'"),
        (f"kubernetes://{kubeconfig}?context=nope", "no usable configuration"),
        ("kubernetes:///nonexistent/kubeconfig", "no usable configuration"),
    ]:
        with pytest.raises(DatastoreError, match=why):
            open_datastore(bad)


def test_unreachable_api_server_is_unavailable(tmp_path):
    server = FakeApiServer().start()
    kubeconfig = server.kubeconfig(tmp_path / "kubeconfig")
    server.stop()
    ds = open_datastore(f"kubernetes://{kubeconfig}")
    try:
        with pytest.raises(Unavailable) as exc:
            ds.revision()
        assert "\n" not in str(exc.value)
    finally:
        ds.close()


# --- the informer --------------------------------------------------------------------------------


def test_bookmarks_advance_the_resume_revision(api, ds):
    """A quiet kind's watch follows the global revision through bookmarks, so resuming after
    the history moved on and was compacted needs no relist."""
    ds.apply([pod("a")])
    since = ds.revision()
    w = Watcher(ds, since)
    try:
        ds.apply(
            [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"n{i}"}}
                for i in range(3)
            ]
        )
        assert w.take(3) == [("ADDED", "n0"), ("ADDED", "n1"), ("ADDED", "n2")]
        newest = api.rv
        time.sleep(api.bookmark_interval_s * 3)  # a bookmark at `newest` reaches every watch
        api.compact()
        api.drop_watches()
        wait_until(lambda: len(api.watch_requests("pods")) >= 2)
        resumed = api.watch_requests("pods")[-1]
        assert resumed["resourceVersion"] == str(newest)  # from the bookmark, not from `since`
        assert resumed["allowWatchBookmarks"] == "true" and int(resumed["timeoutSeconds"]) >= 300
        ds.delete("pod", "a")
        assert w.take(1) == [("DELETED", "a")]
        assert api.gone_sent == 0 and ds.relists == 0
    finally:
        w.close()


def test_relist_after_410_emits_the_delete_missed_while_disconnected(api, ds):
    ds.apply([pod("a"), pod("b", app="web"), pod("c")])
    ds.list("pods")  # the caller's list: the informer's seed
    since = ds.revision()
    w = Watcher(ds, since)
    try:
        ds.apply([pod("x")])
        assert w.take(1) == [("ADDED", "x")]
        # Every kind's informer past its seed (the quiet ones through a bookmark): before that,
        # a 410 means the caller's revision is too old and the stream raises Compacted.
        time.sleep(api.bookmark_interval_s * 3)
        with api.cv:  # atomically for the watchers: cut, change, compact
            api.drop_watches()
            api.delete_object("Pod", "b", "default")
            api.put_object({**pod("a", v="2")})
            api.put_object(pod("d"))
            api.compact()
        got = w.take(3)
        assert sorted(got) == [("ADDED", "d"), ("DELETED", "b"), ("MODIFIED", "a")]
        # what the informer kept of b (its resourceVersion and labels) makes the tombstone
        gone = next(e for e in w.seen if e.type == "DELETED")
        assert gone.obj == {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "b",
                "namespace": "default",
                "labels": {"app": "web"},
                "resourceVersion": str(gone.revision),
            },
        }
        assert ds.relists >= 1 and api.gone_sent >= 1  # compaction is global: some kinds relist
        ds.apply([pod("e")])  # and the watch goes on from the relist
        assert w.take(1) == [("ADDED", "e")]
        assert w.quiet(0.3)
    finally:
        w.close()


def test_reconnect_after_dropped_stream_resumes_from_last_event(api, ds):
    since = ds.revision()
    w = Watcher(ds, since)
    try:
        ds.apply([pod("a")])
        assert w.take(1) == [("ADDED", "a")]
        last = str(api.rv)
        with api.cv:
            api.drop_watches()
            api.put_object(pod("b"))
        assert w.take(1) == [("ADDED", "b")]
        assert w.quiet(0.3)  # nothing replayed twice
        resumed = [q for q in api.watch_requests("pods") if q.get("resourceVersion") == last]
        assert resumed and ds.relists == 0 and api.gone_sent == 0
    finally:
        w.close()


def test_clean_close_resumes_too(api, ds):
    w = Watcher(ds, ds.revision())
    try:
        api.close_watches()
        ds.apply([pod("a")])
        assert w.take(1) == [("ADDED", "a")]
    finally:
        w.close()


def test_backoff_is_bounded_and_recovers(api, kubeconfig):
    ds = KubernetesDatastore(config_for(str(kubeconfig)), backoff_s=(0.1, 0.8))
    w = Watcher(ds, ds.revision())
    try:
        wait_until(lambda: len(api.watch_requests("pods")) >= 1)
        api.inject(503, 10_000, watches_only=True)
        api.drop_watches()
        start = len(api.watch_requests("pods"))
        # it keeps retrying (a loaded machine may take a while to notice the drop)...
        wait_until(lambda: len(api.watch_requests("pods")) - start >= 2)
        # ...but backs off: 0.1 s doubling to 0.8 s (jittered down to half) is at most ~10
        # tries in 3 s, not a spin
        counted = len(api.watch_requests("pods"))
        time.sleep(3.0)
        failed = len(api.watch_requests("pods")) - counted
        api._inject.clear()
        assert failed <= 12, failed
        ds.apply([pod("a")])
        assert w.take(1, timeout_s=5) == [("ADDED", "a")]
        assert ds.relists == 0
    finally:
        w.close()
        ds.close()


def test_watch_gives_up_when_the_api_server_stays_away(tmp_path):
    server = FakeApiServer().start()
    ds = KubernetesDatastore(
        config_for(str(server.kubeconfig(tmp_path / "kubeconfig"))),
        reconnect_timeout_s=1.0,
        backoff_s=(0.05, 0.2),
    )
    try:
        since = ds.revision()
        w = Watcher(ds, since)
        wait_until(lambda: len(server.watch_requests()) >= 10)  # every kind is watching
        server.stop()
        started = time.monotonic()
        with pytest.raises(Unavailable, match="watch"):
            w.take(1, timeout_s=10)
        assert time.monotonic() - started < 5
        w.close()
    finally:
        ds.close()


def test_watch_from_zero_starts_with_the_current_state(api, ds):
    ds.apply([pod("a"), pod("b")])
    w = Watcher(ds, 0)
    try:
        got = w.take(2)
        assert sorted(got) == [("ADDED", "a"), ("ADDED", "b")]
        ds.delete("pod", "a")
        assert w.take(1) == [("DELETED", "a")]
    finally:
        w.close()


def test_integer_resource_versions_are_required():
    with pytest.raises(DatastoreError, match="not an integer"):
        kube._revision("opaque-1")

"""WatchHealth: a datastore whose watch is retrying a lost connection says so (the agent is
not-ready meanwhile), and stops saying so once the stream is back, with no event lost."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fakeapi import FakeApiServer
from test_datastore_contract import EtcdServer

from tabby.datastore.api import Event, WatchHealth
from tabby.datastore.embedded import EmbeddedDatastore
from tabby.datastore.etcd import EtcdDatastore
from tabby.datastore.kubernetes import KubernetesDatastore, config_for

NS = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}


def _until(pred: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


class Watching:
    def __init__(self, ds: Any) -> None:
        self.stop = threading.Event()
        self.events: queue.Queue[Event | BaseException] = queue.Queue()
        since = ds.revision()
        self.thread = threading.Thread(target=self._run, args=(ds, since), daemon=True)
        self.thread.start()

    def _run(self, ds: Any, since: int) -> None:
        try:
            for ev in ds.watch(since, self.stop):
                self.events.put(ev)
        except BaseException as e:  # noqa: BLE001
            self.events.put(e)

    def names(self, timeout_s: float = 15.0) -> str:
        item = self.events.get(timeout=timeout_s)
        assert isinstance(item, Event), item
        return str(item.obj["metadata"]["name"])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


@pytest.fixture
def etcd(tmp_path: Path, etcd_binary: str) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.mark.etcd
def test_etcd_watch_reports_the_outage_and_recovers(etcd: EtcdServer) -> None:
    ds = EtcdDatastore(etcd.url.removeprefix("etcd://"), reconnect_timeout_s=60)
    assert isinstance(ds, WatchHealth)
    w = Watching(ds)
    try:
        time.sleep(0.3)
        assert ds.watch_problem() is None
        etcd.stop()
        _until(lambda: ds.watch_problem() is not None)
        assert "retrying" in (ds.watch_problem() or "")
        etcd.start()
        _until(lambda: ds.watch_problem() is None)
        ds.apply([NS])
        assert w.names() == "a"
    finally:
        w.close()
        ds.close()


def test_kubernetes_watch_reports_the_outage_and_recovers(tmp_path: Path) -> None:
    api = FakeApiServer(bookmark_interval_s=0.2).start()
    ds = KubernetesDatastore(
        config_for(str(api.kubeconfig(tmp_path / "kc"))),
        reconnect_timeout_s=60,
        backoff_s=(0.1, 0.2),
    )
    w = Watching(ds)
    try:
        _until(lambda: len(api.watch_requests()) >= 9)  # one informer per kind is up
        assert ds.watch_problem() is None
        api.inject(503, 40, watches_only=True)
        api.drop_watches()
        _until(lambda: ds.watch_problem() is not None)
        assert "watch" in (ds.watch_problem() or "")
        _until(lambda: ds.watch_problem() is None)  # the injected failures are used up
        ds.apply([NS])
        assert w.names() == "a"
    finally:
        w.close()
        ds.close()
        api.stop()


def test_embedded_store_needs_no_report(tmp_path: Path) -> None:
    assert not isinstance(EmbeddedDatastore(str(tmp_path / "s.db")), WatchHealth)

"""One scenario suite per datastore, asserting what the agent programs (issue 9).

The same steps run against the embedded store (SQLite), a real etcd and the Kubernetes API
(tests/fakeapi): create, update and delete a Service and its EndpointSlice, a NetworkPolicy and
the pod relabels that change what it selects, a Node with its IPAM block, the datastore going
away with changes made while the agent is cut off, and a delete made across a compaction (410).

The agent is the real one (``tabby agent``, a process of its own) for node n1, in a network
namespace this module creates (a veth as the data interface, one veth per local pod); its BPF
maps are pinned in a directory of this module. After each step the test waits until the agent's
/readyz reports the store's revision programmed, then reads the pinned maps through their Python
mirrors (``tabbyctl bpf nat dump``'s reader, tby_routes, tby_pol_*) and the namespace's kernel
routes (retried for a few seconds: over the Kubernetes API one watch per kind, so the revision
is no barrier across kinds). The agent is stopped by its PID; the namespace, the pins, etcd and
the fake API server are removed even on failure. The three backends take about 30 s together.

"Restart" per datastore: etcd is stopped and started again by its PID; the fake API server cuts
every watch connection; the embedded store has no process of its own, so its restart is the
agent's (stopped by PID, started again on the same pins). In each case the agent is kept from
the store (SIGSTOP, or stopped) while the changes are made. Compaction: etcd's compact after a
restart (the watch resumes below the horizon), the fake API's 410 Gone, the embedded store's
trimmed history; the agent's log must show the relist.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from etcdserver import EtcdServer
from fakeapi import FakeApiServer

from tabby.bpf.maps.policy import DIR_IN, PolicyFlags, PolicyMaps
from tabby.bpf.maps.routes import ROUTES_SPEC, RouteFlags, RoutesMap
from tabby.calc import names
from tabby.cli.bpf import read_nat
from tabby.datastore import open_datastore
from tabby.datastore.embedded import EmbeddedDatastore
from tabby.lab.cluster import tabby_bin
from tabby.netlink.netns import enter_netns

pytestmark = [pytest.mark.root]

NODE, NODE_IP = "n1", "172.20.32.11"
PEER, PEER_IP = "n2", "172.20.32.12"
PEER_BLOCK = "100.96.7.0/26"
WEB_IP, CLIENT_IP = "100.96.0.40", "100.96.7.5"
HEALTH_PORT = 9099
READY_S = 30.0
RELIST_LOG = "watch history compacted: relisting"  # agent.py, on Compacted


def obj(api_version: str, kind: str, name: str, **rest: Any) -> dict[str, Any]:
    meta = {"name": name, **rest.pop("meta", {})}
    return {"apiVersion": api_version, "kind": kind, "metadata": meta, **rest}


def node(name: str, ip: str) -> dict[str, Any]:
    return obj(
        "v1",
        "Node",
        name,
        meta={"annotations": {"projectcalico.org/IPv4Address": f"{ip}/19"}},
        status={"addresses": [{"type": "InternalIP", "address": ip}]},
    )


def block(cidr: str, owner: str) -> dict[str, Any]:
    spec = {"cidr": cidr, "affinity": f"host:{owner}", "allocations": {}}
    return obj("tabby.dev/v1", "IPAMBlock", names.block_name(cidr), spec=spec)


def pod(name: str, on: str, ip: str, labels: dict[str, str]) -> dict[str, Any]:
    return obj(
        "v1",
        "Pod",
        name,
        meta={"namespace": "default", "labels": labels},
        spec={"nodeName": on, "containers": [{"name": "c"}]},
        status={"podIP": ip, "phase": "Running"},
    )


# ClusterIPs given, not allocated: an allocator hands a freed address to the next Service,
# which would hide a lost delete
VIPS = {
    "web": "100.64.12.1",
    **{
        f"{p}-{n}": f"100.64.{10 + i}.{j + 1}"
        for i, p in enumerate(("rs", "cp"))
        for j, n in enumerate(("gone", "kept", "new"))
    },
}


def service(name: str, port: int) -> dict[str, Any]:
    spec = {
        "clusterIP": VIPS[name],
        "ports": [{"port": port, "targetPort": 8080, "protocol": "TCP"}],
    }
    return obj("v1", "Service", name, meta={"namespace": "default"}, spec=spec)


def slice_(service_name: str, ips: list[str]) -> dict[str, Any]:
    """The EndpointSlice the controller would write (the agent reads slices, not pods)."""
    return obj(
        "discovery.k8s.io/v1",
        "EndpointSlice",
        f"{service_name}-abcde",
        meta={"namespace": "default", "labels": {"kubernetes.io/service-name": service_name}},
        addressType="IPv4",
        endpoints=[{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
        ports=[{"name": "", "port": 8080, "protocol": "TCP"}],
    )


BASE = [
    obj(
        "projectcalico.org/v3",
        "IPPool",
        "pods",
        spec={"cidr": "100.96.0.0/16", "blockSize": 26, "vxlanMode": "Always"},
    ),
    node(NODE, NODE_IP),
    node(PEER, PEER_IP),
    block(PEER_BLOCK, PEER),
    pod("web-a", NODE, WEB_IP, {"app": "web"}),
    pod("client", PEER, CLIENT_IP, {}),
]
LOCAL_PODS = ("web-a",)


# --- the datastores --------------------------------------------------------------------------


class Store:
    """One datastore of a kind, with its restart and its compaction."""

    def __init__(self, kind: str, work: Path) -> None:
        self.kind, self.work = kind, work
        self.etcd: EtcdServer | None = None
        self.api: FakeApiServer | None = None
        self.ds: Any = None
        self.url = f"sqlite:///{work / 'store.db'}"

    def open(self) -> None:
        """Start the server (etcd, fake API) and connect; close() undoes what got done."""
        if self.kind == "etcd":
            self.etcd = EtcdServer(self.work)
            self.etcd.start()
            self.url = self.etcd.url
        elif self.kind == "kubernetes":
            self.api = FakeApiServer(bookmark_interval_s=0.2).start()
            self.url = f"kubernetes://{self.api.kubeconfig(self.work / 'kubeconfig')}"
        self.ds = open_datastore(self.url)

    def reopen(self) -> None:
        """A fresh client (after etcd came back)."""
        self.ds.close()
        self.ds = open_datastore(self.url)

    def close(self) -> None:
        if self.ds is not None:
            self.ds.close()
        if self.etcd is not None:
            self.etcd.stop()
            shutil.rmtree(self.work / "data", ignore_errors=True)
        if self.api is not None:
            self.api.stop()


# --- the agent and its node ------------------------------------------------------------------


class Node:
    """n1: a namespace with a data interface and the local pods' veths, and its agent process."""

    def __init__(self, work: Path, url: str) -> None:
        self.work, self.url = work, url
        tag = uuid.uuid4().hex[:8]
        self.netns = f"tabby-dss-{tag}"
        self.pin_root = f"/sys/fs/bpf/tabby-test-dss-{tag}"
        self.log_path = work / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def create(self) -> None:
        ns = self.netns
        run = ["ip", "-n", ns]
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run([*run, "link", "set", "lo", "up"], check=True)
        # the data interface: a veth whose far end stays here (no dummy module on this kernel)
        subprocess.run(
            [*run, "link", "add", "eth0", "type", "veth", "peer", "name", "fabric0"], check=True
        )
        subprocess.run([*run, "link", "set", "fabric0", "up"], check=True)
        subprocess.run([*run, "addr", "add", f"{NODE_IP}/19", "dev", "eth0"], check=True)
        subprocess.run([*run, "link", "set", "eth0", "up"], check=True)
        for i, name in enumerate(LOCAL_PODS):  # the CNI's veth; its pod end stays here too
            host = names.host_ifname("default", name)
            peer = f"pod{i}"
            subprocess.run(
                [*run, "link", "add", host, "type", "veth", "peer", "name", peer], check=True
            )
            subprocess.run([*run, "link", "set", host, "up"], check=True)
            subprocess.run([*run, "link", "set", peer, "up"], check=True)

    def start(self) -> None:
        argv = [
            tabby_bin(),
            "agent",
            "--node",
            NODE,
            "--datastore",
            self.url,
            "--netns",
            self.netns,
            "--pin-root",
            self.pin_root,
            "--data-iface",
            "eth0",
            "--health-port",
            str(HEALTH_PORT),
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log)

    def stop(self) -> None:
        """SIGTERM by PID (SIGKILL after 10 s); a stopped (SIGSTOP) agent is continued first."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def destroy(self) -> None:
        self.stop()
        subprocess.run(["ip", "netns", "del", self.netns], check=False)
        subprocess.run(["rm", "-rf", self.pin_root], check=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def readyz(self) -> dict[str, Any]:
        """The agent's /readyz, fetched from inside the node's namespace (a fresh thread)."""
        out: dict[str, Any] = {}

        def fetch() -> None:
            with enter_netns(self.netns):
                url = f"http://127.0.0.1:{HEALTH_PORT}/readyz"
                try:
                    with urllib.request.urlopen(url, timeout=2) as r:
                        out.update(json.load(r))
                except urllib.error.HTTPError as e:
                    out.update(json.load(e))
                except OSError as e:
                    out.update({"ready": False, "error": str(e)})

        t = threading.Thread(target=fetch)
        t.start()
        t.join()
        return out

    def wait_programmed(self, ds: Any, timeout_s: float = READY_S) -> None:
        """Until the agent is ready with the store's current revision programmed."""
        target = ds.revision()
        deadline = time.monotonic() + timeout_s
        while True:
            r = self.readyz()
            if r.get("ready") and int(r.get("revision", 0)) >= target:
                return
            assert self.proc is not None and self.proc.poll() is None, self.log()[-3000:]
            assert time.monotonic() < deadline, f"not programmed at {target}: {r}"
            time.sleep(0.1)

    def wait_problem(self, timeout_s: float = READY_S) -> str:
        """Until /readyz names a datastore problem (the agent saw the store go)."""
        deadline = time.monotonic() + timeout_s
        while True:
            r = self.readyz()
            if r.get("datastore", "ok") != "ok":
                return str(r["datastore"])
            assert time.monotonic() < deadline, f"the agent never noticed: {r}"
            time.sleep(0.1)

    # --- what is programmed ------------------------------------------------------------------

    def frontends(self) -> dict[tuple[str, int], list[str]]:
        """(VIP, port) -> backends "ip:port", from the pinned NAT maps."""
        return {
            (row["addr"], row["port"]): [f"{b['addr']}:{b['port']}" for b in row["backends"]]
            for row in read_nat(self.pin_root)
            if row["protocol"] == "TCP"
        }

    def routes(self) -> dict[str, Any]:
        m = ROUTES_SPEC.open_pinned(self.pin_root)
        try:
            return RoutesMap(m).dump()
        finally:
            m.close()

    def kernel_routes(self) -> str:
        done = subprocess.run(
            ["ip", "-n", self.netns, "route", "show"], capture_output=True, text=True, check=True
        )
        return done.stdout

    def policy(self, ip: str) -> tuple[int, set[str]] | None:
        """A local pod's policy flags and the peers its ingress rules admit; None: open."""
        maps = PolicyMaps.open_pinned(self.pin_root)
        try:
            ep = maps.endpoint(ip)
            if ep is None:
                return None
            peers = {k.cidr for k in maps.peer_keys() if k.set == ep.set * 2 + DIR_IN}
            return int(ep.flags), peers
        finally:
            maps.close()


class Scenario:
    def __init__(self, store: Store, node_: Node) -> None:
        self.store, self.node = store, node_

    @property
    def ds(self) -> Any:
        return self.store.ds

    def expect(self, check: Callable[[], None], timeout_s: float = 10.0) -> None:
        """The agent ready at the store's revision, then ``check`` passing (retried: over the
        Kubernetes API each kind has its own watch, so an event of one kind may be programmed
        before an older one of another; the revision alone is no barrier there)."""
        self.node.wait_programmed(self.ds)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                check()
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def vip(self, name: str) -> str:
        svc = self.ds.get("Service", name, "default")
        assert svc is not None and svc["spec"]["clusterIP"] == VIPS[name]
        return VIPS[name]


@pytest.fixture(
    scope="module", params=["embedded", pytest.param("etcd", marks=pytest.mark.etcd), "kubernetes"]
)
def scenario(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, root_caps: None
) -> Iterator[Scenario]:
    if request.param == "etcd":
        request.getfixturevalue("etcd_binary")
    work = tmp_path_factory.mktemp(f"dss-{request.param}")
    store = Store(request.param, work)
    node_: Node | None = None
    try:
        store.open()
        store.ds.apply(BASE)
        node_ = Node(work, store.url)
        node_.create()
        node_.start()
        s = Scenario(store, node_)
        s.node.wait_programmed(store.ds)
        yield s
    finally:
        if node_ is not None:
            node_.destroy()
        store.close()
    assert node_ is not None and not os.path.exists(node_.pin_root)


# --- the scenario ----------------------------------------------------------------------------


def test_start_programs_the_node(scenario: Scenario) -> None:
    """After the first list: the peer's block over VXLAN, both nodes, the local pod and the
    agent's own tunnel address (claimed from IPAM at start, through this datastore)."""

    def check() -> None:
        routes = scenario.node.routes()
        assert routes[PEER_BLOCK].next_hop_ip == PEER_IP
        assert routes[PEER_BLOCK].route_flags & RouteFlags.ENCAP_VXLAN
        assert routes[f"{PEER_IP}/32"].route_flags & RouteFlags.REMOTE_HOST
        assert routes[f"{WEB_IP}/32"].route_flags & RouteFlags.LOCAL_WL
        tunnel = [c for c, v in routes.items() if v.route_flags & RouteFlags.TUNNEL_ADDR]
        pool = ipaddress.ip_network("100.96.0.0/16")
        assert len(tunnel) == 1 and ipaddress.ip_network(tunnel[0]).subnet_of(pool)
        assert f"{PEER_BLOCK} dev {names.TUNNEL_DEVICE} " in scenario.node.kernel_routes()

    scenario.expect(check)


def test_service_create_update_delete(scenario: Scenario) -> None:
    ds, n = scenario.ds, scenario.node
    vip = VIPS["web"]
    ds.apply([service("web", 80), slice_("web", [WEB_IP])])
    assert scenario.vip("web") == vip

    def created() -> None:
        assert n.frontends()[(vip, 80)] == [f"{WEB_IP}:8080"]

    scenario.expect(created)
    # update: the port moves and the slice gains the remote pod
    ds.patch("Service", "web", "default", {"spec": {"ports": [{"port": 81, "targetPort": 8080}]}})
    ds.apply([slice_("web", [WEB_IP, CLIENT_IP])])

    def updated() -> None:
        fe = n.frontends()
        assert (vip, 80) not in fe
        assert sorted(fe[(vip, 81)]) == sorted([f"{WEB_IP}:8080", f"{CLIENT_IP}:8080"])

    scenario.expect(updated)
    ds.apply([slice_("web", [CLIENT_IP])])  # an endpoint leaves

    def shrunk() -> None:
        assert n.frontends()[(vip, 81)] == [f"{CLIENT_IP}:8080"]

    scenario.expect(shrunk)
    ds.delete("EndpointSlice", "web-abcde", "default")
    ds.delete("Service", "web", "default")

    def deleted() -> None:
        assert not [key for key in n.frontends() if key[0] == vip]

    scenario.expect(deleted)


def test_network_policy_and_relabels(scenario: Scenario) -> None:
    """Only pods labelled role=friend may reach app=web: the client is admitted once relabelled;
    web-a relabelled out of the selector is open again (no entry)."""
    ds, n = scenario.ds, scenario.node
    policy = obj(
        "networking.k8s.io/v1",
        "NetworkPolicy",
        "friends-only",
        meta={"namespace": "default"},
        spec={
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "friend"}}}]}],
        },
    )
    ds.apply([policy])

    def isolated(admits_client: bool) -> Callable[[], None]:
        def check() -> None:
            got = n.policy(WEB_IP)
            assert got is not None, "web-a is not isolated"
            flags, peers = got
            assert flags & PolicyFlags.ISO_IN and not flags & PolicyFlags.ISO_OUT
            assert (f"{CLIENT_IP}/32" in peers) == admits_client, peers

        return check

    def open_() -> None:
        assert n.policy(WEB_IP) is None

    scenario.expect(isolated(admits_client=False))
    ds.patch("Pod", "client", "default", {"metadata": {"labels": {"role": "friend"}}})
    scenario.expect(isolated(admits_client=True))
    ds.patch("Pod", "web-a", "default", {"metadata": {"labels": {"app": "other"}}})
    scenario.expect(open_)
    ds.patch("Pod", "web-a", "default", {"metadata": {"labels": {"app": "web"}}})
    scenario.expect(isolated(admits_client=True))
    ds.delete("NetworkPolicy", "friends-only", "default")
    ds.patch("Pod", "client", "default", {"metadata": {"labels": {"role": None}}})
    scenario.expect(open_)


def test_node_and_block_routes(scenario: Scenario) -> None:
    ds, n = scenario.ds, scenario.node
    ds.apply([node("n3", "172.20.32.13"), block("100.96.9.0/26", "n3")])

    def routed() -> None:
        routes = n.routes()
        assert routes["100.96.9.0/26"].next_hop_ip == "172.20.32.13"
        assert "172.20.32.13/32" in routes
        assert f"100.96.9.0/26 dev {names.TUNNEL_DEVICE} " in n.kernel_routes()

    scenario.expect(routed)
    # the node goes (as the node controller releases it: its block first)
    ds.delete("IPAMBlock", names.block_name("100.96.9.0/26"))
    ds.delete("Node", "n3")

    def released() -> None:
        routes = n.routes()
        assert "100.96.9.0/26" not in routes and "172.20.32.13/32" not in routes
        assert "100.96.9.0/26" not in n.kernel_routes()

    scenario.expect(released)


def _services_before_outage(scenario: Scenario, prefix: str) -> tuple[str, str]:
    """Two services programmed: one to delete while the agent is cut off, one to keep."""
    ds = scenario.ds
    ds.apply(
        [
            service(f"{prefix}-gone", 80),
            slice_(f"{prefix}-gone", [WEB_IP]),
            service(f"{prefix}-kept", 80),
            slice_(f"{prefix}-kept", [WEB_IP]),
        ]
    )
    gone, kept = VIPS[f"{prefix}-gone"], VIPS[f"{prefix}-kept"]

    def both() -> None:
        fe = scenario.node.frontends()
        assert fe.get((gone, 80)) == [f"{WEB_IP}:8080"]
        assert fe.get((kept, 80)) == [f"{WEB_IP}:8080"]

    scenario.expect(both)
    return gone, kept


def _changes_while_cut_off(ds: Any, prefix: str) -> None:
    """A delete, an update and a create, made while the agent cannot see them."""
    ds.delete("EndpointSlice", f"{prefix}-gone-abcde", "default")
    ds.delete("Service", f"{prefix}-gone", "default")
    ds.apply([slice_(f"{prefix}-kept", [WEB_IP, CLIENT_IP])])
    ds.apply([service(f"{prefix}-new", 80), slice_(f"{prefix}-new", [CLIENT_IP])])


def _changes_while_cut_off_api(api: FakeApiServer, prefix: str) -> None:
    """_changes_while_cut_off through the fake server's own store (the caller holds its lock,
    so no client request is served meanwhile)."""
    api.delete_object("EndpointSlice", f"{prefix}-gone-abcde", "default")
    api.delete_object("Service", f"{prefix}-gone", "default")
    api.put_object(slice_(f"{prefix}-kept", [WEB_IP, CLIENT_IP]))
    api.put_object(service(f"{prefix}-new", 80))
    api.put_object(slice_(f"{prefix}-new", [CLIENT_IP]))


def _changes_programmed(scenario: Scenario, prefix: str, gone: str, kept: str) -> None:
    new = VIPS[f"{prefix}-new"]

    def check() -> None:
        fe = scenario.node.frontends()
        assert not [key for key in fe if key[0] == gone], "a delete made while cut off was lost"
        assert sorted(fe[(kept, 80)]) == sorted([f"{WEB_IP}:8080", f"{CLIENT_IP}:8080"])
        assert fe[(new, 80)] == [f"{CLIENT_IP}:8080"]

    scenario.expect(check)


def test_datastore_restart_with_changes_made_meanwhile(scenario: Scenario) -> None:
    store, n = scenario.store, scenario.node
    gone, kept = _services_before_outage(scenario, "rs")
    if store.etcd is not None:
        store.etcd.stop()  # by its PID
        n.wait_problem()  # not ready: the agent saw etcd go
        n.pause()  # and stays cut off while etcd is back and the changes are made
        store.etcd.start()
        store.reopen()
        _changes_while_cut_off(store.ds, "rs")
        n.resume()
    elif store.api is not None:
        api = store.api
        with api.cv:  # every watch cut, and the changes in before any can come back
            api.drop_watches()
            _changes_while_cut_off_api(api, "rs")
    else:
        n.stop()  # the embedded store has no process: its restart is the agent's
        _changes_while_cut_off(store.ds, "rs")
        n.start()
    _changes_programmed(scenario, "rs", gone, kept)


def test_compaction_keeps_a_delete(scenario: Scenario) -> None:
    """The watch resumes below the history's horizon: the agent relists and diffs, and the
    delete made across the compaction is not lost."""
    store, n = scenario.store, scenario.node
    gone, kept = _services_before_outage(scenario, "cp")
    relists_before = n.log().count(RELIST_LOG)
    if store.etcd is not None:
        n.pause()
        store.etcd.stop()  # the agent's watch must reconnect, from below the horizon
        store.etcd.start()
        store.reopen()
        _changes_while_cut_off(store.ds, "cp")
        store.ds.compact(store.ds.revision())
        n.resume()
    elif store.api is not None:
        api = store.api
        gone_before = api.gone_sent
        with api.cv:
            api.drop_watches()
            _changes_while_cut_off_api(api, "cp")
            api.compact()
        _changes_programmed(scenario, "cp", gone, kept)
        assert api.gone_sent > gone_before, "no 410 Gone was answered"
        return
    else:
        n.pause()
        _changes_while_cut_off(store.ds, "cp")
        trimmer = EmbeddedDatastore(Path(store.url.removeprefix("sqlite:///")), keep_events=1)
        trimmer.apply([obj("v1", "Namespace", "trim")])
        trimmer.close()
        n.resume()
    _changes_programmed(scenario, "cp", gone, kept)
    assert n.log().count(RELIST_LOG) > relists_before, "the agent did not relist"

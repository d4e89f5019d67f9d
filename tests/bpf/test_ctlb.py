"""Connect-time load balancing with real sockets (root).

A client process runs inside a cgroup of our own (``<cgroup2>/tabby/ctlbt-<id>``) and a client
network namespace joined by a veth to a backend namespace with two backend addresses. The client
namespace has no route to the service VIP: an untranslated connect() fails at once with
ENETUNREACH, so "not translated" is unambiguous. Servers are threads of this process serving
sockets opened in the backend namespace; they answer with the address they were reached on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tabby.bpf import libbpf
from tabby.bpf.maps.counters import Reason
from tabby.bpf.maps.ctlb import CTLB_SOCKETS_SPEC
from tabby.bpf.maps.nat import (
    AFFINITY_SPEC,
    BACKENDS_SPEC,
    FRONTENDS_SPEC,
    AffinityKey,
    BackendKey,
    BackendValue,
    FrontendKey,
    FrontendValue,
    NatFlags,
)
from tabby.bpf.objects import DatapathConfig, DatapathObjects
from tabby.dataplane.ctlb import CtlbManager, reap
from tabby.lab.sockclient import SocketClient
from tabby.lab.traffic import in_netns
from tabby.netlink.links import netns_cookie
from tabby.preflight import cgroup2_mount

pytestmark = pytest.mark.root

VIP = "10.96.0.10"
CLIENT_IP = "198.18.0.1"
BACKEND_A, BACKEND_B = "198.18.0.2", "198.18.0.3"
TCP_PORT, UDP_PORT = 8080, 5353


@dataclass
class Env:
    cgroup: str
    client_ns: str
    backend_ns: str
    dp: DatapathObjects
    ctlb: CtlbManager

    def frontend(
        self, port: int, proto: str, backends: list[tuple[str, int]], set_id: int, flags: int = 0
    ) -> None:
        """Write a backend set, then its frontend (the order dataplane/nat.py keeps)."""
        be_map = self.dp.map(BACKENDS_SPEC)
        for ordinal, (addr, be_port) in enumerate(backends):
            be_map.update(BackendKey(set_id, ordinal), BackendValue.make(addr, be_port))
        value = FrontendValue(id=set_id, count=len(backends), flags=flags, affinity_s=600)
        self.dp.map(FRONTENDS_SPEC).update(FrontendKey.make(VIP, port, proto), value)

    def count(self, reason: Reason) -> int:
        return self.dp.counters().get(reason)


def client(env: Env, in_cgroup: bool = True) -> SocketClient:
    """A client process in the client netns and (unless told otherwise) the test cgroup."""
    return SocketClient(env.client_ns, env.cgroup if in_cgroup else None)


class Servers:
    """TCP and UDP servers on both backend addresses, answering with the address reached."""

    def __init__(self, netns: str) -> None:
        self.stop = threading.Event()
        self.socks: list[socket.socket] = []
        for addr in (BACKEND_A, BACKEND_B):
            tcp = in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((addr, TCP_PORT))
            tcp.listen(16)
            udp = in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            udp.bind((addr, UDP_PORT))
            self.socks += [tcp, udp]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            ready, _, _ = select.select(self.socks, [], [], 0.1)
            for s in ready:
                local = s.getsockname()[0].encode()
                if s.type == socket.SOCK_STREAM:
                    conn, _ = s.accept()
                    with conn:
                        conn.sendall(local)
                else:
                    _, peer = s.recvfrom(64)
                    s.sendto(local, peer)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for s in self.socks:
            s.close()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def netns_pair() -> Iterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:6]
    client_ns, backend_ns = f"tby-ctlb-c{tag}", f"tby-ctlb-b{tag}"
    made = []
    try:
        for ns in (client_ns, backend_ns):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        # created inside the namespaces: nothing ever appears in the root namespace
        _ip("-n", client_ns, "link", "add", "vc", "type", "veth", "peer", "vb", "netns", backend_ns)
        _ip("-n", client_ns, "addr", "add", f"{CLIENT_IP}/24", "dev", "vc")
        _ip("-n", backend_ns, "addr", "add", f"{BACKEND_A}/24", "dev", "vb")
        _ip("-n", backend_ns, "addr", "add", f"{BACKEND_B}/24", "dev", "vb")
        _ip("-n", client_ns, "link", "set", "vc", "up")
        _ip("-n", backend_ns, "link", "set", "vb", "up")
        yield client_ns, backend_ns
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture
def test_cgroup() -> Iterator[str]:
    base = cgroup2_mount()
    assert base is not None, "no cgroup v2 hierarchy"
    parent = os.path.join(base, "tabby")
    made_parent = not os.path.isdir(parent)
    path = os.path.join(parent, f"ctlbt-{uuid.uuid4().hex[:8]}")
    os.makedirs(path)
    try:
        yield path
    finally:
        with open(os.path.join(path, "cgroup.procs")) as f:
            leftovers = f.read().split()
        assert not leftovers, f"processes left in {path}: {leftovers}"  # ours are killed by pid
        os.rmdir(path)
        if made_parent:
            with contextlib.suppress(OSError):
                os.rmdir(parent)


def _make_env(
    bpf_dir: Path,
    pin_root: str,
    cgroup: str,
    netns: tuple[str, str],
    mode: str,
    host_netns: int = 0,
) -> Iterator[Env]:
    config = DatapathConfig.build(ctlb_udp=mode == "Enabled", host_netns=host_netns)
    with DatapathObjects(pin_root, config, bpf_dir) as dp:
        servers = Servers(netns[1])
        ctlb = CtlbManager(pin_root)
        try:
            assert ctlb.apply(cgroup, mode, dp.prog_fds()) == []
            yield Env(cgroup, netns[0], netns[1], dp, ctlb)
        finally:
            assert ctlb.apply(cgroup, "Disabled", dp.prog_fds()) == []
            servers.close()


@pytest.fixture
def enabled(
    bpf_dir: Path, pin_root: str, test_cgroup: str, netns_pair: tuple[str, str]
) -> Iterator[Env]:
    yield from _make_env(bpf_dir, pin_root, test_cgroup, netns_pair, "Enabled")


@pytest.fixture
def tcp_mode(
    bpf_dir: Path, pin_root: str, test_cgroup: str, netns_pair: tuple[str, str]
) -> Iterator[Env]:
    yield from _make_env(bpf_dir, pin_root, test_cgroup, netns_pair, "TCP")


@pytest.fixture
def tcp_mode_client_is_host(
    bpf_dir: Path, pin_root: str, test_cgroup: str, netns_pair: tuple[str, str]
) -> Iterator[Env]:
    """TCP mode, with the client's netns playing the node's own (hostNetwork) namespace."""
    cookie = in_netns(netns_pair[0], netns_cookie)
    yield from _make_env(bpf_dir, pin_root, test_cgroup, netns_pair, "TCP", host_netns=cookie)


# ---------------------------------------------------------------------------- TCP


def test_tcp_connect_reaches_backend_and_getpeername_shows_vip(enabled: Env) -> None:
    enabled.frontend(80, "TCP", [(BACKEND_A, TCP_PORT)], set_id=1)
    before = enabled.count(Reason.CTLB_CONNECT)
    with client(enabled) as c:
        got = c("tcp", ip=VIP, port=80)
    assert got == {"peer": [VIP, 80], "reply": BACKEND_A}
    assert enabled.count(Reason.CTLB_CONNECT) - before == 1
    # the translation lives in the socket's own storage: no LRU entry to outlive it (when
    # every connection left one, the full LRU's evictions slowed each connect() down)
    assert list(enabled.dp.map(CTLB_SOCKETS_SPEC).items()) == []


def test_process_outside_the_cgroup_is_not_translated(enabled: Env) -> None:
    enabled.frontend(80, "TCP", [(BACKEND_A, TCP_PORT)], set_id=1)
    before = enabled.count(Reason.CTLB_CONNECT)
    with client(enabled, in_cgroup=False) as c:
        assert c("tcp", ip=VIP, port=80)["errno"] == errno.ENETUNREACH
    assert enabled.count(Reason.CTLB_CONNECT) == before


def test_frontend_without_backends_is_left_to_the_packet_path(enabled: Env) -> None:
    enabled.frontend(80, "TCP", [], set_id=1)
    with client(enabled) as c:
        assert c("tcp", ip=VIP, port=80)["errno"] == errno.ENETUNREACH


def test_affinity_needs_a_known_source_then_sticks(enabled: Env) -> None:
    backends = [(BACKEND_A, TCP_PORT), (BACKEND_B, TCP_PORT)]
    enabled.frontend(80, "TCP", backends, set_id=3, flags=NatFlags.AFFINITY)
    with client(enabled) as c:
        # unbound socket: the client IP is unknown at connect, the tc path keys affinity
        assert c("tcp", ip=VIP, port=80)["errno"] == errno.ENETUNREACH
        replies = {c("tcp", ip=VIP, port=80, bind=CLIENT_IP)["reply"] for _ in range(8)}
    assert len(replies) == 1
    aff = enabled.dp.map(AFFINITY_SPEC).lookup(
        AffinityKey(3, int.from_bytes(socket.inet_aton(CLIENT_IP), "big"))
    )
    assert aff is not None and socket.inet_ntoa(aff.addr.to_bytes(4, "big")) in replies


# ---------------------------------------------------------------------------- UDP


def test_udp_sendto_vip_answers_from_vip(enabled: Env) -> None:
    enabled.frontend(53, "UDP", [(BACKEND_A, UDP_PORT)], set_id=2)
    sent, received = enabled.count(Reason.CTLB_SENDMSG), enabled.count(Reason.CTLB_RECVMSG)
    with client(enabled) as c:
        got = c("sendto", ip=VIP, port=53)
    assert got == {"reply": BACKEND_A, "src": [VIP, 53]}
    assert enabled.count(Reason.CTLB_SENDMSG) - sent == 1
    assert enabled.count(Reason.CTLB_RECVMSG) - received == 1


def test_tcp_mode_leaves_udp_alone(tcp_mode: Env) -> None:
    tcp_mode.frontend(80, "TCP", [(BACKEND_A, TCP_PORT)], set_id=1)
    tcp_mode.frontend(53, "UDP", [(BACKEND_A, UDP_PORT)], set_id=2)
    with client(tcp_mode) as c:
        assert c("tcp", ip=VIP, port=80)["reply"] == BACKEND_A
        assert c("udp_connect", ip=VIP, port=53)["errno"] == errno.ENETUNREACH
        assert c("sendto", ip=VIP, port=53)["errno"] == errno.ENETUNREACH
    assert sorted(os.listdir(f"{tcp_mode.ctlb.pin_dir}")) == [
        "connect4",
        "connect6",  # IPv6 ClusterIPs: at the socket in every mode
        "getpeername4",
        "getpeername6",
        "recvmsg4",
        "recvmsg6",
        "sendmsg4",
        "sendmsg6",
    ]


def test_tcp_mode_translates_udp_of_the_nodes_own_sockets(tcp_mode_client_is_host: Env) -> None:
    env = tcp_mode_client_is_host
    env.frontend(53, "UDP", [(BACKEND_A, UDP_PORT)], set_id=2)
    sent = env.count(Reason.CTLB_SENDMSG)
    with client(env) as c:
        assert c("sendto", ip=VIP, port=53) == {"reply": BACKEND_A, "src": [VIP, 53]}
        assert c("udp_connect", ip=VIP, port=53) == {"peer": [VIP, 53]}
        assert c("udp_send") == {"reply": BACKEND_A, "src": [VIP, 53]}
    assert env.count(Reason.CTLB_SENDMSG) - sent == 1


def test_a_udp_socket_connected_again_to_the_backend_itself_shows_the_backend(
    enabled: Env,
) -> None:
    enabled.frontend(53, "UDP", [(BACKEND_A, UDP_PORT)], set_id=2)
    with client(enabled) as c:
        assert c("udp_connect", ip=VIP, port=53) == {"peer": [VIP, 53]}
        assert c("udp_send") == {"reply": BACKEND_A, "src": [VIP, 53]}
        direct = c("udp_connect", ip=BACKEND_A, port=UDP_PORT, again=True)
        assert direct == {"peer": [BACKEND_A, UDP_PORT]}
        assert c("udp_send") == {"reply": BACKEND_A, "src": [BACKEND_A, UDP_PORT]}


def test_stale_connected_udp_socket_is_destroyed_and_reconnects(enabled: Env) -> None:
    enabled.frontend(53, "UDP", [(BACKEND_A, UDP_PORT)], set_id=2)
    be_map = enabled.dp.map(BACKENDS_SPEC)
    reaper = enabled.dp.prog_fd("tby_ctlb_reap")
    with client(enabled) as c:
        assert c("udp_connect", ip=VIP, port=53) == {"peer": [VIP, 53]}
        assert c("udp_send") == {"reply": BACKEND_A, "src": [VIP, 53]}
        # first round after start: the reaper runs, finds the socket's backend alive
        assert enabled.ctlb.reap_stale_udp(enabled.cgroup, reaper, needed=False) == []
        assert c("udp_send")["reply"] == BACKEND_A
        assert reap(enabled.cgroup, reaper) == []
        # backend A leaves, B takes its ordinal: the connected socket must not stay on A
        be_map.update(BackendKey(2, 0), BackendValue.make(BACKEND_B, UDP_PORT))
        # a round without removals does not run it...
        assert enabled.ctlb.reap_stale_udp(enabled.cgroup, reaper, needed=False) == []
        assert c("udp_send")["reply"] == BACKEND_A
        # ...the NAT apply that removed A does
        assert enabled.ctlb.reap_stale_udp(enabled.cgroup, reaper, needed=True) == []
        assert c("udp_recv")["errno"] == errno.ECONNABORTED  # the application learns
        assert c("udp_connect", ip=VIP, port=53) == {"peer": [VIP, 53]}
        assert c("udp_send") == {"reply": BACKEND_B, "src": [VIP, 53]}
        # nothing lost since: no new run, and a run would find nothing
        assert reap(enabled.cgroup, reaper) == []


def test_reaper_destroys_only_our_stale_sockets(enabled: Env) -> None:
    enabled.frontend(53, "UDP", [(BACKEND_A, UDP_PORT)], set_id=2)
    reaper = enabled.dp.prog_fd("tby_ctlb_reap")
    with client(enabled) as ours, client(enabled, in_cgroup=False) as direct:
        assert ours("udp_connect", ip=VIP, port=53) == {"peer": [VIP, 53]}
        assert direct("udp_connect", ip=BACKEND_A, port=UDP_PORT)["peer"] == [BACKEND_A, UDP_PORT]
        enabled.dp.map(FRONTENDS_SPEC).delete(FrontendKey.make(VIP, 53, "UDP"))  # service gone
        reaped = reap(enabled.cgroup, reaper)
        assert [k.describe().split(" -> ")[1] for k in reaped] == [f"{BACKEND_A}:{UDP_PORT}"]
        assert direct("udp_send")["reply"] == BACKEND_A  # a socket we never translated stays


# ---------------------------------------------------------------------------- attachment


def test_links_are_adopted_and_refuse_the_root_group(enabled: Env) -> None:
    fds = enabled.dp.prog_fds()
    restarted = CtlbManager(enabled.dp.pin_root)  # a new agent: same pins, nothing in memory
    assert restarted.apply(enabled.cgroup, "Enabled", fds) == []
    assert sorted(os.listdir(restarted.pin_dir)) == [
        "connect4",
        "connect6",  # IPv6 ClusterIPs: at the socket in every mode
        "getpeername4",
        "getpeername6",
        "recvmsg4",
        "recvmsg6",
        "sendmsg4",
        "sendmsg6",
    ]
    for hook in os.listdir(restarted.pin_dir):
        fd = libbpf.obj_get(os.path.join(restarted.pin_dir, hook))
        try:
            prog_id, group, _ = libbpf.cgroup_link_info(fd)
        finally:
            os.close(fd)
        assert group == libbpf.cgroup_id(enabled.cgroup)
        assert restarted.programmed[hook] == (prog_id, group)
    root = cgroup2_mount()
    assert root is not None
    errors = CtlbManager(os.path.join(enabled.dp.pin_root, "other")).apply(root, "TCP", fds)
    assert errors and all("refusing" in e for e in errors)
    with pytest.raises(ValueError, match="refusing"):
        libbpf.cgroup_attach(root, fds["tby_ctlb_conn4"], libbpf.BPF_CGROUP_INET4_CONNECT)

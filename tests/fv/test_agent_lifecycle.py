"""The agent's life: kill -9 and restart under flowing traffic; bpfEnabled off and on, live."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from tabby.bpf import libbpf
from tabby.bpf.maps.routes import ROUTES_SPEC, RoutesMap
from tabby.calc import names
from tabby.lab import processes, traffic
from tabby.lab.cluster import Lab, pin_root

pytestmark = [pytest.mark.root, pytest.mark.lab]


@pytest.fixture(scope="module")
def pods(lab: Lab) -> dict[str, dict]:
    lab.add_pod("x", "node1", wait=False)
    lab.add_pod("y", "node2", wait=False)
    lab.wait_ready()
    return {n: lab.pod(n) for n in ("x", "y")}


def _stream(netns: str, ip: str, stop: threading.Event, result: dict) -> None:
    """HTTP/1.1 keep-alive requests on ONE TCP connection until ``stop``; counts answers."""

    def go() -> None:
        with socket.create_connection((ip, 8080), timeout=3) as s:
            f = s.makefile("rb")
            n = 0
            while not stop.is_set() and n < 5000:
                s.sendall(f"GET /echo?msg=m{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                length = 0
                while (line := f.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if f.read(length) != f"m{n}".encode():
                    raise OSError(f"request {n}: wrong answer")
                n += 1
                time.sleep(0.01)
            result["answered"] = n

    try:
        traffic.in_netns(netns, go)
    except OSError as e:
        result["error"] = str(e)


def test_sigkill_and_restart_of_an_agent_keeps_established_flows(lab, pods):
    stop, result = threading.Event(), {}
    t = threading.Thread(target=_stream, args=(pods["x"]["netns"], pods["y"]["ip"], stop, result))
    t.start()
    time.sleep(0.5)
    old = lab.agent_proc("node1")
    os.kill(old["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while processes.alive(old) and time.monotonic() < deadline:
        try:
            os.waitpid(old["pid"], os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.02)
    time.sleep(0.5)  # traffic keeps flowing with no agent at all
    lab.start_agent(lab.plan.node("node1"))
    lab.wait_ready()
    time.sleep(0.5)
    stop.set()
    t.join(10)
    assert "error" not in result, result
    assert result["answered"] > 20
    assert lab.agent_proc("node1")["pid"] != old["pid"]
    # the new agent adopted the pinned links instead of recreating them
    links_dir = os.path.join(pin_root(lab.name, "node1"), "links")
    assert len(os.listdir(links_dir)) >= 4


def test_bpf_enabled_false_detaches_and_true_reattaches_live(lab, pods):
    ds = lab.datastore()
    links_dir = os.path.join(pin_root(lab.name, "node2"), "links")
    assert os.listdir(links_dir)
    ds.patch("FelixConfiguration", "default", None, {"spec": {"bpfEnabled": False}})
    lab.wait_ready()
    assert os.listdir(links_dir) == []
    # without tby_tun_egress nothing sets the tunnel key: the collect-metadata device drops
    ok, _ = traffic.reachable(
        lambda: traffic.http_get(
            pods["x"]["netns"], pods["y"]["ip"], 8080, "/hostname", timeout_s=1
        )
    )
    assert not ok
    ds.patch("FelixConfiguration", "default", None, {"spec": {"bpfEnabled": True}})
    lab.wait_ready()
    assert sorted(os.listdir(links_dir))
    assert traffic.http_get(pods["x"]["netns"], pods["y"]["ip"], 8080, "/hostname") == "y"


def _tc_filters(netns: str, ifname: str, direction: str) -> str:
    out = subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns}", "tc", "filter", "show", "dev", ifname, direction],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout


def test_bpf_attach_type_tc_uses_clsact_and_switches_back_live(lab, pods):
    ds = lab.datastore()
    node2 = lab.plan.node("node2")
    root = pin_root(lab.name, "node2")
    veth = names.host_ifname("default", "y")
    assert "tby_from_wl" not in _tc_filters(node2.netns, veth, "ingress")
    ds.patch("FelixConfiguration", "default", None, {"spec": {"bpfAttachType": "TC"}})
    lab.wait_ready()
    assert os.listdir(os.path.join(root, "links")) == []
    assert "tby_from_wl" in _tc_filters(node2.netns, veth, "ingress")
    assert "tby_to_wl" in _tc_filters(node2.netns, veth, "egress")
    assert "tby_tun_egress" in _tc_filters(node2.netns, "tby.vxlan", "egress")
    assert traffic.http_get(pods["x"]["netns"], pods["y"]["ip"], 8080, "/hostname") == "y"
    ds.patch("FelixConfiguration", "default", None, {"spec": {"bpfAttachType": "TCX"}})
    lab.wait_ready()
    assert "tby_from_wl" not in _tc_filters(node2.netns, veth, "ingress")
    assert os.listdir(os.path.join(root, "tc")) == []
    # y's veth and the tunnel device (in + eg each), and the data interface (in + eg)
    assert len(os.listdir(os.path.join(root, "links"))) == 6
    assert traffic.http_get(pods["x"]["netns"], pods["y"]["ip"], 8080, "/hostname") == "y"


def test_the_running_agent_carries_no_cli_modules(lab, pods):
    """`tabby agent` parses its options, then execs tabby.agent_process (same PID): the
    long-running process does not map pydantic's core (typer's option parsing)."""
    rec = lab.agent_proc("node1")
    pid = int(rec["pid"])
    assert processes.alive(rec), "the recorded PID is the agent itself: exec kept it"
    cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    assert b"tabby.agent_process" in cmdline
    maps = open(f"/proc/{pid}/maps").read()
    assert "pydantic_core" not in maps
    assert lab.readyz(lab.plan.node("node1"))["ready"]


def _max_entries(pins: str, name: str) -> int:
    fd = libbpf.obj_get(f"{pins}/{name}")
    try:
        return libbpf.MapDef.of_fd(fd).max_entries
    finally:
        os.close(fd)


def _routes(pins: str) -> dict[str, object]:
    m = RoutesMap(ROUTES_SPEC.open_pinned(pins))
    try:
        return dict(m.dump())
    finally:
        m.map.close()


def test_bpf_map_sizes_resize_the_pinned_maps_live_and_refuse_to_drop_entries(lab, pods):
    """bpfMapSizeRoute changed: every agent reloads, node2's tby_routes is recreated at the new
    size with its routes, and the agent writes the new map (a pod added after it is routed);
    too small for the routes held: refused in /readyz naming the field, nothing dropped."""
    ds = lab.datastore()
    pins = pin_root(lab.name, "node2")
    before = _routes(pins)
    assert _max_entries(pins, "tby_routes") == 65536
    ds.patch("FelixConfiguration", "default", None, {"spec": {"bpfMapSizeRoute": 2048}})
    lab.wait_ready()
    assert _max_entries(pins, "tby_routes") == 2048
    assert _routes(pins) == before
    assert traffic.http_get(pods["x"]["netns"], pods["y"]["ip"], 8080, "/hostname") == "y"
    z = lab.add_pod("z", "node2")  # its route goes into the new map
    try:
        assert f"{z}/32" in _routes(pins)
        assert traffic.http_get(pods["x"]["netns"], z, 8080, "/hostname") == "z"
        ds.patch("FelixConfiguration", "default", None, {"spec": {"bpfMapSizeRoute": 2}})
        node2 = lab.plan.node("node2")
        deadline = time.monotonic() + 30
        while "bpfMapSizeRoute" not in " ".join(lab.readyz(node2).get("errors", [])):
            assert time.monotonic() < deadline, lab.readyz(node2)
            time.sleep(0.1)
        assert not lab.readyz(node2)["ready"]
        assert _max_entries(pins, "tby_routes") == 2048  # kept: nothing dropped
        assert f"{z}/32" in _routes(pins)
        assert traffic.http_get(pods["x"]["netns"], z, 8080, "/hostname") == "z"
    finally:
        lab.del_pod("z", wait=False)
        ds.patch("FelixConfiguration", "default", None, {"spec": {"bpfMapSizeRoute": None}})
    lab.wait_ready()
    assert _max_entries(pins, "tby_routes") == 65536

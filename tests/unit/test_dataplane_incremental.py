"""NodeDataplane.apply skips the managers whose inputs did not change.

The managers are recording stand-ins (their own behaviour is tested on real maps, links and
hooks elsewhere: tests/bpf, tests/fv); what is checked here is which of them apply() calls: a
service-only change reaches NAT alone, a new endpoint reaches the hooks, a manager that left
errors runs again, and a full re-check runs them all. The route map is a real manager over a
dict standing in for the pinned map.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from tabby.calc.nodestate import Endpoint, KernelRoute, NodeState, Route
from tabby.calc.services import Frontend, ServiceNAT
from tabby.dataplane import node as node_mod
from tabby.dataplane.nat import NatApplyResult
from tabby.dataplane.node import NodeDataplane, _LoadKey
from tabby.dataplane.policy import PolicyApplyResult
from tabby.dataplane.routes import RouteMapManager


class _Calls:
    def __init__(self) -> None:
        self.count: Counter[str] = Counter()
        self.fail: set[str] = set()
        self.hints: list[Any] = []

    def manager(self, name: str) -> Any:
        calls = self

        class Fake:
            programmed: dict[str, Any] = {}  # noqa: RUF012 - a stand-in
            services: dict[str, Any] = {}  # noqa: RUF012 - (NAT: what it programmed)
            needs_rescan = False

            def apply(self, *args: Any, **_kw: Any) -> Any:
                calls.count[name] += 1
                errors = [f"{name} failed"] if name in calls.fail else []
                if name == "nat":
                    calls.hints.append(args[1])
                if name in ("nat", "nat6"):
                    return NatApplyResult(errors=errors)
                if name == "policy":
                    return PolicyApplyResult(errors=errors)
                return errors

            def reap_stale_udp(self, *_a: Any) -> list[str]:
                return []

        return Fake()


class _RouteMap:
    def __init__(self) -> None:
        self.entries: dict[str, Any] = {}

    def dump(self) -> dict[str, Any]:
        return dict(self.entries)

    def upsert(self, cidr: str, value: Any) -> None:
        self.entries[cidr] = value

    def delete(self, cidr: str) -> None:
        del self.entries[cidr]


class _Objects:
    def prog_fds(self) -> dict[str, int]:
        return {}

    def prog_fd(self, _name: str) -> int:
        return -1


def _dataplane(calls: _Calls, monkeypatch: Any) -> NodeDataplane:
    key = _LoadKey("172.20.32.11", 4096, "Off", False, "Tunnel", 2, 1500, 4789, 1009, True)
    monkeypatch.setattr(node_mod, "_load_key", lambda state, iface: key)
    monkeypatch.setattr(node_mod, "_ifindex", lambda name: 7)
    dp = NodeDataplane.__new__(NodeDataplane)
    dp.loaded_for, dp.objects, dp.data_iface = key, _Objects(), "eth0"  # type: ignore[assignment]
    managers = ("tunnel", "nat", "nat6", "workloads6", "policy", "attach", "kernel_routes")
    for name in (*managers, "ctlb", "health"):
        setattr(dp, name, calls.manager(name))
    dp.routes = RouteMapManager(_RouteMap())  # type: ignore[arg-type]
    dp.bird, dp.cgroup, dp.tcx_supported, dp.bpf_enabled = None, "/cg", True, None
    dp.kube_proxy_cleaned, dp.wireguard, dp.inputs = True, None, {}
    dp.ipv6_forwarding = False
    dp.learned, dp.desired_routes = {}, {}
    dp.last_nat, dp.last_policy = NatApplyResult(), PolicyApplyResult()
    return dp


def _state() -> NodeState:
    st = NodeState(node="node1", node_ip="172.20.32.11", needs_vxlan=True, tunnel_ip="100.96.0.64")
    st.routes = {"100.96.1.0/26": Route("100.96.1.0/26", 18, "172.20.64.12")}
    st.kernel_routes = {"100.96.1.0/26": KernelRoute("100.96.1.0/26", "vxlan", "172.20.64.12")}
    fe = Frontend("100.64.0.10", 80, "TCP", "default/web:http/TCP:cluster")
    st.services = {"default/web": ServiceNAT("default/web", (fe,), {fe.backend_set: ()})}
    return st


def _managers(calls: _Calls) -> set[str]:
    ran = {k for k, v in calls.count.items() if v}
    calls.count.clear()
    return ran


def test_a_service_change_runs_nat_alone(monkeypatch: Any) -> None:
    calls = _Calls()
    dp = _dataplane(calls, monkeypatch)
    first = _state()
    assert dp.apply(first).errors == []
    assert _managers(calls) == {
        "tunnel",
        "nat",
        "nat6",
        "workloads6",
        "policy",
        "attach",
        "kernel_routes",
        "ctlb",
        "health",
    }

    fe = Frontend("100.64.0.11", 80, "TCP", "default/api:http/TCP:cluster")
    api = ServiceNAT("default/api", (fe,), {fe.backend_set: (("100.96.1.5", 8080),)})
    second = dataclasses.replace(
        first,
        services={**first.services, "default/api": api},
        services_changed=frozenset({"default/api"}),
    )
    assert dp.apply(second).errors == []
    # health is always told (kube-proxy's healthz timestamp); NAT gets the changed names
    assert _managers(calls) == {"nat", "health"}
    assert calls.hints[-1] == {"default/api"}

    third = dataclasses.replace(second, services_changed=frozenset())
    third.endpoints = {
        "lo": Endpoint("default", "db", "100.96.0.70", "lo")
    }  # an ifname that exists
    third.routes = {**second.routes, "100.96.0.70/32": Route("100.96.0.70/32", 1, ifname="lo")}
    assert dp.apply(third).errors == []
    assert _managers(calls) == {
        "nat",
        "attach",
        "health",
    }  # the route map is written, not a manager
    assert "100.96.0.70/32" in dp.routes.programmed

    assert dp.apply(third, full=True).errors == []
    assert _managers(calls) == {
        "tunnel",
        "nat",
        "nat6",
        "workloads6",
        "policy",
        "attach",
        "kernel_routes",
        "ctlb",
        "health",
    }
    assert calls.hints[-1] is None  # a full re-check compares every service


def test_a_manager_that_failed_runs_again_until_it_succeeds(monkeypatch: Any) -> None:
    calls = _Calls()
    dp = _dataplane(calls, monkeypatch)
    state = _state()
    calls.fail = {"kernel_routes"}
    assert dp.apply(state).errors == ["kernel_routes failed"]
    _managers(calls)
    assert dp.apply(state).errors == ["kernel_routes failed"]
    assert _managers(calls) == {"nat", "nat6", "kernel_routes", "health"}  # no hint: NAT looks
    calls.fail = set()
    assert dp.apply(state).errors == []
    assert dp.apply(state).errors == []
    assert calls.count["kernel_routes"] == 1  # once more, then skipped


def test_a_recreated_tunnel_device_rewrites_the_kernel_routes(monkeypatch: Any) -> None:
    calls = _Calls()
    dp = _dataplane(calls, monkeypatch)
    state = _state()
    dp.apply(state)
    _managers(calls)
    state.vxlan_mtu = 1400  # the tunnel manager runs (and may recreate the device)
    dp.apply(state)
    assert _managers(calls) >= {"tunnel", "kernel_routes"}

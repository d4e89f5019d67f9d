"""The agent's incremental calc: a Service or EndpointSlice event reuses the rest of the state.

compute() (nodes, pods, pools, blocks, policies...) runs again only when one of its kinds
changed; a service change hands the dataplane the same route/endpoint/policy objects (so its
managers skip) and names the services that changed (so NAT looks at those only). Coalesced states
keep the union of their changed services.
"""

from __future__ import annotations

from typing import Any

from tabby import agent
from tabby.calc.intake import kept
from tabby.calc.nodestate import NodeState
from tabby.calc.services import ServiceIndex
from tabby.datastore.api import Event
from tabby.lab import apishapes

NODE = "node1"


def _obj(kind: str, name: str, namespace: str = "", **body: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"kind": kind, "metadata": meta, **body}


def _cluster() -> list[dict[str, Any]]:
    return [
        _obj(
            "Node", NODE, status={"addresses": [{"type": "InternalIP", "address": "172.20.32.2"}]}
        ),
        _obj(
            "Node",
            "node2",
            status={"addresses": [{"type": "InternalIP", "address": "172.20.64.2"}]},
        ),
        _obj("IPPool", "pool", spec={"cidr": "100.96.0.0/11", "vxlanMode": "Always"}),
        _obj(
            "IPAMBlock",
            "b2",
            spec={"cidr": "100.96.1.0/26", "affinity": "host:node2", "allocations": {}},
        ),
        _obj(
            "Pod",
            "web",
            "default",
            spec={"nodeName": NODE},
            status={"podIP": "100.96.0.5"},
            labels={"app": "web"},
        ),
    ]


def _service(i: int, addrs: list[str]) -> list[dict[str, Any]]:
    port = {"name": "http", "port": 80, "protocol": "TCP"}
    svc = _obj(
        "Service", f"s{i}", "default", spec={"clusterIP": f"100.64.0.{i + 10}", "ports": [port]}
    )
    sl = _obj("EndpointSlice", f"s{i}-1", "default", addressType="IPv4")
    sl["metadata"]["labels"] = {"kubernetes.io/service-name": f"s{i}"}
    sl["ports"] = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    sl["endpoints"] = [{"addresses": [a]} for a in addrs]
    return [svc, sl]


def _agent() -> tuple[agent.Agent, list[tuple[NodeState, int]]]:
    """An agent whose worker only records what it is handed (nothing is programmed here)."""
    a = agent.Agent(NODE, "sqlite:////nonexistent/store.db", None, "/nonexistent")
    submitted: list[tuple[NodeState, int]] = []
    a.worker.submit = lambda state, rev: submitted.append((state, rev))  # type: ignore[method-assign]
    return a, submitted


def _feed(a: agent.Agent, objs: list[dict[str, Any]], revision: int, kind: str = "ADDED") -> None:
    for obj in objs:
        a._on_event(Event(kind, obj["kind"], obj, revision))  # type: ignore[arg-type]
    a._publish(revision)


def test_a_service_change_reuses_everything_else() -> None:
    a, got = _agent()
    _feed(a, _cluster() + _service(1, ["100.96.1.2"]) + _service(2, ["100.96.1.3"]), 1)
    first, _ = got[-1]
    assert first.services_changed is None, "a new index: NAT compares every service"
    assert "100.96.1.0/26" in first.routes and set(first.services) == {"default/s1", "default/s2"}

    _feed(a, _service(1, ["100.96.1.9"])[1:], 2, "MODIFIED")  # one endpoint replaced
    second, rev = got[-1]
    assert rev == 2 and second.services_changed == {"default/s1"}
    for part in ("routes", "endpoints", "kernel_routes", "policies"):
        assert getattr(second, part) is getattr(first, part), part  # the managers skip
    assert second.services["default/s2"] is first.services["default/s2"]
    fe = second.services["default/s1"].backend_sets
    assert list(fe.values()) == [(("100.96.1.9", 8080),)]
    assert first.services["default/s1"] is not second.services["default/s1"]


def test_any_other_kind_computes_the_state_again() -> None:
    a, got = _agent()
    _feed(a, _cluster() + _service(1, ["100.96.1.2"]), 1)
    first, _ = got[-1]
    pod = _obj("Pod", "db", "default", spec={"nodeName": NODE}, status={"podIP": "100.96.0.6"})
    _feed(a, [pod], 2)
    second, _ = got[-1]
    assert second.routes is not first.routes and "100.96.0.6/32" in second.routes
    assert second.services_changed == frozenset()  # no service changed: NAT looks at none
    assert second.services["default/s1"] is first.services["default/s1"]


def test_coalesced_states_keep_every_changed_service() -> None:
    a, got = _agent()
    _feed(a, _cluster() + _service(1, ["100.96.1.2"]) + _service(2, ["100.96.1.3"]), 1)
    _feed(a, _service(1, ["100.96.1.4"])[1:], 2, "MODIFIED")
    _feed(a, _service(2, ["100.96.1.5"])[1:], 3, "MODIFIED")
    pending = agent._newer(None, got[1])
    pending = agent._newer(pending, got[2])
    assert pending[1] == 3 and pending[0].services_changed == {"default/s1", "default/s2"}
    unknown = (got[0][0], 1)
    unknown[0].services_changed = None  # "compare everything" wins over any list
    assert agent._newer(unknown, got[2])[0].services_changed is None


def test_the_first_state_loads_the_datapath_while_services_are_computed() -> None:
    """The worker is asked to load the datapath once, with the base state, before the first
    state with services is handed over: the load (the verifier) runs beside the calc."""
    a, _ = _agent()
    order: list[tuple[str, int]] = []
    a.worker.prepare = lambda base: order.append(("prepare", len(base.services)))  # type: ignore[method-assign]
    a.worker.submit = lambda state, rev: order.append(("submit", len(state.services)))  # type: ignore[method-assign]
    _feed(a, _cluster() + _service(1, ["100.96.1.2"]) + _service(2, ["100.96.1.3"]), 1)
    _feed(a, [_obj("Pod", "db", "default", spec={"nodeName": NODE})], 2)
    assert order == [("prepare", 0), ("submit", 2), ("submit", 2)]


def test_a_prepared_worker_does_nothing_else_before_its_first_apply(monkeypatch) -> None:
    a, got = _agent()
    _feed(a, _cluster(), 1)
    base, _ = got[-1]
    w = a.worker
    opened: list[NodeState] = []

    class Loaded:  # a datapath that no sweep or BGP sync may touch before the first apply
        bird = None

    def open_dataplane(state: NodeState) -> Any:
        opened.append(state)
        w.dataplane = Loaded()  # type: ignore[assignment]
        return w.dataplane

    monkeypatch.setattr(w, "_open_dataplane", open_dataplane)
    pending = (base, 7)
    assert w._take(pending, (base, agent.PREPARE)) is pending  # a pending state stays pending
    assert w._take(None, (base, agent.PREPARE)) is None
    assert opened == [base]  # loaded once
    assert w._until_sweep() is None  # no timed work before a state was applied
    w._sweep_conntrack()  # neither of them touches the loaded datapath yet
    w._sync_bgp()

    def broken(state: NodeState) -> Any:
        raise OSError("no BPF here")

    w.dataplane = None
    monkeypatch.setattr(w, "_open_dataplane", broken)
    assert w._take(None, (base, agent.PREPARE)) is None and w.dataplane is None  # apply retries


class _ListOnly:
    """A datastore that only lists (what Agent._relist reads), recording the order."""

    def __init__(self, objs: list[dict[str, Any]], log: list[str]) -> None:
        self.objs, self.log = objs, log

    def revision(self) -> int:
        return 7

    def list(self, kind: str) -> tuple[list[dict[str, Any]], int]:
        self.log.append(f"list {kind}")
        return [o for o in self.objs if o["kind"] == kind], 7


def test_a_relist_loads_the_datapath_then_computes_services_as_they_are_listed(
    monkeypatch,
) -> None:
    """The base state (and the datapath's load) before the services are listed; slices before
    Services, each Service computed as it is listed: the first state is the same as when every
    service is computed after the list."""
    objs = _cluster() + _service(1, ["100.96.1.2"]) + _service(2, ["100.96.1.3"])
    a, got = _agent()
    log: list[str] = []
    a.worker.prepare = lambda base: log.append("prepare")  # type: ignore[method-assign]
    listed = ServiceIndex.compute_listed

    def compute_listed(index: ServiceIndex, key: tuple[str, str], obj: dict[str, Any]) -> None:
        log.append(f"computed {key[1]} ({len(index._slices.get(key, {}))} slices in)")
        listed(index, key, obj)

    monkeypatch.setattr(ServiceIndex, "compute_listed", compute_listed)
    assert a._relist(_ListOnly(objs, log)) == 7  # type: ignore[arg-type]
    assert log.index("prepare") < log.index("list EndpointSlice") < log.index("list Service")
    assert log[-2:] == ["computed s1 (1 slices in)", "computed s2 (1 slices in)"]
    relisted, rev = got[-1]
    assert rev == 7 and relisted.services_changed is None

    b, fed = _agent()
    _feed(b, objs, 7)
    assert relisted.services == fed[-1][0].services
    assert relisted.routes == fed[-1][0].routes


def test_garbage_is_collected_when_enough_young_objects_were_made() -> None:
    """The agent runs without automatic collections; _collect_garbage frees cycles once the
    young count reaches its threshold, and leaves them (no walk) below it."""
    import gc
    import weakref

    class Node:
        other: Any = None

    was = gc.isenabled()
    gc.disable()
    try:
        gc.collect()
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle: reference counting alone never frees it
        alive = weakref.ref(a)
        del a, b
        agent._collect_garbage(young=10_000)
        assert alive() is not None, "below the threshold: no collection"
        keep = [[i] for i in range(10_000)]  # young tracked objects
        agent._collect_garbage(young=10_000)
        assert alive() is None and len(keep) == 10_000
    finally:
        if was:
            gc.enable()


def test_watched_pods_and_nodes_are_kept_as_calc_reads_them() -> None:
    """A pod as the API server serves it (~32 KB decoded) is held as calc/intake.py keeps it,
    and its endpoint is programmed the same."""
    a, got = _agent()
    _feed(a, _cluster(), 1)
    served = apishapes.pod("default", "api-0", NODE, "100.96.0.7", {"app": "api"})
    node = apishapes.node("node3", "172.20.32.3", {}, {})
    _feed(a, [served, node], 2)
    held = a.resources["Pod"][("default", "api-0")]
    assert held == kept("Pod", served) and "managedFields" not in held["metadata"]
    assert "images" not in a.resources["Node"][("", "node3")]["status"]
    state, _ = got[-1]
    assert "100.96.0.7/32" in state.routes and state.node_ip == "172.20.32.2"

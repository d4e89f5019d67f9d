"""The NetworkPolicy reachability-matrix harness (upstream e2e's model), reading cases as data.

Model: namespaces x, y, z (labels ``ns=<name>``, ``kubernetes.io/metadata.name=<name>``), pods
a, b, c in each (``pod=<name>``, image ``netpol``: TCP and UDP on 80 and 81, named container ports
``serve-80-tcp``...) spread over the lab's nodes, and a ClusterIP Service ``s-<ns>-<pod>`` per pod.
Cases follow ../shared/formats/netpol-cases.md (``tabby-accept-netpol/1``): per step, actions,
wait until every agent has programmed the change, then probe every ordered pair (not the
diagonal) through the target's Service and/or its pod IP. One prober thread per client pod
namespace opens all its sockets at once (non-blocking), so a step's probes run concurrently and
take about one timeout. Wrong cells are probed once more before they count.
"""

from __future__ import annotations

import ipaddress
import json
import re
import selectors
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from tabby.lab import traffic
from tabby.lab.cluster import Lab

FORMAT = "tabby-accept-netpol/1"
NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
PORTS = (80, 81)
PROTOCOLS = ("TCP", "UDP")
SUPPORTED = {"pod-ip-templates"}  # what `requires` may name for a case to run here (no SCTP)
PROBE_TIMEOUT_S = 1.0
Via = Literal["service", "pod", "both", "pod6"]  # pod6: the pods' IPv6 addresses (dual-stack lab)
Obj = dict[str, Any]
Progress = Callable[[str], None]


class CaseError(Exception):
    """A cases file or an action that cannot be run (the field is named)."""


def default_ns_labels(ns: str) -> dict[str, str]:
    return {"ns": ns, "kubernetes.io/metadata.name": ns}


def service_name(pod: str) -> str:
    ns, name = pod.split("/")
    return f"s-{ns}-{name}"


def load_cases(path: str) -> list[Obj]:
    with open(path) as f:
        doc = json.load(f)
    if doc.get("format") != FORMAT:
        raise CaseError(f"{path}: format: expected {FORMAT!r}, got {doc.get('format')!r}")
    cases = doc.get("cases")
    if not isinstance(cases, list):
        raise CaseError(f"{path}: cases: a list is required")
    for i, case in enumerate(cases):
        for key in ("id", "steps"):
            if key not in case:
                raise CaseError(f"{path}: cases[{i}].{key}: required")
    return cases


@dataclass
class ProbeOutcome:
    step: str
    port: int
    protocol: str
    via: str
    expected: dict[str, str]
    observed: dict[str, str]
    columns: list[str]

    @property
    def wrong(self) -> int:
        return sum(
            e != o
            for row, exp in self.expected.items()
            for e, o, col in zip(exp, self.observed.get(row, ""), self.columns, strict=False)
            if col != row
        )


@dataclass
class CaseResult:
    id: str
    status: Literal["passed", "failed", "not-run"]
    probes: list[ProbeOutcome] = field(default_factory=list)
    why: str = ""


def _probe_sockets(targets: list[tuple[Any, str, int, str]], timeout_s: float) -> dict[Any, bool]:
    """In the calling thread's netns: every target at once; True = connected / answered."""
    sel = selectors.DefaultSelector()
    results: dict[Any, bool] = {}
    open_socks: list[socket.socket] = []
    try:
        for key, ip, port, proto in targets:
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            if proto == "TCP":
                s = socket.socket(family, socket.SOCK_STREAM)
                s.setblocking(False)
                open_socks.append(s)
                s.connect_ex((ip, port))
                sel.register(s, selectors.EVENT_WRITE, (key, proto))
            else:
                s = socket.socket(family, socket.SOCK_DGRAM)
                s.setblocking(False)
                open_socks.append(s)
                try:
                    s.connect((ip, port))
                    s.send(b"hostname")
                except OSError:
                    results[key] = False
                    continue
                sel.register(s, selectors.EVENT_READ, (key, proto))
        deadline = time.monotonic() + timeout_s
        while len(results) < len(targets):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for k, _ in sel.select(left):
                key, proto = k.data
                s = k.fileobj  # type: ignore[assignment]
                sel.unregister(s)
                if proto == "TCP":
                    results[key] = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                else:
                    try:
                        results[key] = bool(s.recv(65535))
                    except OSError:  # ICMP port unreachable: refused
                        results[key] = False
    finally:
        sel.close()
        for s in open_socks:
            s.close()
    for key, *_ in targets:
        results.setdefault(key, False)
    return results


class Harness:
    """Runs cases on a lab that is up; builds the model on first use."""

    def __init__(self, lab: Lab, via: Via = "both", progress: Progress = print) -> None:
        self.lab = lab
        self.via = via
        self.progress = progress
        self.ds = lab.datastore()
        self.pods: dict[str, dict[str, str]] = {}  # "ns/name" -> {ip, netns, cluster_ip}
        self.nodes = [n.name for n in lab.plan.nodes]
        self.extra_ns: set[str] = set()  # created by a case: removed before the next

    # ---------------------------------------------------------------- model
    def setup(self) -> None:
        self.progress("netpol model: namespaces x, y, z; pods a, b, c; one service per pod")
        self.ds.apply([self._namespace(ns, default_ns_labels(ns)) for ns in NAMESPACES])
        i = 0
        for ns in NAMESPACES:
            for pod in PODS:
                self._add_pod(f"{ns}/{pod}", {"pod": pod}, self.nodes[i % len(self.nodes)])
                i += 1
        self._wait_services()

    def teardown(self) -> None:
        self._delete_all_policies()
        for key in list(self.pods):
            self._delete_pod(key)
        for ns in [*NAMESPACES, *sorted(self.extra_ns)]:
            if self.ds.get("Namespace", ns):
                self.ds.delete("Namespace", ns)
        self.lab.wait_ready()

    def _namespace(self, ns: str, labels: dict[str, str]) -> Obj:
        return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}

    def _add_pod(self, key: str, labels: dict[str, str], node: str | None = None) -> None:
        ns, name = key.split("/")
        node = node or self.nodes[len(self.pods) % len(self.nodes)]
        ip = self.lab.add_pod(name, node, ns, image="netpol", labels=labels, wait=False)
        ports = [
            {
                "name": f"service-port-{proto.lower()}-{port}",
                "port": port,
                "targetPort": port,
                "protocol": proto,
            }
            for port in PORTS
            for proto in PROTOCOLS
        ]
        svc = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": service_name(key), "namespace": ns},
            "spec": {"selector": {"pod": name}, "ports": ports},
        }
        self.ds.apply([svc])
        stored = self.ds.get("Service", service_name(key), ns) or {}
        rec = self.lab.pod(key)
        self.pods[key] = {
            "ip": ip,
            "ip6": str(rec.get("ip6") or ""),
            "netns": rec["netns"],
            "cluster_ip": str(stored.get("spec", {}).get("clusterIP", "")),
        }

    def _delete_pod(self, key: str) -> None:
        ns, name = key.split("/")
        self.lab.del_pod(name, ns, wait=False)
        if self.ds.get("Service", service_name(key), ns):
            self.ds.delete("Service", service_name(key), ns)
        self.pods.pop(key, None)

    def _wait_services(self, timeout_s: float = 30.0) -> None:
        """Until each model pod is its service's ready endpoint, and every agent has it all."""
        deadline = time.monotonic() + timeout_s
        while True:
            slices, _ = self.ds.list("EndpointSlice")
            have: dict[str, set[str]] = {}
            for s in slices:
                svc = (s["metadata"].get("labels") or {}).get("kubernetes.io/service-name", "")
                ns = s["metadata"].get("namespace", "")
                for e in s.get("endpoints") or []:
                    have.setdefault(f"{ns}/{svc}", set()).update(e.get("addresses") or [])
            missing = [
                k
                for k, p in self.pods.items()
                if p["ip"] not in have.get(f"{k.split('/')[0]}/{service_name(k)}", set())
                and self._selected_by_service(k)
            ]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise CaseError(f"services never got their endpoints: {missing}")
            time.sleep(0.05)
        self.lab.wait_ready()

    def _selected_by_service(self, key: str) -> bool:
        ns, name = key.split("/")
        pod = self.ds.get("Pod", name, ns) or {}
        return (pod.get("metadata", {}).get("labels") or {}).get("pod") == name

    # --------------------------------------------------------------- actions
    def _delete_all_policies(self) -> None:
        pols, _ = self.ds.list("NetworkPolicy")
        for p in pols:
            self.ds.delete("NetworkPolicy", p["metadata"]["name"], p["metadata"]["namespace"])

    def _substitute(self, policy: Obj) -> Obj:
        """Pod-address templates, in the probed family: via pod6, ``${ip:K}/32`` is the pod's
        IPv6 /128 and ``${net:K/n}`` the /n around its IPv6 address (the cases' n are broad)."""
        text = json.dumps(policy)
        family = "ip6" if self.via == "pod6" else "ip"

        def ip_of(m: re.Match[str]) -> str:
            key = m.group(1)
            if key not in self.pods or not self.pods[key][family]:
                raise CaseError(f"template ${{ip:{key}}}: no such pod")
            addr = self.pods[key][family]
            return f"{addr}/128" if m.group(2) and family == "ip6" else addr + m.group(2)

        def net_of(m: re.Match[str]) -> str:
            key, bits = m.group(1), int(m.group(2))
            if key not in self.pods or not self.pods[key][family]:
                raise CaseError(f"template ${{net:{key}/{bits}}}: no such pod")
            return str(ipaddress.ip_network(f"{self.pods[key][family]}/{bits}", strict=False))

        text = re.sub(r"\$\{ip:([a-z0-9-]+/[a-z0-9-]+)\}(/32)?", ip_of, text)
        text = re.sub(r"\$\{net:([a-z0-9-]+/[a-z0-9-]+)/(\d+)\}", net_of, text)
        return json.loads(text)  # type: ignore[no-any-return]

    def _set_pod_labels(self, key: str, labels: dict[str, str]) -> None:
        ns, name = key.split("/")
        pod = self.ds.get("Pod", name, ns)
        if pod is None:
            raise CaseError(f"set_pod_labels: pod {key} does not exist")
        old = pod["metadata"].get("labels") or {}
        patch = {k: None for k in old if k not in labels} | dict(labels)
        self.ds.patch("Pod", name, ns, {"metadata": {"labels": patch}})

    def act(self, action: Obj) -> None:
        op = action.get("op")
        if op in ("create_policy", "update_policy"):
            self.ds.apply([self._substitute(action["policy"])])
        elif op == "delete_policy":
            self.ds.delete("NetworkPolicy", action["name"], action["namespace"])
        elif op == "delete_all_policies":
            self._delete_all_policies()
        elif op == "set_namespace_labels":
            self.ds.apply([self._namespace(action["namespace"], dict(action["labels"]))])
        elif op == "set_pod_labels":
            self._set_pod_labels(action["pod"], dict(action["labels"]))
        elif op == "create_namespace":
            ns = action["namespace"]
            self.ds.apply([self._namespace(ns, dict(action.get("labels") or {}))])
            if ns not in NAMESPACES:
                self.extra_ns.add(ns)
        elif op == "delete_namespace":
            ns = action["namespace"]
            for key in [k for k in self.pods if k.split("/")[0] == ns]:
                self._delete_pod(key)
            pols, _ = self.ds.list("NetworkPolicy", ns)
            for p in pols:
                self.ds.delete("NetworkPolicy", p["metadata"]["name"], ns)
            if self.ds.get("Namespace", ns):
                self.ds.delete("Namespace", ns)
        elif op == "create_pod":
            key = action["pod"]
            labels = dict(action.get("labels") or {"pod": key.split("/")[1]})
            self._add_pod(key, labels)
        elif op == "delete_pod":
            self._delete_pod(action["pod"])
        else:
            raise CaseError(f"action op: unknown {op!r}")

    def reset(self, case: Obj) -> None:
        """The case's starting state: no policy, its labels, exactly the model's pods."""
        self._delete_all_policies()
        want_ns = case.get("namespace_labels") or {ns: default_ns_labels(ns) for ns in NAMESPACES}
        for ns, labels in want_ns.items():
            self.ds.apply([self._namespace(ns, dict(labels))])
        for key in [k for k in self.pods if k.split("/")[0] not in NAMESPACES]:
            self._delete_pod(key)
        for ns in sorted(self.extra_ns):
            if self.ds.get("Namespace", ns):
                self.ds.delete("Namespace", ns)
        self.extra_ns.clear()
        model = [f"{ns}/{p}" for ns in NAMESPACES for p in PODS]
        for key in [k for k in self.pods if k not in model]:
            self._delete_pod(key)
        want_pods = case.get("pod_labels") or {k: {"pod": k.split("/")[1]} for k in model}
        for key in model:
            labels = dict(want_pods.get(key) or {"pod": key.split("/")[1]})
            if key not in self.pods:
                self._add_pod(key, labels)
            else:
                self._set_pod_labels(key, labels)
        self._wait_services()

    # ---------------------------------------------------------------- probes
    def _targets(self, col: str, via: str, port: int) -> str | None:
        pod = self.pods.get(col)
        if pod is None:
            return None
        if via == "pod6":
            return pod.get("ip6") or None
        return pod["cluster_ip"] if via == "service" else pod["ip"]

    def probe(
        self, probes: list[Obj], vias: list[str], timeout_s: float = PROBE_TIMEOUT_S
    ) -> dict[tuple[int, str, str], Obj]:
        """Observed matrices per (port, protocol, via): {row: "..X."}. The vias are probed one
        after the other: a pod that reaches a Service and, at the same time, one of its backends
        directly may do so from one local port (Linux gives one port to connections with
        different destinations), a NAT port clash that is not a policy question (nat.h)."""
        shapes: dict[tuple[int, str, str], tuple[list[str], list[str]]] = {}
        results: dict[Any, bool] = {}
        for via in vias:
            jobs: dict[str, list[tuple[Any, str, int, str]]] = {}
            for p in probes:
                cols = list(p["expected"]["columns"])
                rows = list(p["expected"]["rows"])
                shapes[(p["port"], p["protocol"], via)] = (rows, cols)
                for row in rows:
                    for col in cols:
                        ip = self._targets(col, via, p["port"])
                        if row == col or ip is None or row not in self.pods:
                            continue
                        key = (p["port"], p["protocol"], via, row, col)
                        jobs.setdefault(row, []).append((key, ip, p["port"], p["protocol"]))
            results.update(self._run_probes(jobs, timeout_s))
        return {
            (port, proto, via): {
                row: "".join(
                    "." if row == col or results.get((port, proto, via, row, col)) else "X"
                    for col in cols
                )
                for row in rows
            }
            for (port, proto, via), (rows, cols) in shapes.items()
        }

    def _run_probes(
        self, jobs: dict[str, list[tuple[Any, str, int, str]]], timeout_s: float
    ) -> dict[Any, bool]:
        """Each row's probes at once, in the row's pod netns; True = connected / answered."""
        results: dict[Any, bool] = {}
        if not jobs:
            return results
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            futures = [
                pool.submit(
                    traffic.in_netns,
                    self.pods[row]["netns"],
                    lambda t=targets: _probe_sockets(t, timeout_s),
                )
                for row, targets in jobs.items()
            ]
            for f in futures:
                results.update(f.result())
        return results

    # ----------------------------------------------------------------- cases
    def run_case(self, case: Obj) -> CaseResult:
        missing = sorted(set(case.get("requires") or []) - SUPPORTED)
        if missing:
            return CaseResult(case["id"], "not-run", why=f"needs {', '.join(missing)}")
        vias: list[str] = ["service", "pod"] if self.via == "both" else [str(self.via)]
        self.reset(case)
        result = CaseResult(case["id"], "passed")
        for i, step in enumerate(case["steps"]):
            for action in step.get("actions") or []:
                self.act(action)
            self._wait_services()
            probes = [
                p
                for p in step.get("probes") or []
                if not set(p.get("requires") or []) - SUPPORTED
                and p.get("protocol", "TCP") in PROTOCOLS
            ]
            observed = self.probe(probes, vias)
            # wrong cells are probed once more before they count
            retry = [
                p
                for p in probes
                if any(_wrong(p, observed[(p["port"], p["protocol"], via)]) for via in vias)
            ]
            if retry:
                # a loaded machine can miss one second: the second look waits twice as long
                again = self.probe(retry, vias, 2 * PROBE_TIMEOUT_S)
                for k, matrix in again.items():
                    prev = observed[k]
                    observed[k] = {
                        row: "".join(
                            a if a == e else b
                            for a, b, e in zip(
                                prev[row], matrix[row], _expected_row(retry, k, row), strict=False
                            )
                        )
                        for row in matrix
                    }
            for p in probes:
                for via in vias:
                    outcome = ProbeOutcome(
                        step=step.get("description", f"step {i}"),
                        port=p["port"],
                        protocol=p["protocol"],
                        via=via,
                        expected=dict(p["expected"]["rows"]),
                        observed=observed[(p["port"], p["protocol"], via)],
                        columns=list(p["expected"]["columns"]),
                    )
                    result.probes.append(outcome)
                    if outcome.wrong:
                        result.status = "failed"
        return result


def _expected_row(probes: list[Obj], key: tuple[int, str, str], row: str) -> str:
    for p in probes:
        if (p["port"], p["protocol"]) == key[:2]:
            return str(p["expected"]["rows"][row])
    return ""


def _wrong(probe: Obj, observed: dict[str, str]) -> bool:
    cols = probe["expected"]["columns"]
    for row, exp in probe["expected"]["rows"].items():
        for e, o, col in zip(exp, observed.get(row, ""), cols, strict=False):
            if col != row and e != o:
                return True
    return False


def render(result: CaseResult, name: str = "", full: bool = False) -> str:
    """A case's matrices: per probe, each row as expected | observed, wrong cells marked (only
    for probes with a wrong cell, unless ``full``)."""
    lines = [f"== {result.id} {name}: {result.status.upper()} {result.why}".rstrip()]
    for o in result.probes:
        mark = "ok" if not o.wrong else f"{o.wrong} WRONG"
        lines.append(f"  [{o.step}] {o.protocol}/{o.port} via {o.via}: {mark}")
        if o.wrong or full:
            width = max(len(r) for r in o.expected)
            lines.append(f"    {'':{width}}  expected   observed")
            for row, exp in o.expected.items():
                obs = o.observed.get(row, "")
                flag = (
                    " <-"
                    if any(e != b for e, b, c in zip(exp, obs, o.columns, strict=False) if c != row)
                    else ""
                )
                lines.append(f"    {row:{width}}  {exp}  {obs}{flag}")
    return "\n".join(lines)


def run_cases(
    h: Harness, cases: list[Obj], progress: Progress = print, full: bool = False
) -> list[CaseResult]:
    """The empty model first (every probe must connect), then every case in series."""
    empty = {
        "id": "empty-model",
        "steps": [
            {
                "description": "no policy: everything connects",
                "probes": [
                    {"port": port, "protocol": proto, "expected": _all_dots()}
                    for port in PORTS
                    for proto in PROTOCOLS
                ],
            }
        ],
    }
    base = h.run_case(empty)
    progress(render(base))
    if base.status != "passed":
        return [base]
    results: list[CaseResult] = []
    for case in cases:
        start = time.monotonic()
        try:
            res = h.run_case(case)
        except CaseError as e:
            res = CaseResult(case["id"], "failed", why=str(e))
        took = f"  ({time.monotonic() - start:.1f}s)"
        progress(render(res, case.get("name", ""), full) + took)
        results.append(res)
    return results


def run_file(
    lab: Lab,
    path: str,
    via: Via = "both",
    only: list[str] | None = None,
    progress: Progress = print,
    keep_model: bool = False,
    full: bool = False,
) -> list[CaseResult]:
    """Every case of ``path`` (or those in ``only``) on a lab that is up."""
    cases = load_cases(path)
    if only:
        cases = [c for c in cases if c["id"] in only]
    h = Harness(lab, via, progress)
    h.setup()
    try:
        return run_cases(h, cases, progress, full)
    finally:
        if not keep_model:
            h.teardown()


def _all_dots() -> Obj:
    cols = [f"{ns}/{p}" for ns in NAMESPACES for p in PODS]
    return {"columns": cols, "rows": {c: "." * len(cols) for c in cols}}


def summary(results: list[CaseResult]) -> str:
    counts = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "not-run")}
    failed = [r.id for r in results if r.status == "failed"]
    line = f"netpol-matrix: {counts['passed']} passed, {counts['failed']} failed, "
    line += f"{counts['not-run']} not-run of {len(results)} cases"
    return line + (f"; failed: {', '.join(failed)}" if failed else "")

#!/usr/bin/env python3
"""Bench: one agent's memory and start-up time at 10,000 services / 1,000 pods, per datastore.

The cluster (the same objects in every datastore): the lab's own FelixConfiguration, IPPool
(VXLAN Always), namespaces and Node node1; 10 remote Nodes with two /26 IPAM blocks each (more
if the pods need them); 1,000 Pods spread over the remote nodes (addresses in their blocks);
10,000 selector-less ClusterIP Services, each with one EndpointSlice of 3 ready endpoints
(benchlib's synthetic ones). node1's agent therefore lists and computes everything, programs
10,000 frontends / 30,000 backends and the routes to 20 remote blocks, and has no local pod.

Datastores: ``embedded`` (the lab's SQLite store), ``etcd`` (a private etcd started for the run on
127.0.0.1, its data in the lab's state dir, stopped by PID), ``kubernetes`` (tests/fakeapi, the
fake kube-apiserver, in this process on 127.0.0.1: it speaks the real protocol, lists are paged
500 at a time; its CPU is this process's, not the agent's), and ``typha``: the agent reads
through ``tabby typha`` (Typha's role, a process on 127.0.0.1, synced before the agent starts)
over the embedded store; typha's own RSS is reported beside. Loading the objects is timed but
is not a target.

Per datastore, node1's agent is started (a) cold: its pins removed first, as on a node that
joins, and (b) warm: stopped and started again on its pins, as after an upgrade or a crash.
Reported: process start -> /readyz ready at the store's revision (``start_s``, seen from outside,
polled every 50 ms), the agent's own ``tabby_start_to_insync_seconds`` (exec -> first full list
in: imports, connection, list, decode) and ``tabby_nat_sync_from_insync_seconds`` (first full
list in -> last NAT map write, loading the BPF objects included), and its
memory once ready: VmRSS and the peak VmHWM from /proc/<pid>/status, and VmRSS split into
RssAnon (the process's own) and RssFile (mapped files: shared libraries' text, clean).

One 1-node lab (``benchag``, or ``--lab NAME``; removed afterwards also on failure or Ctrl-C);
nothing leaves the lab's namespaces and loopback. Results merged into
bench/results/agent_scale.json.

Usage (root): .venv/bin/python bench/agent_scale.py [--services 10000] [--pods 1000]
                  [--datastores embedded etcd kubernetes typha] [--object-shape lab|apiserver]
                  [--lab benchag]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import benchlib
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the fake kube-apiserver lives with the tests

from fakeapi import FakeApiServer  # noqa: E402

from tabby.calc import names  # noqa: E402
from tabby.dataplane.node import remove_pins  # noqa: E402
from tabby.datastore import DatastoreError, open_datastore  # noqa: E402
from tabby.lab import apishapes, cgroups, etcd, processes, state  # noqa: E402
from tabby.lab.cluster import HEALTH_PORT, Lab, base_resources, pin_root, tabby_bin  # noqa: E402

RESULTS = str(REPO / "bench" / "results" / "agent_scale.json")
LAB = "benchag"
NODE = "node1"
REMOTE_NODES = 10
BLOCKS_PER_NODE = 2  # at least; more when the pods need them (62 pods per /26)
POD_BLOCK_BASE = ipaddress.IPv4Address("100.110.0.0")  # in the pool, far from IPAM's first blocks
READY_TIMEOUT_S = 600.0
console = Console(width=160)


@dataclass
class Run:
    datastore: str
    services: int
    pods: int
    load_s: float  # storing the objects (not a target)
    start: str  # "cold" (pins removed) or "warm" (pins kept)
    start_s: float  # process start -> /readyz ready at the revision
    start_to_insync_s: float  # tabby_start_to_insync_seconds: imports, connect, full list
    insync_to_nat_s: float  # tabby_nat_sync_from_insync_seconds
    rss_mib: float  # VmRSS once ready
    peak_mib: float  # VmHWM once ready
    frontends: float
    server_rss_mib: float = 0.0  # typha only: the fan-out server's VmRSS (one per cluster)
    anon_mib: float = 0.0  # RssAnon once ready: the process's own memory
    file_mib: float = 0.0  # RssFile once ready: mapped files (shared libraries' text, clean)


def dataset(plan: Any, n_services: int, n_pods: int, shape: str = "lab") -> list[dict[str, Any]]:
    """``shape``: "lab" (Pods and Nodes with what tabby reads only) or "apiserver" (as a
    kube-apiserver serves them: managedFields, statuses, a node's images; tabby.lab.apishapes)."""
    objs = base_resources(plan)
    node1 = next(o for o in objs if o["kind"] == "Node")
    subnet = ipaddress.ip_network(
        node1["metadata"]["annotations"]["projectcalico.org/IPv4Address"], strict=False
    )
    pods_per_node = -(-n_pods // REMOTE_NODES)
    blocks_per_node = max(BLOCKS_PER_NODE, -(-pods_per_node // 62))
    block = int(POD_BLOCK_BASE)
    pod_ips: dict[str, list[str]] = {}
    for r in range(REMOTE_NODES):
        name = f"remote-{r}"
        ip = str(subnet.network_address + 100 + r)  # addresses of the node subnet nobody uses
        address = {"projectcalico.org/IPv4Address": f"{ip}/{subnet.prefixlen}"}
        objs.append(
            apishapes.node(name, ip, {}, address)
            if shape == "apiserver"
            else {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": {"kubernetes.io/hostname": name},
                    "annotations": address,
                },
                "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
            }
        )
        ips: list[str] = []
        for _ in range(blocks_per_node):
            cidr = f"{ipaddress.IPv4Address(block)}/26"
            block += 64
            objs.append(
                {
                    "apiVersion": "tabby.dev/v1",
                    "kind": "IPAMBlock",
                    "metadata": {"name": names.block_name(cidr)},
                    "spec": {"cidr": cidr, "affinity": f"host:{name}", "allocations": {}},
                }
            )
            ips += [str(a) for a in list(ipaddress.ip_network(cidr).hosts())[1:]]
        pod_ips[name] = ips[:pods_per_node]
    count = 0
    for name, ips in pod_ips.items():
        for ip in ips:
            if count == n_pods:
                break
            objs.append(
                apishapes.pod("default", f"pod-{count}", name, ip, {"app": f"a{count % 50}"})
                if shape == "apiserver"
                else {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": f"pod-{count}",
                        "namespace": "default",
                        "labels": {"app": f"a{count % 50}"},
                    },
                    "spec": {"nodeName": name, "containers": [{"name": "c", "image": "netexec"}]},
                    "status": {
                        "phase": "Running",
                        "podIP": ip,
                        "podIPs": [{"ip": ip}],
                        "conditions": [{"type": "Ready", "status": "True"}],
                    },
                }
            )
            count += 1
    for i in range(n_services):
        objs += [benchlib.service(i), benchlib.endpoint_slice(i, node="remote-0")]
    if not any(
        o["kind"] == "Namespace" and o["metadata"]["name"] == benchlib.NAMESPACE for o in objs
    ):
        objs.append(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": benchlib.NAMESPACE}}
        )
    return objs


def _wire(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] in ("FelixConfiguration", "IPPool"):
        return {**obj, "apiVersion": "crd.projectcalico.org/v1"}
    return obj


def memory_mib(pid: int) -> tuple[float, float]:
    fields = status_mib(pid)
    return fields["VmRSS"], fields["VmHWM"]


def status_mib(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of ``pid`` (/proc/PID/status), MiB."""
    fields: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


class Bench:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.node = lab.plan.node(NODE)
        self.work = state.lab_dir(lab.name)

    def _record(self, rec: dict[str, Any]) -> None:
        with state.editing(self.lab.name) as st:
            st["procs"] = [p for p in st["procs"] if p["role"] != rec["role"]] + [rec]

    def stop_agent(self) -> None:
        processes.stop(self.lab.agent_proc(NODE), signal.SIGTERM)

    def start_agent(self, url: str, revision: int) -> tuple[float, dict[str, Any]]:
        argv = [
            tabby_bin(), "agent", "--node", NODE, "--datastore", url,
            "--netns", self.node.netns, "--pin-root", pin_root(self.lab.name, NODE),
            "--data-iface", "eth0", "--health-port", str(HEALTH_PORT),
            "--cgroup", cgroups.group(self.lab.name, NODE),
        ]  # fmt: skip
        started = time.monotonic()
        rec = processes.spawn(
            argv,
            f"agent {NODE}",
            os.path.join(self.work, f"agent-{NODE}.log"),
            cgroup=cgroups.group(self.lab.name, NODE),
        )
        self._record(rec)
        deadline = started + READY_TIMEOUT_S
        while True:
            r = benchlib.agent_readyz(self.node.netns)
            if r.get("ready") and int(r.get("revision", 0)) >= revision:
                break
            if not processes.alive(rec):
                raise RuntimeError(f"agent died; see {self.work}/agent-{NODE}.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent not ready in {READY_TIMEOUT_S} s: {r}")
            time.sleep(0.05)
        return time.monotonic() - started, rec

    def measure(
        self, ds_name: str, url: str, revision: int, load_s: float, n: int, p: int
    ) -> list[Run]:
        runs = []
        for start in ("cold", "warm"):
            self.stop_agent()
            if start == "cold":
                remove_pins(pin_root(self.lab.name, NODE))
            start_s, rec = self.start_agent(url, revision)
            time.sleep(1.0)  # let the first conntrack sweep and the metrics settle
            mem = status_mib(int(rec["pid"]))
            rss, peak = mem["VmRSS"], mem["VmHWM"]
            metrics = benchlib.agent_metrics(self.node.netns)
            run = Run(
                ds_name, n, p, load_s, start, start_s,
                metrics.get("tabby_start_to_insync_seconds", float("nan")),
                metrics.get("tabby_nat_sync_from_insync_seconds", float("nan")),
                rss, peak, metrics.get("tabby_services", float("nan")),
                anon_mib=mem["RssAnon"], file_mib=mem["RssFile"],
            )  # fmt: skip
            if run.frontends < n:
                raise RuntimeError(f"{ds_name}: {run.frontends} frontends, expected {n}")
            console.print(
                f"  {ds_name} {start}: ready in {start_s:.2f} s, start->in-sync "
                f"{run.start_to_insync_s:.2f} s, in-sync->NAT "
                f"{run.insync_to_nat_s:.2f} s, RSS {rss:.0f} MiB (anon {run.anon_mib:.0f}, "
                f"file {run.file_mib:.0f}; peak {peak:.0f})"
            )
            runs.append(run)
        return runs


def bench_embedded(b: Bench, objs: list[dict[str, Any]], n: int, p: int) -> list[Run]:
    ds = b.lab.datastore()
    load_s, revision = benchlib.store(ds, objs)
    return b.measure("embedded", b.lab.url, revision, load_s, n, p)


def bench_etcd(b: Bench, objs: list[dict[str, Any]], n: int, p: int) -> list[Run]:
    client, peer = etcd.free_port(), etcd.free_port()
    data = os.path.join(b.work, "bench-etcd")
    argv = etcd.argv(data, client, peer)
    rec = processes.spawn(argv, "bench etcd", os.path.join(b.work, "bench-etcd.log"), cwd=b.work)
    b._record(rec)  # lab down stops it by PID too
    url = f"etcd://127.0.0.1:{client}"
    try:
        etcd.wait_ready(url, alive=lambda: processes.alive(rec))
        ds = open_datastore(url)
        load_s, revision = benchlib.store(ds, objs)
        ds.close()
        return b.measure("etcd", url, revision, load_s, n, p)
    finally:
        b.stop_agent()
        processes.stop(rec)
        shutil.rmtree(data, ignore_errors=True)


def bench_kubernetes(b: Bench, objs: list[dict[str, Any]], n: int, p: int) -> list[Run]:
    api = FakeApiServer().start()
    try:
        started = time.monotonic()
        revision = api.load([_wire(o) for o in objs])
        load_s = time.monotonic() - started
        kubeconfig = api.kubeconfig(Path(b.work) / "bench-kubeconfig")
        return b.measure("kubernetes", f"kubernetes://{kubeconfig}", revision, load_s, n, p)
    finally:
        b.stop_agent()
        api.stop()


def bench_typha(b: Bench, objs: list[dict[str, Any]], n: int, p: int) -> list[Run]:
    """The agent reading through `tabby typha` (a process of the lab, on 127.0.0.1) over the
    lab's embedded store; typha is up and synced before the agent starts."""
    ds = b.lab.datastore()
    load_s, _ = benchlib.store(ds, objs)  # unchanged objects if embedded ran first: no writes
    revision = ds.revision()
    port = etcd.free_port()
    argv = [tabby_bin(), "typha", "--datastore", b.lab.url, "--listen", f"127.0.0.1:{port}"]
    rec = processes.spawn(argv, "bench typha", os.path.join(b.work, "bench-typha.log"))
    b._record(rec)  # lab down stops it by PID too
    url = f"typha://127.0.0.1:{port}?datastore={quote(b.lab.url, safe='')}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:  # typha's own list done: a client's first snapshot answers
            try:
                client = open_datastore(url)
                try:
                    if client.revision() >= revision:
                        break
                finally:
                    client.close()
            except DatastoreError:
                pass
            if not processes.alive(rec) or time.monotonic() > deadline:
                raise RuntimeError(f"typha never served revision {revision}; see its log")
            time.sleep(0.2)
        runs = b.measure("typha (embedded)", url, revision, load_s, n, p)
        rss, _ = memory_mib(int(rec["pid"]))
        for run in runs:
            run.server_rss_mib = rss
        console.print(f"  typha: RSS {rss:.0f} MiB")
        return runs
    finally:
        b.stop_agent()
        processes.stop(rec)


def table(runs: list[Run]) -> None:
    t = Table(title="agent start-up and memory (node1, no local pod)")
    for col in ("datastore", "services", "pods", "load s", "start", "start -> ready s",
                "start -> in-sync s", "in-sync -> NAT s", "RSS MiB", "peak MiB"):  # fmt: skip
        t.add_column(col, justify="right")
    for r in runs:
        t.add_row(
            r.datastore, str(r.services), str(r.pods), f"{r.load_s:.1f}", r.start,
            f"{r.start_s:.2f}", f"{r.start_to_insync_s:.2f}", f"{r.insync_to_nat_s:.2f}",
            f"{r.rss_mib:.0f}", f"{r.peak_mib:.0f}",
        )  # fmt: skip
    console.print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--pods", type=int, default=1_000)
    ap.add_argument(
        "--datastores", nargs="+", default=["embedded", "etcd", "kubernetes"],
        choices=["embedded", "etcd", "kubernetes", "typha"],
    )  # fmt: skip
    ap.add_argument(
        "--object-shape", choices=["lab", "apiserver"], default="lab",
        help="Pods and Nodes as the lab writes them (what tabby reads) or as a kube-apiserver "
        "serves them (~5 KB of JSON per pod: tabby.lab.apishapes; --datastores kubernetes)",
    )  # fmt: skip
    ap.add_argument(
        "--lab", default=LAB, help="the lab's name (removed first if it exists: give a name of "
        "your own when someone else may be running this bench on the machine)",
    )  # fmt: skip
    args = ap.parse_args()
    if args.object_shape == "apiserver" and args.datastores != ["kubernetes"]:
        # the other stores validate what is written against the lab's model, which knows the
        # fields tabby reads; the fake API server loads without admission, as etcd behind a
        # kube-apiserver holds what it served
        ap.error("--object-shape apiserver goes with --datastores kubernetes only")
    if os.geteuid() != 0:
        sys.exit("run as root (the lab needs network namespaces and bpffs)")

    def interrupted(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    Lab.down(args.lab, progress=lambda _m: None)  # a leftover of an interrupted run
    lab = Lab.up(args.lab, nodes=1, progress=lambda m: console.print(f"  lab: {m}"))
    runs: list[Run] = []
    try:
        b = Bench(lab)
        b.stop_agent()  # loading must not race the lab's own agent for the CPUs
        objs = dataset(lab.plan, args.services, args.pods, args.object_shape)
        console.print(f"{len(objs)} objects ({args.services} services + slices, {args.pods} pods)")
        for name in args.datastores:
            fn = {
                "embedded": bench_embedded,
                "etcd": bench_etcd,
                "kubernetes": bench_kubernetes,
                "typha": bench_typha,
            }
            console.print(f"[bold]{name}[/]")
            runs += fn[name](b, objs, args.services, args.pods)
    finally:
        Lab.down(args.lab, progress=lambda _m: None)
    table(runs)
    benchlib.write_json(
        RESULTS,
        f"{args.services}x{args.pods}" + ("" if args.object_shape == "lab" else "-apiserver"),
        {"date": time.strftime("%Y-%m-%d"), "runs": [asdict(r) for r in runs]},
    )


if __name__ == "__main__":
    main()

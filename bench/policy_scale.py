#!/usr/bin/env python3
"""Bench: programming 1,000 NetworkPolicies over 1,000 Pod objects, one change, and the per-packet
cost of an isolated pod against a non-isolated one.

In process, on a real datapath loaded on a pin root of its own (/sys/fs/bpf/tabby/bench-*,
removed afterwards even on failure). The cluster: 20 namespaces (label team=t<k % 4>) x 50 pods
(labels app=a<i // 20 % 10>, tier=front|back; named ports http/8080 TCP and dns/53 UDP); 50 of
the pods are on this node ("wired"), the other 950 are datastore-only endpoints elsewhere.
1,000 policies: per namespace 50, each selecting app=a<j // 20 % 10> (every wired pod is
selected by 5), ingress from namespaceSelector team=t<j % 4> AND podSelector tier=front on the
named port http, plus one of every five with an egress rule to an ipBlock with an except on
TCP 443-450 (endPort).

Reported: *calc* (calc.policy.compute for this node: the agent pays it on every batch of events),
*map write* (PolicyManager.apply into the pinned maps), entries written; *one change* (one policy's
peers changed: compute + apply, median of 20 with spread); *restart* (a second manager adopts the
pins and rewrites); and *per packet*: BPF_PROG_TEST_RUN of tby_to_wl on an established TCP packet
and on a new flow (SYN) to an isolated pod, as ratios to the same packets for a pod no policy
selects (same run). Every figure is checked against the maps (entries read back).

Part B (--lab), end to end: a one-node lab (`benchpol`, removed afterwards); the same 20
Namespaces and 950 datastore-only Pods (on absent nodes) are stored, the 50 node1 pods are
wired by tabby-cni (image pause: a netns and a veth, no process), then the 1,000 policies;
node1's agent is restarted by its recorded PID and the time to /readyz at that revision is
taken, with `tabby_policy_endpoints` checked; then one policy is updated 10 times and the time
from the datastore write to the agent's /readyz reporting it (apply -> programmed) is taken.

Usage (root): .venv/bin/python bench/policy_scale.py [--pods 1000] [--policies 1000] [--lab]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import benchlib
from scapy.all import IP, TCP, Ether, raw

from tabby.bpf import libbpf
from tabby.bpf.maps.policy import SPECS, PolicyMaps
from tabby.bpf.maps.routes import RouteValue
from tabby.bpf.objects import PIN_BASE, DatapathConfig, DatapathObjects
from tabby.calc import policy as calc
from tabby.dataplane.policy import PolicyManager

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "policy_scale.json")
NODE = "node1"
NAMESPACES = 20
CHANGE_REPS = 20
Obj = dict[str, Any]


def pod_ip(i: int) -> str:
    return f"100.112.{i // 250}.{i % 250 + 1}"


def cluster(n_pods: int, n_policies: int) -> dict[str, dict[tuple[str, str], Obj]]:
    res: dict[str, dict[tuple[str, str], Obj]] = {"Pod": {}, "Namespace": {}, "NetworkPolicy": {}}
    for k in range(NAMESPACES):
        ns = f"ns{k}"
        res["Namespace"][("", ns)] = {"metadata": {"name": ns, "labels": {"team": f"t{k % 4}"}}}
    per_ns = max(1, n_pods // NAMESPACES)
    for i in range(n_pods):
        ns = f"ns{i // per_ns % NAMESPACES}"
        res["Pod"][(ns, f"p{i}")] = {
            "metadata": {
                "namespace": ns,
                "name": f"p{i}",
                "labels": {"app": f"a{i // 20 % 10}", "tier": "front" if i % 2 else "back"},
            },
            "spec": {
                "nodeName": NODE if i % (n_pods // 50 or 1) == 0 else f"other{i % 7}",
                "containers": [
                    {
                        "name": "c",
                        "ports": [
                            {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                            {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                        ],
                    }
                ],
            },
            "status": {"podIP": pod_ip(i), "phase": "Running"},
        }
    for j in range(n_policies):
        ns = f"ns{j % NAMESPACES}"
        spec: Obj = {
            "podSelector": {"matchLabels": {"app": f"a{j // NAMESPACES % 10}"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {
                            "namespaceSelector": {"matchLabels": {"team": f"t{j % 4}"}},
                            "podSelector": {"matchLabels": {"tier": "front"}},
                        }
                    ],
                    "ports": [{"port": "http", "protocol": "TCP"}],
                }
            ],
        }
        if j % 5 == 0:
            spec["policyTypes"] = ["Ingress", "Egress"]
            spec["egress"] = [
                {
                    "to": [
                        {
                            "ipBlock": {
                                "cidr": f"10.{j % 250}.0.0/16",
                                "except": [f"10.{j % 250}.1.0/24"],
                            }
                        }
                    ],
                    "ports": [{"port": 443, "endPort": 450, "protocol": "TCP"}],
                }
            ]
        res["NetworkPolicy"][(ns, f"pol{j}")] = {
            "metadata": {"namespace": ns, "name": f"pol{j}"},
            "spec": spec,
        }
    return res


@contextlib.contextmanager
def bench_pins(tag: str) -> Iterator[str]:
    root = os.path.join(PIN_BASE, f"bench-{uuid.uuid4().hex[:8]}-{tag}")
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(PIN_BASE)


def entries(maps: PolicyMaps) -> tuple[int, int, int]:
    return len(maps.endpoint_items()), len(maps.peer_keys()), len(maps.port_keys())


def per_packet(
    dp: DatapathObjects, isolated_ip: str, open_ip: str, client: str
) -> dict[str, float]:
    """Mean ns per run of tby_to_wl: established packet and SYN, isolated vs not (same run)."""
    routes = dp.routes()
    for ip in (isolated_ip, open_ip):
        routes.upsert(f"{ip}/32", RouteValue.local_workload(1))
    fd = dp.prog_fd("tby_to_wl")

    def frame(dst: str, flags: str, sport: int) -> bytes:
        return raw(
            Ether() / IP(src=client, dst=dst) / TCP(sport=sport, dport=8080, flags=flags) / b"x"
        )

    out: dict[str, float] = {}
    for label, dst in (("isolated", isolated_ip), ("open", open_ip)):
        verdict, _, _ = libbpf.test_run(fd, frame(dst, "S", 40000))  # opens the flow
        assert verdict == 0, f"{label}: SYN refused ({verdict})"
        runs = [libbpf.test_run(fd, frame(dst, "A", 40000), repeat=100000)[2] for _ in range(5)]
        out[f"established_{label}_ns"] = statistics.median(runs)
        # a SYN is judged every time: policy lookups (and the conntrack update) per run
        runs = [libbpf.test_run(fd, frame(dst, "S", 40000), repeat=100000)[2] for _ in range(5)]
        out[f"syn_{label}_ns"] = statistics.median(runs)
    out["established_ratio"] = out["established_isolated_ns"] / out["established_open_ns"]
    out["syn_ratio"] = out["syn_isolated_ns"] / out["syn_open_ns"]
    return out


def part_b(res: dict[str, dict[tuple[str, str], Obj]], lab_name: str = "benchpol") -> Obj:
    from tabby.lab import processes
    from tabby.lab.cluster import Lab

    Lab.down(lab_name, progress=lambda _m: None)  # a leftover of an interrupted run
    lab = Lab.up(lab_name, nodes=1, progress=lambda _m: None)
    try:
        ds = lab.datastore()
        base = [{"apiVersion": "v1", "kind": "Namespace", **o} for o in res["Namespace"].values()]
        wired: list[Obj] = []
        for o in res["Pod"].values():
            if o["spec"]["nodeName"] == NODE:
                wired.append(o)
            else:  # datastore-only: another (absent) node's pod
                base.append({"apiVersion": "v1", "kind": "Pod", **o})
        store_s, _ = benchlib.store(ds, base, chunk=500)
        t0 = time.monotonic()
        for o in wired:  # veth, routes, programs: through tabby-cni, as kubelet would
            meta = o["metadata"]
            lab.add_pod(meta["name"], NODE, meta["namespace"], "pause", meta["labels"], wait=False)
        lab.wait_ready(timeout_s=300)
        wire_s = time.monotonic() - t0
        pols = [
            {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", **o}
            for o in res["NetworkPolicy"].values()
        ]
        t0 = time.monotonic()
        pol_store_s, revision = benchlib.store(ds, pols, chunk=500)
        lab.wait_ready(revision, timeout_s=300)
        live_s = time.monotonic() - t0
        node = lab.plan.node(NODE)
        rec = lab.agent_proc(NODE)
        processes.stop(rec, signal.SIGTERM)
        t0 = time.monotonic()
        lab.start_agent(node)
        lab.wait_ready(revision, timeout_s=300)
        restart_s = time.monotonic() - t0
        endpoints = benchlib.agent_metrics(node.netns).get("tabby_policy_endpoints", -1)
        latencies = []
        target = dict(pols[0])
        for rep in range(10):
            spec = json.loads(json.dumps(target["spec"]))
            spec["ingress"][0]["from"][0]["podSelector"] = {
                "matchLabels": {"tier": "front" if rep % 2 else "back"}
            }
            t0 = time.monotonic()
            rev = ds.apply([{**target, "spec": spec}])
            benchlib.wait_programmed(node.netns, rev, timeout_s=60)
            latencies.append((time.monotonic() - t0) * 1000)
    finally:
        Lab.down(lab_name, progress=lambda _m: None)
    return {
        "store_pods_s (not target)": round(store_s, 2),
        "wire_50_pods_s (not target)": round(wire_s, 2),
        "policies_stored_to_programmed_s": round(live_s, 2),
        "of_which_datastore_writes_s": round(pol_store_s, 2),
        "agent_restart_to_ready_s": round(restart_s, 2),
        "policy_endpoints_metric": endpoints,
        "one_change_apply_to_programmed_ms": benchlib.spread(latencies),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", type=int, default=1000)
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--lab", action="store_true", help="also part B: through a lab's agent")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so the lab and the pins are removed (finally blocks)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    res = cluster(args.pods, args.policies)
    gc.collect()
    gc.freeze()
    t0 = time.perf_counter()
    desired = calc.compute(res, NODE)
    calc_s = time.perf_counter() - t0
    wired = sum(1 for p in res["Pod"].values() if p["spec"]["nodeName"] == NODE)
    classes = sum(len(e.ingress.classes) + len(e.egress.classes) for e in desired.values())
    with bench_pins("policy") as root:
        dp = DatapathObjects(root, DatapathConfig.build(vni=4096, host_ip="172.20.32.10"))
        with dp:
            maps = PolicyMaps(*(dp.map(s) for s in SPECS))
            mgr = PolicyManager(maps)
            t0 = time.perf_counter()
            applied = mgr.apply(desired)
            write_s = time.perf_counter() - t0
            assert not applied.errors, applied.errors
            eps, peers, ports = entries(maps)
            assert eps == len(desired) and peers > 0

            changes = []
            target = next(iter(sorted(res["NetworkPolicy"])))
            for r in range(CHANGE_REPS):
                pol = res["NetworkPolicy"][target]
                peer = pol["spec"]["ingress"][0]["from"][0]
                peer["podSelector"] = {"matchLabels": {"tier": "front" if r % 2 else "back"}}
                t0 = time.perf_counter()
                step = mgr.apply(calc.compute(res, NODE))
                changes.append((time.perf_counter() - t0) * 1000)
                assert not step.errors and step.changed >= 1
            assert entries(maps)[0] == len(desired)

            t0 = time.perf_counter()
            again = PolicyManager(PolicyMaps(*(dp.map(s) for s in SPECS)))
            restarted = again.apply(calc.compute(res, NODE))
            restart_s = time.perf_counter() - t0
            assert not restarted.errors and entries(maps)[1] == peers

            isolated = next(ip for ip in sorted(desired))
            open_ip = pod_ip(args.pods + 5)  # no Pod object: no policy
            client = pod_ip(1)  # tier=front, team t0
            packet = per_packet(dp, isolated, open_ip, client)

    row = {
        "pods": args.pods,
        "wired_on_node": wired,
        "policies": args.policies,
        "isolated_endpoints": len(desired),
        "rule_classes": classes,
        "calc_s": round(calc_s, 3),
        "map_write_s": round(write_s, 3),
        "total_s": round(calc_s + write_s, 3),
        "entries": {"endpoints": eps, "peers": peers, "ports": ports},
        "map_writes": applied.writes,
        "one_change_ms": benchlib.spread(changes),
        "restart_s": round(restart_s, 3),
        "per_packet": {k: round(v, 2) for k, v in packet.items()},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if args.lab:
        row["lab"] = part_b(res)
    benchlib.write_json(RESULTS, f"{args.pods}pods_{args.policies}policies", row)
    for k, v in row.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

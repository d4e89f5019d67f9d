"""Per-packet cost of IPv6 NetworkPolicy (policy6.h), as ratios within one run.

BPF_PROG_TEST_RUN of tby_to_wl (100,000 repeats x 5, median ns per run) for a TCP packet of an
established flow and a SYN (judged every time), to an isolated dual-stack pod and to a pod no
policy selects, over IPv6 and over IPv4 (the same pods, the same policy set). Ratios: isolated /
open per family, and IPv6 isolated / IPv4 isolated. Nothing is timed in tests; this only reports.

Usage (root): .venv/bin/python bench/policy6_packet.py
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import sys
import uuid
from typing import Any

from scapy.all import IP, TCP, Ether, IPv6, raw

from tabby.bpf import libbpf
from tabby.bpf.maps.policy import SPECS, PolicyMaps
from tabby.bpf.maps.routes import RouteValue
from tabby.bpf.objects import PIN_BASE, DatapathConfig, DatapathObjects
from tabby.calc import policy as calc
from tabby.dataplane.policy import PolicyManager

ISOLATED = ("100.96.0.5", "fd00:96::5")
OPEN = ("100.96.0.6", "fd00:96::6")
CLIENT = ("100.96.0.70", "fd00:96::46")
REPEAT = 100_000


def pod(name: str, addrs: tuple[str, str], node: str) -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {"namespace": "x", "name": name, "labels": {"app": name}},
        "spec": {"nodeName": node},
        "status": {"podIP": addrs[0], "podIPs": [{"ip": a} for a in addrs], "phase": "Running"},
    }


def resources() -> dict[str, dict[tuple[str, str], Any]]:
    allow = {
        "metadata": {"namespace": "x", "name": "from-client"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "server"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                    "ports": [{"protocol": "TCP", "port": 8080}],
                }
            ],
        },
    }
    objs = [pod("server", ISOLATED, "n1"), pod("open", OPEN, "n1"), pod("client", CLIENT, "n2")]
    out: dict[str, dict[tuple[str, str], Any]] = {"NetworkPolicy": {("x", "from-client"): allow}}
    for o in objs:
        out.setdefault("Pod", {})[("x", o["metadata"]["name"])] = o
    return out


def frame(family: int, dst: str, flags: str) -> bytes:
    src = CLIENT[0] if family == 4 else CLIENT[1]
    l3 = IP(src=src, dst=dst) if family == 4 else IPv6(src=src, dst=dst)
    eth = Ether(src="02:fc:00:00:00:05", dst="ee:ee:ee:ee:ee:ee")
    return raw(eth / l3 / TCP(sport=40000, dport=8080, flags=flags) / b"x")


def measure(fd: int, data: bytes) -> float:
    return float(statistics.median(libbpf.test_run(fd, data, repeat=REPEAT)[2] for _ in range(5)))


def main() -> int:
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 2
    root = os.path.join(PIN_BASE, f"bench-{uuid.uuid4().hex[:8]}-policy6")
    out: dict[str, float] = {}
    try:
        with DatapathObjects(root, DatapathConfig.build(vni=4096, host_ip="172.20.32.10")) as dp:
            routes = dp.routes()
            for ip in (ISOLATED[0], OPEN[0]):
                routes.upsert(f"{ip}/32", RouteValue.local_workload(1))
            mgr = PolicyManager(PolicyMaps(*(dp.map(s) for s in SPECS)))
            assert not mgr.apply(calc.compute(resources(), "n1")).errors
            fd = dp.prog_fd("tby_to_wl")
            for family, i in ((4, 0), (6, 1)):
                for label, dst in (("isolated", ISOLATED[i]), ("open", OPEN[i])):
                    verdict = libbpf.test_run(fd, frame(family, dst, "S"))[0]
                    assert verdict == 0, f"IPv{family} {label}: SYN refused"
                    out[f"v{family}_established_{label}_ns"] = measure(fd, frame(family, dst, "A"))
                    out[f"v{family}_syn_{label}_ns"] = measure(fd, frame(family, dst, "S"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(PIN_BASE)
    for fam in ("v4", "v6"):
        for kind in ("established", "syn"):
            out[f"{fam}_{kind}_ratio"] = (
                out[f"{fam}_{kind}_isolated_ns"] / out[f"{fam}_{kind}_open_ns"]
            )
    for kind in ("established", "syn"):
        out[f"{kind}_v6_over_v4_isolated"] = (
            out[f"v6_{kind}_isolated_ns"] / out[f"v4_{kind}_isolated_ns"]
        )
    print(json.dumps({k: round(v, 2) for k, v in out.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

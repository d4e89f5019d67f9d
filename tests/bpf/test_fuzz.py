"""Random headers never crash a program: the verdict is OK or SHOT and the frame is untouched."""

from __future__ import annotations

import errno
import random

import packets as P
import pytest
from scapy.all import ICMP, TCP, UDP

from tabby.bpf import libbpf
from tabby.bpf.libbpf import TC_ACT_OK, TC_ACT_SHOT
from tabby.bpf.maps.routes import RouteValue

pytestmark = pytest.mark.root

PER_LAYER = 100


@pytest.mark.parametrize("prog", ["tby_from_wl", "tby_to_wl", "tby_tun_egress", "tby_tun_ingress"])
def test_fuzzed_headers(runner: P.Runner, prog: str) -> None:
    random.seed(f"tabby-{prog}")  # scapy's fuzz() draws from `random`: reproducible runs
    routes = runner.dp.routes()
    routes.upsert(f"{P.POD_IP}/32", RouteValue.local_workload(1))
    routes.upsert("100.96.0.64/26", RouteValue.remote_workload(P.REMOTE_NODE_IP))
    fd = runner.dp.prog_fd(prog)
    verdicts = {TC_ACT_OK: 0, TC_ACT_SHOT: 0}
    refused = 0
    for layer in (TCP, UDP, ICMP):
        for data in P.fuzzed(PER_LAYER, seed_layer=layer):
            try:
                verdict, out, _ = libbpf.test_run(fd, data)
            except OSError as e:  # the kernel refuses frames with < 20 bytes of L3
                assert e.errno == errno.EINVAL and len(data) < 14 + 20, data.hex()
                refused += 1
                continue
            assert verdict in verdicts, (verdict, data.hex())
            assert out == data, data.hex()
            verdicts[verdict] += 1
    assert sum(verdicts.values()) + refused == 3 * PER_LAYER

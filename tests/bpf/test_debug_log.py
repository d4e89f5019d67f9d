"""bpfLogLevel Debug: drops are reported on the trace pipe; at Off nothing is printed.

tracefs is mounted in a private mount namespace of a child process, so the host is untouched.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from tabby.bpf.maps.counters import Reason

pytestmark = pytest.mark.root

CHILD = textwrap.dedent(
    """
    import shutil, sys
    sys.path.insert(0, {tests!r})
    import packets as P
    from tabby.bpf import libbpf
    from tabby.bpf.maps.routes import RouteValue
    from tabby.bpf.objects import DatapathConfig, DatapathObjects

    pin = {pin!r}
    try:
        cfg = DatapathConfig.build(vni=4242, host_ip=P.NODE_IP, log_level={level})
        with DatapathObjects(pin, cfg, {bpf_dir!r}) as dp:
            dp.routes().upsert(P.POD_IP + "/32", RouteValue.local_workload(1))
            open("/sys/kernel/tracing/trace", "w").close()  # clear the buffer
            verdict, _, _ = libbpf.test_run(dp.prog_fd("tby_from_wl"), P.udp(src=P.EXTERNAL_IP))
            print("verdict", verdict)
        print(open("/sys/kernel/tracing/trace").read())
    finally:
        shutil.rmtree(pin, ignore_errors=True)
    """
)


def run_child(bpf_dir: Path, level: int) -> str:
    code = CHILD.format(
        tests=str(Path(__file__).parent),
        pin=f"/sys/fs/bpf/tabby-test-{uuid.uuid4().hex[:10]}",
        level=level,
        bpf_dir=str(bpf_dir),
    )
    script = "mount -t tracefs nodev /sys/kernel/tracing && exec " + sys.executable + " -"
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        input=code,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_debug_level_reports_the_drop_reason(bpf_dir: Path) -> None:
    out = run_child(bpf_dir, level=2)
    assert "verdict 2" in out  # TC_ACT_SHOT: spoofed source
    assert "tabby: drop reason=6" in out  # TBY_R_DROP_SPOOF


def test_off_level_prints_nothing(bpf_dir: Path) -> None:
    out = run_child(bpf_dir, level=0)
    assert "verdict 2" in out
    assert "tabby:" not in out


POLICY_CHILD = textwrap.dedent(
    """
    import shutil, sys
    sys.path.insert(0, {tests!r})
    import packets as P
    from tabby.bpf import libbpf
    from tabby.bpf.maps.policy import SPECS, PolicyMaps
    from tabby.bpf.objects import DatapathConfig, DatapathObjects
    from tabby.calc import policy
    from tabby.dataplane.policy import PolicyManager

    pod = {{"kind": "Pod", "metadata": {{"namespace": "x", "name": "a", "labels": {{}}}},
           "spec": {{"nodeName": "n1"}}, "status": {{"podIP": P.POD_IP}}}}
    deny = {{"metadata": {{"namespace": "x", "name": "deny-all"}},
            "spec": {{"podSelector": {{}}, "policyTypes": ["Ingress"]}}}}
    res = {{"Pod": {{("x", "a"): pod}}, "NetworkPolicy": {{("x", "deny-all"): deny}}}}
    pin = {pin!r}
    try:
        cfg = DatapathConfig.build(vni=4242, host_ip=P.NODE_IP, log_level=2)
        with DatapathObjects(pin, cfg, {bpf_dir!r}) as dp:
            maps = PolicyMaps(*(dp.map(s) for s in SPECS))
            mgr = PolicyManager(maps)
            assert not mgr.apply(policy.compute(res, "n1")).errors
            print("set", mgr.sets[P.POD_IP])
            open("/sys/kernel/tracing/trace", "w").close()  # clear the buffer
            verdict, _, _ = libbpf.test_run(
                dp.prog_fd("tby_to_wl"), P.tcp(src=P.REMOTE_POD_IP, dst=P.POD_IP))
            print("verdict", verdict)
        print(open("/sys/kernel/tracing/trace").read())
    finally:
        shutil.rmtree(pin, ignore_errors=True)
    """
)


def test_debug_level_reports_the_policy_set_that_denied(bpf_dir: Path) -> None:
    code = POLICY_CHILD.format(
        tests=str(Path(__file__).parent),
        pin=f"/sys/fs/bpf/tabby-test-{uuid.uuid4().hex[:10]}",
        bpf_dir=str(bpf_dir),
    )
    script = "mount -t tracefs nodev /sys/kernel/tracing && exec " + sys.executable + " -"
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        input=code,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    set_id = out.split("set ", 1)[1].split()[0]
    assert "verdict 2" in out  # TC_ACT_SHOT
    # dir 0 = ingress; the peer is REMOTE_POD_IP 100.96.0.70 = 0x64600046
    assert f"tabby: policy drop dir=0 set={set_id} peer=64600046" in out
    assert f"tabby: drop reason={int(Reason.DROP_POL_IN)}" in out

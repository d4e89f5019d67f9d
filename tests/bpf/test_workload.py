"""from-workload and to-workload programs under BPF_PROG_TEST_RUN, table-driven.

test_run puts the packet on the netns's loopback, so skb->ifindex is 1: the "pod's veth" of
these cases is ifindex 1, and a route on any other ifindex belongs to another pod.
"""

from __future__ import annotations

import packets as P
import pytest

from tabby.bpf.libbpf import TC_ACT_OK, TC_ACT_SHOT
from tabby.bpf.maps.counters import Reason
from tabby.bpf.maps.routes import RouteValue
from tabby.bpf.maps.workloads6 import WORKLOADS6_SPEC, Workload6Key, Workload6Value
from tabby.bpf.objects import DatapathObjects

pytestmark = pytest.mark.root

TEST_RUN_IFINDEX = 1  # loopback: the device test_run injects on


def install_routes(dp: DatapathObjects) -> None:
    routes = dp.routes()
    routes.upsert(f"{P.POD_IP}/32", RouteValue.local_workload(TEST_RUN_IFINDEX))
    routes.upsert(f"{P.OTHER_POD_IP}/32", RouteValue.local_workload(99))
    routes.upsert("100.96.0.64/26", RouteValue.remote_workload(P.REMOTE_NODE_IP))
    routes.upsert(f"{P.NODE_IP}/32", RouteValue.local_host())
    routes.upsert(f"{P.REMOTE_NODE_IP}/32", RouteValue.remote_host(P.REMOTE_NODE_IP))
    wl6 = dp.map(WORKLOADS6_SPEC)  # the pod's IPv6 address on "its veth"; another pod's
    wl6.update(Workload6Key.make(POD_IP6), Workload6Value(ifindex=TEST_RUN_IFINDEX))
    wl6.update(Workload6Key.make(OTHER_POD_IP6), Workload6Value(ifindex=99))


POD_IP6, OTHER_POD_IP6 = "fd00::5", "fd00::6"


FROM_WL = [
    P.Case("tcp from own address", P.tcp, TC_ACT_OK, Reason.PASS_WL_OUT),
    P.Case("udp from own address", P.udp, TC_ACT_OK, Reason.PASS_WL_OUT),
    P.Case("icmp from own address", P.icmp, TC_ACT_OK, Reason.PASS_WL_OUT),
    P.Case("padded minimum frame", P.padded_tcp, TC_ACT_OK, Reason.PASS_WL_OUT),
    P.Case("non-first fragment", P.fragment, TC_ACT_OK, Reason.PASS_WL_OUT),
    P.Case("arp passes", P.arp, TC_ACT_OK, Reason.PASS_NON_IP),
    P.Case("ipv6 from own address passes", P.ipv6, TC_ACT_OK, Reason.PASS_NON_IP),
    P.Case("ipv6 link-local (neighbor discovery) passes", lambda: P.ipv6(src="fe80::1"),
         TC_ACT_OK, Reason.PASS_NON_IP),
    P.Case("ipv6 unspecified (DAD) passes", lambda: P.ipv6(src="::"), TC_ACT_OK,
         Reason.PASS_NON_IP),
    P.Case("ipv6 spoof: another local pod's address", lambda: P.ipv6(src=OTHER_POD_IP6),
         TC_ACT_SHOT, Reason.DROP_SPOOF),
    P.Case("ipv6 spoof: nobody's address", lambda: P.ipv6(src="fd00::99"), TC_ACT_SHOT,
         Reason.DROP_SPOOF),
    P.Case("unknown ethertype", P.other_ethertype, TC_ACT_SHOT, Reason.DROP_ETHERTYPE),
    P.Case("spoof: another local pod's address", lambda: P.tcp(src=P.OTHER_POD_IP),
         TC_ACT_SHOT, Reason.DROP_SPOOF),
    P.Case("spoof: a remote pod's address", lambda: P.tcp(src=P.REMOTE_POD_IP),
         TC_ACT_SHOT, Reason.DROP_SPOOF),
    P.Case("spoof: the node's address", lambda: P.udp(src=P.NODE_IP),
           TC_ACT_SHOT, Reason.DROP_SPOOF),
    P.Case("spoof: unrouted address", lambda: P.icmp(src=P.EXTERNAL_IP),
         TC_ACT_SHOT, Reason.DROP_SPOOF),
    P.Case("ihl < 5", P.ihl_below_5, TC_ACT_SHOT, Reason.DROP_MALFORMED),
    P.Case("version 6 in an IPv4 frame", P.version_6_in_ipv4_frame, TC_ACT_SHOT,
         Reason.DROP_MALFORMED),
    P.Case("tot_len beyond the frame", P.tot_len_beyond_frame, TC_ACT_SHOT, Reason.DROP_MALFORMED),
    P.Case("tot_len below the header", P.tot_len_below_header, TC_ACT_SHOT, Reason.DROP_MALFORMED),
    P.Case("truncated tcp header", P.truncated_tcp, TC_ACT_SHOT, Reason.DROP_MALFORMED),
    P.Case("tcp doff < 5", P.tcp_doff_below_5, TC_ACT_SHOT, Reason.DROP_MALFORMED),
    P.Case("udp len < 8", P.udp_len_below_8, TC_ACT_SHOT, Reason.DROP_MALFORMED),
]  # fmt: skip

TO_WL = [
    P.Case("tcp to a pod", lambda: P.tcp(src=P.REMOTE_POD_IP, dst=P.POD_IP), TC_ACT_OK,
         Reason.PASS_WL_IN),
    P.Case("udp from the internet", lambda: P.udp(src=P.EXTERNAL_IP, dst=P.POD_IP), TC_ACT_OK,
         Reason.PASS_WL_IN),
    P.Case("arp", P.arp, TC_ACT_OK, Reason.PASS_NON_IP),
    P.Case("ipv6", P.ipv6, TC_ACT_OK, Reason.PASS_NON_IP),
    P.Case("ihl < 5", P.ihl_below_5, TC_ACT_SHOT, Reason.DROP_MALFORMED),
    P.Case("tot_len beyond the frame", P.tot_len_beyond_frame, TC_ACT_SHOT, Reason.DROP_MALFORMED),
    P.Case("truncated tcp header", P.truncated_tcp, TC_ACT_SHOT, Reason.DROP_MALFORMED),
]  # fmt: skip


@pytest.mark.parametrize("case", FROM_WL, ids=str)
def test_from_workload(runner: P.Runner, case: P.Case) -> None:
    install_routes(runner.dp)
    data = case.packet()
    verdict, out, delta = runner.run("tby_from_wl", data)
    assert (verdict, delta) == (case.verdict, {case.reason: 1})
    assert out == data  # nothing is rewritten yet


@pytest.mark.parametrize("case", TO_WL, ids=str)
def test_to_workload(runner: P.Runner, case: P.Case) -> None:
    install_routes(runner.dp)
    data = case.packet()
    verdict, out, delta = runner.run("tby_to_wl", data)
    assert (verdict, delta) == (case.verdict, {case.reason: 1})
    assert out == data


def test_spoof_check_follows_route_changes(runner: P.Runner) -> None:
    """The pod's address moving to another veth makes its packets spoofed at once."""
    install_routes(runner.dp)
    assert runner.run("tby_from_wl", P.tcp())[0] == TC_ACT_OK
    runner.dp.routes().upsert(f"{P.POD_IP}/32", RouteValue.local_workload(42))
    assert runner.run("tby_from_wl", P.tcp())[2] == {Reason.DROP_SPOOF: 1}
    runner.dp.routes().delete(f"{P.POD_IP}/32")
    assert runner.run("tby_from_wl", P.tcp())[2] == {Reason.DROP_SPOOF: 1}

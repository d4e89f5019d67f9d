"""Tunnel programs under BPF_PROG_TEST_RUN.

Feasible here: every route decision of tby_tun_egress, including bpf_skb_set_tunnel_key itself
(test_run gives the skb a metadata dst; the key's content cannot be read back), and the
rejection of packets without tunnel metadata by tby_tun_ingress. Not feasible: the VNI and VTEP
checks and the PACKET_OTHERHOST fix-up of tby_tun_ingress, which need bpf_skb_get_tunnel_key to
find metadata that only a real collect_md VXLAN device attaches (live tests cover them).
"""

from __future__ import annotations

from collections.abc import Callable

import packets as P
import pytest

from tabby.bpf import libbpf
from tabby.bpf.libbpf import TC_ACT_OK, TC_ACT_SHOT, SkBuffCtx
from tabby.bpf.maps.counters import Reason
from tabby.bpf.maps.routes import RouteFlags, RouteValue
from tabby.bpf.objects import DatapathObjects

pytestmark = pytest.mark.root

REMOTE_TUNNEL_ADDR = "100.96.0.64"  # the remote node's vxlan device address (in its block)
BGP_BLOCK_POD = "100.96.0.130"  # in 100.96.0.128/26: remote, but routed without encapsulation
IPIP_BLOCK_POD = "100.96.0.200"  # in 100.96.0.192/26: remote via IP-in-IP
LOOP_BLOCK_POD = "100.96.1.5"  # in 100.96.1.0/26: "remote" but the next hop is this node


def install_routes(dp: DatapathObjects) -> None:
    routes = dp.routes()
    routes.upsert(f"{P.POD_IP}/32", RouteValue.local_workload(1))
    routes.upsert("100.96.0.64/26", RouteValue.remote_workload(P.REMOTE_NODE_IP))
    routes.upsert(f"{REMOTE_TUNNEL_ADDR}/32", RouteValue.tunnel_addr(P.REMOTE_NODE_IP))
    routes.upsert("100.96.0.128/26", RouteValue.remote_workload(P.REMOTE_NODE_IP, encap=None))
    routes.upsert("100.96.0.192/26", RouteValue.remote_workload(P.REMOTE_NODE_IP, encap="ipip"))
    routes.upsert("100.96.1.0/26", RouteValue.remote_workload(P.NODE_IP))
    routes.upsert(f"{P.NODE_IP}/32", RouteValue.local_host())
    routes.upsert(
        f"{P.REMOTE_NODE_IP}/32",
        RouteValue.make(RouteFlags.REMOTE_HOST | RouteFlags.ENCAP_VXLAN, next_hop=P.REMOTE_NODE_IP),
    )


EGRESS = [
    P.Case("remote vxlan block", P.tcp, TC_ACT_OK, Reason.ENCAP_VXLAN),
    P.Case("remote vxlan block, udp", P.udp, TC_ACT_OK, Reason.ENCAP_VXLAN),
    P.Case("remote tunnel address", lambda: P.icmp(src=P.NODE_IP, dst=REMOTE_TUNNEL_ADDR),
         TC_ACT_OK, Reason.ENCAP_VXLAN),
    P.Case("no route", lambda: P.tcp(dst=P.EXTERNAL_IP), TC_ACT_SHOT, Reason.DROP_NO_ROUTE),
    P.Case("local pod", lambda: P.tcp(src=P.NODE_IP, dst=P.POD_IP), TC_ACT_SHOT,
         Reason.DROP_NO_ROUTE),
    P.Case("remote block without encap", lambda: P.tcp(dst=BGP_BLOCK_POD), TC_ACT_SHOT,
         Reason.DROP_NO_ROUTE),
    P.Case("remote block via ipip", lambda: P.tcp(dst=IPIP_BLOCK_POD), TC_ACT_SHOT,
         Reason.DROP_NO_ROUTE),
    P.Case("next hop is this node", lambda: P.tcp(dst=LOOP_BLOCK_POD), TC_ACT_SHOT,
         Reason.DROP_NO_ROUTE),
    P.Case("a node address is not a tunnel destination", lambda: P.tcp(dst=P.REMOTE_NODE_IP),
         TC_ACT_SHOT, Reason.DROP_NO_ROUTE),
    P.Case("arp has no tunnel key", P.arp, TC_ACT_SHOT, Reason.DROP_NO_ROUTE),
    P.Case("tot_len beyond the frame", P.tot_len_beyond_frame, TC_ACT_SHOT, Reason.DROP_MALFORMED),
    P.Case("truncated tcp header", P.truncated_tcp, TC_ACT_SHOT, Reason.DROP_MALFORMED),
]  # fmt: skip


@pytest.mark.parametrize("case", EGRESS, ids=str)
def test_tunnel_egress(runner: P.Runner, case: P.Case) -> None:
    install_routes(runner.dp)
    data = case.packet()
    verdict, out, delta = runner.run("tby_tun_egress", data)
    assert (verdict, delta) == (case.verdict, {case.reason: 1})
    assert out == data  # the collect_md device adds the outer headers, not the program


@pytest.mark.parametrize("packet", [P.tcp, P.arp, P.ihl_below_5], ids=["tcp", "arp", "malformed"])
def test_tunnel_ingress_rejects_packets_without_tunnel_metadata(
    runner: P.Runner, packet: Callable[[], bytes]
) -> None:
    install_routes(runner.dp)
    verdict, _, delta = runner.run("tby_tun_ingress", packet())
    assert (verdict, delta) == (TC_ACT_SHOT, {Reason.DROP_BAD_TUNNEL: 1})


def test_a_wrapped_packet_is_marked_so_to_host_skips_its_lookups(runner: P.Runner) -> None:
    """mark.h: what the VXLAN device sends leaves through to-host as an outer header no flow
    or frontend owns; the mark tells to-host so (a pod's masqueraded or reverse-translated
    packets stay unmarked: they never pass this program)."""
    install_routes(runner.dp)
    ctx = SkBuffCtx(mark=0x4000)  # kube-proxy's bit is kept
    verdict, _, _ = libbpf.test_run(runner.dp.prog_fd("tby_tun_egress"), P.tcp(), ctx)
    assert verdict == TC_ACT_OK
    assert ctx.mark == P.MARK_NAT_DONE | 0x4000
    ctx = SkBuffCtx(mark=0x4000)
    verdict, _, _ = libbpf.test_run(
        runner.dp.prog_fd("tby_tun_egress"), P.tcp(dst=P.EXTERNAL_IP), ctx
    )
    assert verdict == TC_ACT_SHOT and ctx.mark == 0x4000, "dropped: not marked"

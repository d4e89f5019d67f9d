// SPDX-License-Identifier: GPL-2.0
/*
 * from-host: TC ingress of the node's data interface, i.e. packets from the
 * network. parse -> IP-in-IP from a known node: decapsulate, parse the inner
 * packet; the ext tunnel from a known node: decapsulate, record (then
 * straight to the pod, fwd.h) or reverse-translate -> conntrack (replies of
 * SNATed service flows) ->
 * NodePort / LoadBalancer / externalIP frontends (a remote backend in Tunnel
 * or DSR mode: into the ext tunnel) -> a local pod's packet straight to its
 * veth (fwd.h, bpfRedirectToPeer), the rest to the node's kernel.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "tabby/types.h"
#include "tabby/maps.h"
#include "tabby/config.h"
#include "tabby/counters.h"
#include "tabby/exttun.h"
#include "tabby/fwd.h"
#include "tabby/icmp.h"
#include "tabby/ipip.h"
#include "tabby/mark.h"
#include "tabby/nat.h"
#include "tabby/nat6.h"
#include "tabby/parse.h"

/*
 * The documented collision, refused cleanly rather than left to hang: the
 * client port already reaches this backend through another frontend. A TCP
 * SYN gets its destination back (the frontend it was sent to) and becomes an
 * ICMP port unreachable from there, back to the hop it came from, which
 * routes it to the client (ECONNREFUSED); anything else of the flow (UDP
 * included) is dropped.
 */
static __always_inline int from_host_refuse(struct __sk_buff *skb, struct parsed_pkt *pkt,
					    const struct tby_ext_hdr *ext)
{
	struct flow f = {};

	if (pkt->is_frag || ct_flow_of(skb, pkt, &f) || f.key.proto != IPPROTO_TCP ||
	    (f.tcp_flags & (TBY_TCPF_SYN | TBY_TCPF_ACK)) != TBY_TCPF_SYN) {
		counter_inc(TBY_R_DROP_EXT_FLOW);
		return TC_ACT_SHOT;
	}
	if (nat_rewrite(skb, pkt, 1, f.key.dst, ext->fe_addr, f.key.dport, ext->fe_port)) {
		counter_inc(TBY_R_DROP_NAT_FAIL);
		return TC_ACT_SHOT;
	}
	return icmp_refuse_syn(skb, pkt, TBY_R_EXT_REFUSED);
}

/*
 * The ext tunnel (exttun.h): a forwarded flow's packet is recorded for its
 * local backend; a backend's reply, back from its node, gets its frontend
 * back here (nat_handle) and the kernel forwards it to the client.
 */
static __always_inline int from_host_ext(struct __sk_buff *skb, struct parsed_pkt *pkt,
					 const struct tby_ext_hdr *ext, __be32 from)
{
	struct tby_route_val *rt;

	if (parse_packet(skb, pkt) != PARSE_IPV4) {
		counter_inc(TBY_R_DROP_MALFORMED);
		return TC_ACT_SHOT;
	}
	if (ext->flags & TBY_EXT_F_REPLY) {
		switch (nat_handle(skb, pkt, 0, NULL)) {
		case NAT_DROP:
			return TC_ACT_SHOT;
		case NAT_DONE: /* as its frontend, to the client */
			mark_nat_done(skb);
			return TC_ACT_OK;
		default:
			return TC_ACT_OK;
		}
	}
	rt = route_lookup(pkt->daddr);
	switch (exttun_record(skb, pkt, ext, from, rt)) {
	case 0: /* recorded: straight to the pod (fwd.h) */
		return fwd_local_wl_route(skb, rt);
	case TBY_EXT_COLLISION:
		return from_host_refuse(skb, pkt, ext);
	default:
		return TC_ACT_SHOT;
	}
}

SEC("tc")
int tby_from_host(struct __sk_buff *skb)
{
	struct nat_dst_route dst = {};
	struct exttun_dst tun = {};
	struct parsed_pkt pkt = {};
	struct tby_ext_hdr ext;

	switch (parse_packet(skb, &pkt)) {
	case PARSE_IPV4:
		break;
	case PARSE_IPV6: /* IPv6 NodePorts (nat6.h); the rest is the stack's */
		return nat6_from_host(skb) == NAT6_DROP ? TC_ACT_SHOT : TC_ACT_OK;
	default:
		return TC_ACT_OK; /* the node's own stack judges the rest */
	}
	if (pkt.ip_proto == IPPROTO_IPIP && pkt.daddr == cfg_host_ip && cfg_host_ip) {
		if (ipip_decap(skb, &pkt) == IPIP_DROP)
			return TC_ACT_SHOT;
		/* the inner packet, as if it had arrived plain */
		if (parse_packet(skb, &pkt) != PARSE_IPV4) {
			counter_inc(TBY_R_DROP_MALFORMED);
			return TC_ACT_SHOT;
		}
	} else if (pkt.ip_proto == IPPROTO_UDP && pkt.daddr == cfg_host_ip && cfg_host_ip) {
		switch (exttun_decap(skb, &pkt, &ext)) {
		case EXTTUN_DROP:
			return TC_ACT_SHOT;
		case EXTTUN_DONE:
			return from_host_ext(skb, &pkt, &ext, pkt.saddr);
		case EXTTUN_POD_VXLAN:
			/* its outer header is never a frontend's, nor a flow's */
			return TC_ACT_OK;
		default:
			break;
		}
	}

	/* dst: a packet to a pod (most of what arrives here: BGP-routed and
	 * IP-in-IP pod traffic) skips the frontend map for the route the fast
	 * path needs anyway (nat_new_flow) */
	switch (nat_handle_dst(skb, &pkt, NAT_HOOK_FRONTENDS | NAT_HOOK_SNAT_REMOTE, &tun, &dst)) {
	case NAT_REJECT:
		return icmp_reject(skb, &pkt);
	case NAT_TOO_BIG:
		return icmp_too_big(skb, &pkt, exttun_room());
	case NAT_TUNNEL:
		return exttun_send(skb, &tun, pkt.ip_proto, TBY_R_EXT_FWD);
	case NAT_DROP:
		return TC_ACT_SHOT;
	default:
		/* a local pod's packet (IP-in-IP, BGP routes, NodePort to a local
		 * backend): to its veth (fwd.h); the rest is the stack's */
		return fwd_local_wl(skb, &dst);
	}
}

char LICENSE[] SEC("license") = "GPL";

// SPDX-License-Identifier: GPL-2.0
/*
 * from-workload: TC ingress of a pod's host-side veth, i.e. packets the pod
 * sends. parse -> anti-spoofing -> conntrack / service NAT -> egress policy
 * on the translated packet -> forward: straight to the next hop's device
 * (fwd.h, bpfRedirectToPeer) or through the node's stack. IPv6: anti-spoofing
 * (tby_wl6) -> egress policy (policy6.h) -> IPv6 NodePort replies (nat6.h).
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "tabby/types.h"
#include "tabby/maps.h"
#include "tabby/config.h"
#include "tabby/counters.h"
#include "tabby/fib.h"
#include "tabby/fwd.h"
#include "tabby/icmp.h"
#include "tabby/mark.h"
#include "tabby/nat.h"
#include "tabby/nat6.h"
#include "tabby/parse.h"
#include "tabby/policy.h"
#include "tabby/policy6.h"

/* The source must be a local workload route on the very veth it came in. */
static __always_inline int wl_source_ok(struct __sk_buff *skb, __be32 saddr)
{
	struct tby_route_val *rt = route_lookup(saddr);

	return rt && (rt->flags & TBY_RT_LOCAL_WL) &&
	       rt->ifindex == skb->ifindex;
}

/*
 * IPv6: the source must be the pod's own address on this veth (tby_wl6), or
 * link-local / unspecified (neighbor discovery, duplicate address detection).
 */
static __always_inline int wl6_source_ok(struct __sk_buff *skb)
{
	struct tby_wl6_key key = {};
	struct tby_wl6_val *wl;
	__u32 w[4];

	if (bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct ipv6hdr, saddr), key.addr, 16))
		return 0;
	__builtin_memcpy(w, key.addr, 16);
	if ((key.addr[0] == 0xfe && (key.addr[1] & 0xc0) == 0x80) || !(w[0] | w[1] | w[2] | w[3]))
		return 1;
	wl = bpf_map_lookup_elem(&tby_wl6, &key);
	return wl && wl->ifindex == skb->ifindex;
}

SEC("tc")
int tby_from_wl(struct __sk_buff *skb)
{
	struct nat_dst_route dst = {};
	struct exttun_dst tun = {};
	struct parsed_pkt pkt = {};
	int translated = 0;

	switch (parse_packet(skb, &pkt)) {
	case PARSE_IPV4:
		break;
	case PARSE_IPV6: /* egress policy, replies of IPv6 NodePort flows (nat6.h) */
		if (!wl6_source_ok(skb)) {
			counter_inc(TBY_R_DROP_SPOOF);
			return TC_ACT_SHOT;
		}
		/* before nat6 rewrites a NodePort reply: the tuple the ingress saw */
		if (pol6_egress(skb) == POL_DROP)
			return TC_ACT_SHOT;
		if (nat6_from_workload(skb) == NAT6_DROP)
			return TC_ACT_SHOT;
		counter_inc(TBY_R_PASS_NON_IP);
		return TC_ACT_OK;
	case PARSE_ARP:
		counter_inc(TBY_R_PASS_NON_IP);
		return TC_ACT_OK;
	case PARSE_OTHER:
		counter_inc(TBY_R_DROP_ETHERTYPE);
		return TC_ACT_SHOT;
	default:
		counter_inc(TBY_R_DROP_MALFORMED);
		return TC_ACT_SHOT;
	}

	if (!wl_source_ok(skb, pkt.saddr)) {
		counter_inc(TBY_R_DROP_SPOOF);
		return TC_ACT_SHOT;
	}
	switch (nat_handle_dst(skb, &pkt, NAT_HOOK_FRONTENDS | NAT_HOOK_HAIRPIN | NAT_HOOK_PORT_CLASH,
			       &tun, &dst)) {
	case NAT_REJECT:
		return icmp_reject(skb, &pkt);
	case NAT_TOO_BIG:
		return icmp_too_big(skb, &pkt, exttun_room());
	case NAT_TUNNEL:
		/* a backend's reply to a flow forwarded to us (Tunnel mode) */
		return exttun_send(skb, &tun, pkt.ip_proto, TBY_R_EXT_REPLY_TUN);
	case NAT_EXT_DSR:
		/* the same in DSR mode: a reply, admitted with its flow by the
		 * pod's ingress policy; its egress policy has nothing to judge */
		mark_nat_done(skb);
		counter_inc(TBY_R_PASS_WL_OUT);
		return fwd_redirect(skb, NULL);
	case NAT_DROP:
		return TC_ACT_SHOT;
	case NAT_DONE:
		translated = 1;
		break;
	default:
		break;
	}
	if (pol_egress(skb, translated, &pkt) == POL_DROP)
		return TC_ACT_SHOT;
	counter_inc(TBY_R_PASS_WL_OUT);
	return fwd_redirect(skb, &dst);
}

char LICENSE[] SEC("license") = "GPL";

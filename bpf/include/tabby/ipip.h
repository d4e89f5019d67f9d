/* SPDX-License-Identifier: GPL-2.0 */
/*
 * IP-in-IP (RFC 2003) done by the data interface's programs: this kernel has
 * no ipip module, so there is no tunl0 to hand packets to. Egress of the data
 * interface inserts the outer header for destinations whose route says
 * TBY_RT_ENCAP_IPIP; ingress strips it from packets of known nodes.
 *
 * The Ethernet header is kept: the kernel route of an IP-in-IP block points at
 * the L2 next hop of the peer node (the peer itself, or the router towards it),
 * so the MAC the kernel resolved is already right for the outer packet.
 *
 * GSO: both directions use BPF_F_ADJ_ROOM_FIXED_GSO. Growing, the kernel
 * demands it for UDP GSO, and the room is already paid for (pods get data MTU
 * - 20, the kernel's IP-in-IP routes carry the same MTU, so forwarded and
 * node-originated packets are clamped before they reach us). Shrinking, it
 * keeps gso_size as the sender segmented: without it gso_size grows by the
 * header and a re-segmented aggregate near the MTU fails tcp_gso_segment's
 * len > gso_size check (Calico's gso_size drops, projectcalico/calico#11160).
 * This kernel lacks BPF_F_ADJ_ROOM_DECAP_L3_IPV4, so a decapsulated GSO skb
 * keeps SKB_GSO_IPXIP4 in gso_type; local delivery and veths ignore it.
 */
#ifndef __TABBY_IPIP_H
#define __TABBY_IPIP_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "config.h"
#include "counters.h"
#include "fib.h"
#include "parse.h"
#include "types.h"

#define TBY_IPIP_TTL 64
#define TBY_IPIP_HLEN ((__u32)sizeof(struct iphdr))

enum ipip_result {
	IPIP_PASS, /* not ours to (de)capsulate: the packet is untouched */
	IPIP_DONE, /* header added / removed */
	IPIP_DROP, /* counted already */
};

/*
 * A destination is encapsulated if it is a remote pod block (or a remote
 * tunnel address) marked IP-in-IP whose node is not us (that would loop).
 */
static __always_inline int ipip_route_ok(const struct tby_route_val *rt)
{
	if (!(rt->flags & TBY_RT_ENCAP_IPIP))
		return 0;
	if (!(rt->flags & (TBY_RT_REMOTE_WL | TBY_RT_TUNNEL_ADDR)))
		return 0;
	if (rt->flags & (TBY_RT_LOCAL_WL | TBY_RT_LOCAL_HOST))
		return 0;
	return rt->next_hop && rt->next_hop != cfg_host_ip;
}

/*
 * Egress: wraps an IPv4 packet (parsed, at TBY_IP_OFF) routed to an IP-in-IP
 * block in an outer header from this node to the block's node. The inner
 * packet is not touched (its TTL was decremented by the forwarding kernel).
 */
static __always_inline enum ipip_result ipip_encap(struct __sk_buff *skb)
{
	struct iphdr inner, outer = {};
	struct tby_route_val *rt;
	__u32 inner_len;

	/* re-read: NAT before us may have rewritten the destination */
	if (bpf_skb_load_bytes(skb, TBY_IP_OFF, &inner, sizeof(inner)))
		return IPIP_PASS;
	rt = route_lookup(inner.daddr);
	if (!rt || !ipip_route_ok(rt))
		return IPIP_PASS;
	inner_len = bpf_ntohs(inner.tot_len);
	if (!cfg_host_ip || inner_len > 0xffff - TBY_IPIP_HLEN) {
		counter_inc(TBY_R_DROP_ENCAP_FAIL);
		return IPIP_DROP;
	}

	outer.version = 4;
	outer.ihl = TBY_IPIP_HLEN / 4;
	outer.tos = inner.tos; /* DSCP and ECN as the inner (RFC 6040 normal mode) */
	outer.tot_len = bpf_htons(inner_len + TBY_IPIP_HLEN);
	/* With DF the ID means nothing (RFC 6864); without it the inner's is
	 * as unique per (src, dst) as ours would need to be. GSO gives each
	 * outer segment its own ID. */
	outer.id = inner.id;
	outer.frag_off = inner.frag_off & bpf_htons(TBY_IP_DF);
	outer.ttl = TBY_IPIP_TTL;
	outer.protocol = IPPROTO_IPIP;
	outer.saddr = cfg_host_ip;
	outer.daddr = rt->next_hop;
	outer.check = parse_ip_hdr_csum(&outer);

	if (bpf_skb_adjust_room(skb, TBY_IPIP_HLEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
					BPF_F_ADJ_ROOM_FIXED_GSO) ||
	    bpf_skb_store_bytes(skb, TBY_IP_OFF, &outer, sizeof(outer), 0)) {
		counter_inc(TBY_R_DROP_ENCAP_FAIL);
		return IPIP_DROP;
	}
	counter_inc(TBY_R_ENCAP_IPIP);
	return IPIP_DONE;
}

/*
 * Ingress: pkt is an IP-in-IP packet addressed to this node. Only a known
 * node may send it (anything else could inject packets with any inner
 * source); the outer header goes, and the caller parses the inner packet.
 */
static __always_inline enum ipip_result ipip_decap(struct __sk_buff *skb,
						   const struct parsed_pkt *pkt)
{
	struct tby_route_val *rt = route_lookup(pkt->saddr);
	__u32 hl = pkt->l4_off - TBY_IP_OFF;

	if (!rt || !(rt->flags & TBY_RT_REMOTE_HOST)) {
		counter_inc(TBY_R_DROP_IPIP_SRC);
		return IPIP_DROP;
	}
	/* nodes send DF-sized packets; no IP-in-IP handler would reassemble */
	if (pkt->is_frag || pkt->more_frags) {
		counter_inc(TBY_R_DROP_IPIP_FRAG);
		return IPIP_DROP;
	}
	if (pkt->ip_end - pkt->l4_off < sizeof(struct iphdr) || hl > 60) {
		counter_inc(TBY_R_DROP_MALFORMED);
		return IPIP_DROP;
	}
	if (bpf_skb_adjust_room(skb, -(__s32)hl, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO)) {
		counter_inc(TBY_R_DROP_MALFORMED);
		return IPIP_DROP;
	}
	counter_inc(TBY_R_DECAP_IPIP);
	return IPIP_DONE;
}

#endif /* __TABBY_IPIP_H */

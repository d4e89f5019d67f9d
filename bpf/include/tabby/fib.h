/* SPDX-License-Identifier: GPL-2.0 */
#ifndef __TABBY_FIB_H
#define __TABBY_FIB_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "counters.h"
#include "maps.h"

#ifndef AF_INET
#define AF_INET 2
#endif

/* Longest-prefix match of an IPv4 address in tby_routes; NULL if none. */
static __always_inline struct tby_route_val *route_lookup(__be32 addr)
{
	struct tby_route_key key = {
		.prefixlen = 32,
		.addr = addr,
	};

	return bpf_map_lookup_elem(&tby_routes, &key);
}

/*
 * Sends a packet this node originates (saddr -> daddr, its Ethernet header in
 * place) out of ifindex: the FIB's next hop and its neighbour's MAC straight
 * from bpf_fib_lookup, then bpf_redirect to the device's egress. Without a
 * resolved neighbour (or any other answer) bpf_redirect_neigh does the route
 * and neighbour work itself, as it always could: the next packets take the
 * short way once the stack has resolved it. The TC verdict.
 */
static __always_inline int fib_send_out(struct __sk_buff *skb, __be32 saddr, __be32 daddr,
					__u32 ifindex)
{
	struct bpf_fib_lookup fib = {
		.family = AF_INET,
		.ipv4_src = saddr,
		.ipv4_dst = daddr,
		.ifindex = ifindex,
	};

	if (bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT) !=
		    BPF_FIB_LKUP_RET_SUCCESS ||
	    bpf_skb_store_bytes(skb, 0, fib.dmac, ETH_ALEN, 0) ||
	    bpf_skb_store_bytes(skb, ETH_ALEN, fib.smac, ETH_ALEN, 0)) {
		counter_inc(TBY_R_FWD_FIB_MISS);
		return bpf_redirect_neigh(ifindex, NULL, 0, 0);
	}
	counter_inc(TBY_R_FWD_REDIRECT);
	return bpf_redirect(fib.ifindex, 0);
}

#endif /* __TABBY_FIB_H */

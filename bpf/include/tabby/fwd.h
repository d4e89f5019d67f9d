/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Forwarding in BPF, for packets tabby has handled whole on this node: they
 * go to their device without the node's IP stack (ip_rcv, netfilter, the
 * route lookup, ip_forward, neighbour output), as Calico's FIB fast path
 * does. The TTL goes down by one, as the router the node is. Whatever the
 * fast path cannot take (a TTL about to expire, a route through another
 * device, no neighbour entry yet, too big for the device) gets TC_ACT_OK:
 * the stack handles it as it always did (ICMP errors, ARP, other routes).
 */
#ifndef __TABBY_FWD_H
#define __TABBY_FWD_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/stddef.h>
#include <bpf/bpf_helpers.h>

#include "config.h"
#include "counters.h"
#include "parse.h"

#define TBY_AF_INET 2

/* The TTL down by one, checksum fixed; -1 (untouched) if it would reach 0. */
static __always_inline int fwd_ttl_dec(struct __sk_buff *skb)
{
	__u32 off = TBY_IP_OFF + offsetof(struct iphdr, ttl);
	__u8 w[2], n[2]; /* TTL and protocol: one 16-bit word of the checksum */

	if (bpf_skb_load_bytes(skb, off, w, sizeof(w)) || w[0] <= 1)
		return -1;
	n[0] = w[0] - 1;
	n[1] = w[1];
	if (bpf_l3_csum_replace(skb, TBY_IP_OFF + offsetof(struct iphdr, check),
				*(__u16 *)w, *(__u16 *)n, sizeof(__u16)) ||
	    bpf_skb_store_bytes(skb, off, n, 1, 0))
		return -1;
	return 0;
}

/* To a local pod through its host-side veth (ifindex: its TBY_RT_LOCAL_WL
 * route's); the kernel's neighbour entry gives the MAC addresses. */
static __always_inline int fwd_to_workload(struct __sk_buff *skb, __u32 ifindex)
{
	if (!ifindex || fwd_ttl_dec(skb))
		return TC_ACT_OK;
	counter_inc(TBY_R_FWD_BPF);
	return bpf_redirect_neigh(ifindex, NULL, 0, 0);
}

/* Out of the data interface, if the node's routes send it there and its
 * next hop's MAC is known. */
static __always_inline int fwd_to_data(struct __sk_buff *skb, const struct parsed_pkt *pkt)
{
	struct bpf_fib_lookup p = {
		.family = TBY_AF_INET,
		.l4_protocol = pkt->ip_proto,
		.ipv4_src = pkt->saddr,
		.ipv4_dst = pkt->daddr,
		.ifindex = skb->ifindex,
	};

	/* tot_len 0: the kernel checks the skb itself against the MTU (GSO too) */
	if (!cfg_data_ifindex ||
	    bpf_fib_lookup(skb, &p, sizeof(p), 0) != BPF_FIB_LKUP_RET_SUCCESS ||
	    p.ifindex != cfg_data_ifindex)
		return TC_ACT_OK;
	/* the stack would rewrite the MAC addresses too: harmless if it takes over */
	if (bpf_skb_store_bytes(skb, 0, p.dmac, ETH_ALEN, 0) ||
	    bpf_skb_store_bytes(skb, ETH_ALEN, p.smac, ETH_ALEN, 0) || fwd_ttl_dec(skb))
		return TC_ACT_OK;
	counter_inc(TBY_R_FWD_BPF);
	return bpf_redirect(p.ifindex, 0);
}

#endif /* __TABBY_FWD_H */

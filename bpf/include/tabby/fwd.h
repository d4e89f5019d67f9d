/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The fast path (FelixConfiguration bpfRedirectToPeer, .rodata cfg_redirect):
 * once a program has done its work on a packet the node would only forward,
 * send it straight to the device the kernel's FIB names, with the MACs of its
 * neighbour table and the TTL a router would leave, skipping the node's IP
 * stack (ip_rcv, netfilter, ip_forward, neighbour output). A pod of this
 * node gets it in its own netns (bpf_redirect_peer), to-workload's work done
 * on the way (fwd_deliver), with the MACs and MTU the agent wrote in
 * tby_wl_devs instead of the FIB's when it has them; anything else goes to
 * the device's egress, so its own tc program still runs: the tunnel (VXLAN
 * key), to-host (natOutgoing, IP-in-IP). Whatever the stack would do
 * differently goes to the stack (TC_ACT_OK), never dropped: fragments, IP
 * options, TTL <= 1, anything but TCP and UDP (ICMP errors included), a
 * packet over a local pod's MTU, and every FIB answer but success (no
 * route, a local address, too big for the route's MTU, neighbour not
 * resolved yet: the stack resolves it and the next packets take the fast
 * path).
 */
#ifndef __TABBY_FWD_H
#define __TABBY_FWD_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "config.h"
#include "counters.h"
#include "fib.h"
#include "ipip.h"
#include "nat.h"
#include "policy.h"
#include "parse.h"

/*
 * The length of the largest IP packet this skb will be on the wire: a GSO
 * aggregate (a pod's TSO segment, up to 64 KB) is cut into gso_size payloads
 * behind its headers; anything else is its own tot_len. 0: cannot tell.
 */
static __always_inline __u16 fwd_seg_len(struct __sk_buff *skb, const struct iphdr *ip,
					 void *data_end)
{
	const struct tcphdr *tcp = (const void *)(ip + 1);

	if (!skb->gso_size)
		return bpf_ntohs(ip->tot_len);
	if (ip->protocol == IPPROTO_UDP)
		return sizeof(*ip) + sizeof(struct udphdr) + skb->gso_size;
	if ((void *)(tcp + 1) > data_end)
		return 0;
	return sizeof(*ip) + tcp->doff * 4 + skb->gso_size;
}

/*
 * A local pod's packet goes into the pod's netns (bpf_redirect_peer): its
 * host veth's egress, and so tby_to_wl, is skipped, so its work is done here:
 * the ingress policy on the tuple as it arrives. to-workload's conntrack step
 * (replies of flows NATed elsewhere) is not repeated: every caller ran
 * nat_handle() on this very packet just before, with at least its hooks, and
 * what it left is either untranslated (the same lookups would miss again) or
 * translated (the new tuple is its pair's own, which passes): the two hash
 * lookups could only confirm it.
 */
static __always_inline int fwd_deliver(struct __sk_buff *skb, __u32 ifindex)
{
	struct parsed_pkt pkt = {};

	if (parse_packet(skb, &pkt) != PARSE_IPV4) {
		counter_inc(TBY_R_DROP_MALFORMED);
		return TC_ACT_SHOT;
	}
	if (pol_ingress(skb, &pkt) == POL_DROP)
		return TC_ACT_SHOT;
	counter_inc(TBY_R_PASS_WL_IN);
	counter_inc(TBY_R_FWD_PEER);
	return bpf_redirect_peer(ifindex, 0);
}

/*
 * The frame's MACs and the TTL a router would leave (the checksum by
 * difference, as ip_forward does). Pointers loaded again: a helper before
 * may have moved the data. 0, or -1 if the header cannot be read.
 */
static __always_inline int fwd_rewrite_l2(struct __sk_buff *skb, const __u8 *dmac,
					  const __u8 *smac)
{
	void *data, *data_end;
	struct ethhdr *eth;
	struct iphdr *ip;
	__u8 ttl;

	parse_bounds(skb, &data, &data_end);
	eth = data;
	ip = data + TBY_IP_OFF;
	if ((void *)(ip + 1) > data_end)
		return -1;
	__builtin_memcpy(eth->h_dest, dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, smac, ETH_ALEN);
	ttl = ip->ttl;
	ip->ttl = ttl - 1;
	bpf_l3_csum_replace(skb, TBY_IP_OFF + offsetof(struct iphdr, check),
			    bpf_htons((__u16)ttl << 8), bpf_htons((__u16)(ttl - 1) << 8), 2);
	return 0;
}

/*
 * Redirects an IPv4 packet (headers as parse_packet left them, after any NAT)
 * to its next hop's device, or returns TC_ACT_OK for the stack. ``rt``: the
 * destination's tby_routes entry, if any: a local pod's packet goes into its
 * netns (fwd_deliver); IP-in-IP's outer header (added by the egress program)
 * must fit under the device's MTU.
 *
 * A local pod known to tby_wl_devs is reached without the FIB, as Cilium's
 * endpoint map does: its route is the CNI's /32 on that veth, and the agent
 * wrote the MACs and MTU the FIB and the neighbour table would give (the
 * lookup was about a quarter of from-workload's time). A packet over the
 * pod's MTU goes to the stack, which answers as ip_forward does.
 */
static __always_inline int fwd_send(struct __sk_buff *skb, const struct tby_route_val *rt)
{
	__u32 room = rt && ipip_route_ok(rt) ? TBY_IPIP_HLEN : 0;
	__u32 pod_if = rt && (rt->flags & TBY_RT_LOCAL_WL) ? rt->ifindex : 0;
	struct bpf_fib_lookup fib = {};
	struct tby_wl_dev_val *wl;
	struct iphdr *ip;
	void *data, *data_end;
	__u32 len;

	/* the IP header and a TCP one (a GSO segment's length needs it) */
	if (parse_pull(skb, TBY_IP_OFF + sizeof(*ip) + sizeof(struct tcphdr)) &&
	    parse_pull(skb, TBY_IP_OFF + sizeof(*ip)))
		goto stack;
	parse_bounds(skb, &data, &data_end);
	ip = data + TBY_IP_OFF;
	if ((void *)(ip + 1) > data_end)
		goto stack;
	if (ip->ihl != 5 || (ip->frag_off & bpf_htons(TBY_IP_MF | TBY_IP_OFFSET)) ||
	    ip->ttl <= 1 || (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP))
		goto stack;
	/* checked against the egress device's MTU (FRAG_NEEDED if too big).
	 * Not the route's: bpf_fib_lookup honours a route MTU only when locked,
	 * where ip_forward always does; so IP-in-IP's room (its routes carry
	 * data MTU - 20) is added here, and VXLAN's device has its own MTU. */
	len = fwd_seg_len(skb, ip, data_end);
	if (!len || len + room > 0xffff)
		goto stack;
	if (pod_if) {
		wl = bpf_map_lookup_elem(&tby_wl_devs, &pod_if);
		if (wl) {
			if (len > wl->mtu || fwd_rewrite_l2(skb, wl->mac, wl->host_mac))
				goto stack;
			return fwd_deliver(skb, pod_if);
		}
	}
	fib.family = AF_INET;
	fib.tos = ip->tos;
	fib.l4_protocol = ip->protocol;
	fib.tot_len = len + room;
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	fib.ifindex = skb->ifindex;
	if (bpf_fib_lookup(skb, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS) {
		counter_inc(TBY_R_FWD_FIB_MISS);
		return TC_ACT_OK;
	}
	if (fwd_rewrite_l2(skb, fib.dmac, fib.smac))
		goto stack;
	if (pod_if && pod_if == fib.ifindex)
		return fwd_deliver(skb, pod_if);
	counter_inc(TBY_R_FWD_REDIRECT);
	return bpf_redirect(fib.ifindex, 0);
stack:
	counter_inc(TBY_R_FWD_STACK);
	return TC_ACT_OK;
}

/*
 * The route of the packet's destination, as NAT left it; NULL if none. dst:
 * the route nat_handle_dst() met (NULL: none), used without a second lookup
 * if NAT left that destination in place.
 */
static __always_inline struct tby_route_val *fwd_dst_route(struct __sk_buff *skb,
							   const struct nat_dst_route *dst)
{
	__be32 daddr;

	if (bpf_skb_load_bytes(skb, TBY_IP_OFF + offsetof(struct iphdr, daddr), &daddr,
			       sizeof(daddr)))
		return NULL;
	if (dst && dst->known && dst->addr == daddr)
		return dst->rt;
	return route_lookup(daddr);
}

/*
 * From a pod: to anywhere the FIB routes (another pod, another node, out).
 * dst: the destination's route as nat_handle_dst() met it (NULL: none), used
 * if NAT left that destination in place.
 */
static __always_inline int fwd_redirect(struct __sk_buff *skb, const struct nat_dst_route *dst)
{
	if (!cfg_redirect)
		return TC_ACT_OK;
	return fwd_send(skb, fwd_dst_route(skb, dst));
}

/*
 * From the network (tunnel, data interface): only packets for a pod of this
 * node take the fast path; the node's own traffic and transit stay the
 * stack's without a FIB lookup. The address is read from the packet, which
 * NAT may have rewritten (dst: the route nat_handle_dst() met, NULL: none);
 * fwd_local_wl_route() takes the route of the packet's destination from a
 * caller that has it.
 */
static __always_inline int fwd_local_wl_route(struct __sk_buff *skb,
					      const struct tby_route_val *rt)
{
	if (!cfg_redirect || !rt || !(rt->flags & TBY_RT_LOCAL_WL))
		return TC_ACT_OK;
	return fwd_send(skb, rt);
}

static __always_inline int fwd_local_wl(struct __sk_buff *skb, const struct nat_dst_route *dst)
{
	if (!cfg_redirect)
		return TC_ACT_OK;
	return fwd_local_wl_route(skb, fwd_dst_route(skb, dst));
}

#endif /* __TABBY_FWD_H */

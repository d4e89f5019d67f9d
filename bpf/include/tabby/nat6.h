/* SPDX-License-Identifier: GPL-2.0 */
/*
 * IPv6 NodePorts, per packet (tc_from_host.c for what arrives on the data
 * interface, tc_from_workload.c for local backends' replies). Deliberately
 * smaller than nat.h: TCP and UDP straight after the IPv6 header (no extension
 * headers, no fragments: passed untouched), a frontend of tby_nat_fe6 marked
 * TBY_NAT_EXTERNAL on the address the packet came to, a random backend, and:
 *   local backend (the kernel routes it to a pod veth): DNAT only, the client
 *     keeps its address; the pod's reply is translated back in from-workload;
 *   remote backend (routed out of the data interface): DNAT + SNAT to the
 *     address the client reached (kube-proxy's way), the client's port kept;
 *     the reply comes back to this node and is translated back here.
 * Each flow has two tby_ct6 entries (forward, reply), each holding the full
 * tuple to write; checksums are fixed with bpf_csum_diff over the addresses
 * and bpf_l4_csum_replace(BPF_F_PSEUDO_HDR).
 */
#ifndef __TABBY_NAT6_H
#define __TABBY_NAT6_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "config.h"
#include "counters.h"
#include "maps.h"
#include "parse.h"

#define NAT6_L4_OFF (ETH_HLEN + sizeof(struct ipv6hdr))
#define NAT6_SADDR_OFF (ETH_HLEN + offsetof(struct ipv6hdr, saddr))
#define NAT6_DADDR_OFF (ETH_HLEN + offsetof(struct ipv6hdr, daddr))
#define NAT6_TCP_CSUM_OFF (NAT6_L4_OFF + offsetof(struct tcphdr, check))
#define NAT6_UDP_CSUM_OFF (NAT6_L4_OFF + offsetof(struct udphdr, check))
#define NAT6_AF_INET6 10

enum nat6_result {
	NAT6_PASS, /* not ours: let the kernel have it */
	NAT6_DONE, /* translated */
	NAT6_DROP,
};

/* The tuple of a TCP/UDP IPv6 packet into *key; -1 if it is none. Copied out
 * with bpf_skb_load_bytes: no packet pointers to keep valid across rewrites. */
static __always_inline int nat6_tuple(struct __sk_buff *skb, struct tby_ct6_key *key)
{
	struct {
		struct ipv6hdr ip6;
		__be16 ports[2];
	} h;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &h, sizeof(h)))
		return -1;
	if (h.ip6.nexthdr != IPPROTO_TCP && h.ip6.nexthdr != IPPROTO_UDP)
		return -1;
	__builtin_memcpy(key->src, &h.ip6.saddr, 16);
	__builtin_memcpy(key->dst, &h.ip6.daddr, 16);
	key->sport = h.ports[0];
	key->dport = h.ports[1];
	key->proto = h.ip6.nexthdr;
	return 0;
}

static __always_inline int nat6_same(const __u8 a[16], const __u8 b[16])
{
	__u32 x[4], y[4];

	__builtin_memcpy(x, a, 16);
	__builtin_memcpy(y, b, 16);
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

static __always_inline int nat6_addr(struct __sk_buff *skb, __u32 off, __u32 csum_off,
				     const __u8 old[16], const __u8 new[16])
{
	__s64 diff;

	if (nat6_same(old, new))
		return 0;
	diff = bpf_csum_diff((__be32 *)old, 16, (__be32 *)new, 16, 0);
	if (diff < 0 || bpf_skb_store_bytes(skb, off, new, 16, 0))
		return -1;
	return bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR) ? -1 : 0;
}

static __always_inline int nat6_port(struct __sk_buff *skb, __u32 off, __u32 csum_off,
				     __be16 old, __be16 new)
{
	if (old == new)
		return 0;
	if (bpf_l4_csum_replace(skb, csum_off, old, new, sizeof(new)))
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0) ? -1 : 0;
}

/* Rewrite the packet whose tuple is *k to *v. */
static __always_inline int nat6_rewrite(struct __sk_buff *skb, const struct tby_ct6_key *k,
					const struct tby_ct6_val *v)
{
	__u32 csum = k->proto == IPPROTO_TCP ? NAT6_TCP_CSUM_OFF : NAT6_UDP_CSUM_OFF;

	if (nat6_addr(skb, NAT6_SADDR_OFF, csum, k->src, v->src) ||
	    nat6_addr(skb, NAT6_DADDR_OFF, csum, k->dst, v->dst) ||
	    nat6_port(skb, NAT6_L4_OFF, csum, k->sport, v->sport) ||
	    nat6_port(skb, NAT6_L4_OFF + 2, csum, k->dport, v->dport))
		return -1;
	return 0;
}

/* A packet of a known flow (either direction): translated. */
static __always_inline enum nat6_result nat6_established(struct __sk_buff *skb,
							 const struct tby_ct6_key *key)
{
	struct tby_ct6_val *v = bpf_map_lookup_elem(&tby_ct6, key);

	if (!v)
		return NAT6_PASS;
	if (nat6_rewrite(skb, key, v)) {
		counter_inc(TBY_R_DROP_NAT_FAIL);
		return NAT6_DROP;
	}
	counter_inc(TBY_R_NAT6);
	return NAT6_DONE;
}

/* Does the kernel route dst out of the data interface (another node's pod)? */
static __always_inline int nat6_remote(struct __sk_buff *skb, const __u8 dst[16])
{
	struct bpf_fib_lookup fib = {};

	fib.family = NAT6_AF_INET6;
	fib.ifindex = skb->ifindex;
	__builtin_memcpy(fib.ipv6_dst, dst, 16);
	/* no usable route: treat as remote, so that replies come back through us */
	if (bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH) !=
	    BPF_FIB_LKUP_RET_SUCCESS)
		return 1;
	return fib.ifindex == cfg_data_ifindex;
}

/* A new flow to an IPv6 NodePort of this node (from the data interface). */
static __always_inline enum nat6_result nat6_new(struct __sk_buff *skb,
						 const struct tby_ct6_key *key)
{
	struct tby_nat_fe6_key fk = { .port = key->dport, .proto = key->proto };
	struct tby_nat_be_key bk = {};
	struct tby_ct6_key rkey = { .proto = key->proto };
	struct tby_ct6_val fwd = {}, rev = {};
	struct tby_nat_be6_val *be;
	struct tby_nat_fe_val *fe;

	__builtin_memcpy(fk.addr, key->dst, 16);
	fe = bpf_map_lookup_elem(&tby_nat_fe6, &fk);
	if (!fe || !(fe->flags & TBY_NAT_EXTERNAL))
		return NAT6_PASS;
	if (fe->count == 0) { /* no ICMPv6 answer yet: dropped either way */
		counter_inc(fe->flags & TBY_NAT_DROP_EMPTY ? TBY_R_DROP_NO_LOCAL : TBY_R_NAT_REJECT);
		return NAT6_DROP;
	}
	bk.id = fe->id;
	bk.ordinal = bpf_get_prandom_u32() % fe->count;
	be = bpf_map_lookup_elem(&tby_nat_be6, &bk);
	if (!be)
		return NAT6_DROP;
	/* forward: client -> node:nodePort becomes (client | node) -> backend */
	__builtin_memcpy(fwd.src, key->src, 16);
	if (nat6_remote(skb, be->addr))
		__builtin_memcpy(fwd.src, key->dst, 16); /* SNAT: replies come back here */
	__builtin_memcpy(fwd.dst, be->addr, 16);
	fwd.sport = key->sport;
	fwd.dport = be->port;
	/* reply: backend -> (client | node) becomes node:nodePort -> client */
	__builtin_memcpy(rkey.src, be->addr, 16);
	__builtin_memcpy(rkey.dst, fwd.src, 16);
	rkey.sport = be->port;
	rkey.dport = key->sport;
	__builtin_memcpy(rev.src, key->dst, 16);
	__builtin_memcpy(rev.dst, key->src, 16);
	rev.sport = key->dport;
	rev.dport = key->sport;
	if (bpf_map_update_elem(&tby_ct6, &rkey, &rev, BPF_ANY) ||
	    bpf_map_update_elem(&tby_ct6, key, &fwd, BPF_ANY)) {
		counter_inc(TBY_R_DROP_CT_FULL);
		return NAT6_DROP;
	}
	if (nat6_rewrite(skb, key, &fwd)) {
		counter_inc(TBY_R_DROP_NAT_FAIL);
		return NAT6_DROP;
	}
	counter_inc(TBY_R_NAT6_NEW);
	return NAT6_DONE;
}

/* from-host: known flows both ways, then new flows to NodePorts. */
static __always_inline enum nat6_result nat6_from_host(struct __sk_buff *skb)
{
	struct tby_ct6_key key = {};
	enum nat6_result r;

	if (nat6_tuple(skb, &key))
		return NAT6_PASS;
	r = nat6_established(skb, &key);
	if (r != NAT6_PASS)
		return r;
	return nat6_new(skb, &key);
}

/* from-workload: a local backend's replies. */
static __always_inline enum nat6_result nat6_from_workload(struct __sk_buff *skb)
{
	struct tby_ct6_key key = {};

	if (nat6_tuple(skb, &key))
		return NAT6_PASS;
	return nat6_established(skb, &key);
}

#endif /* __TABBY_NAT6_H */

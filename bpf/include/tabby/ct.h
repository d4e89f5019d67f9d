/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Conntrack for NAT flows: a flow's ports (also for non-first fragments), the
 * tby_ct keys of both directions, and the TCP flags an entry has seen.
 * Entries are created in pairs by nat.h and swept by tby_ct_gc.
 */
#ifndef __TABBY_CT_H
#define __TABBY_CT_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>

#include "maps.h"
#include "parse.h"

/* A packet's 5-tuple and, for TCP, its flags. */
struct flow {
	struct tby_ct_key key;
	__u8 tcp_flags; /* byte 13 of the TCP header */
	__u8 has_ports; /* 0: a non-first fragment whose first we never saw */
};

#define TBY_TCPF_FIN 0x01
#define TBY_TCPF_SYN 0x02
#define TBY_TCPF_RST 0x04
#define TBY_TCPF_ACK 0x10

/*
 * Fills f from the packet. Ports come from the L4 header, or for a non-first
 * fragment from what its first fragment recorded in tby_frags; a first
 * fragment records them. Only TCP and UDP are tracked: returns -1 otherwise.
 */
static __always_inline int ct_flow_of(struct __sk_buff *skb,
				      const struct parsed_pkt *pkt,
				      struct flow *f)
{
	struct tby_frag_key fk = {
		.src = pkt->saddr,
		.dst = pkt->daddr,
		.id = pkt->ip_id,
		.proto = pkt->ip_proto,
	};
	struct tby_frag_val *fv;
	__be16 ports[2];

	if (pkt->ip_proto != IPPROTO_TCP && pkt->ip_proto != IPPROTO_UDP)
		return -1;
	f->key.src = pkt->saddr;
	f->key.dst = pkt->daddr;
	f->key.proto = pkt->ip_proto;
	if (pkt->is_frag) {
		fv = bpf_map_lookup_elem(&tby_frags, &fk);
		if (!fv)
			return 0;
		f->key.sport = fv->sport;
		f->key.dport = fv->dport;
		f->has_ports = 1;
		return 0;
	}
	/* bpf_skb_load_bytes, not direct access: inlined into the bigger
	 * programs, clang compiles skb->data into a 32-bit value the verifier
	 * no longer sees as a packet pointer */
	if (bpf_skb_load_bytes(skb, pkt->l4_off, ports, sizeof(ports)))
		return -1;
	f->key.sport = ports[0];
	f->key.dport = ports[1];
	f->has_ports = 1;
	if (pkt->ip_proto == IPPROTO_TCP &&
	    bpf_skb_load_bytes(skb, pkt->l4_off + 13, &f->tcp_flags, 1))
		return -1;
	if (pkt->more_frags) {
		struct tby_frag_val v = { .sport = ports[0], .dport = ports[1] };

		bpf_map_update_elem(&tby_frags, &fk, &v, BPF_ANY);
	}
	return 0;
}

static __always_inline void ct_key_reverse(const struct tby_ct_key *k,
					   struct tby_ct_key *r)
{
	r->src = k->dst;
	r->dst = k->src;
	r->sport = k->dport;
	r->dport = k->sport;
	r->proto = k->proto;
}

/* Marks activity on an entry; reply = the packet travels server -> client. */
static __always_inline void ct_touch(struct tby_ct_val *v, const struct flow *f,
				     int reply)
{
	__u8 seen = 0;

	v->seen_ns = bpf_ktime_get_ns();
	if (f->key.proto != IPPROTO_TCP)
		return;
	if (f->tcp_flags & TBY_TCPF_SYN)
		seen |= (f->tcp_flags & TBY_TCPF_ACK) ? TBY_CT_SYNACK : TBY_CT_SYN;
	if (f->tcp_flags & TBY_TCPF_FIN)
		seen |= reply ? TBY_CT_FIN_REV : TBY_CT_FIN_FWD;
	if (f->tcp_flags & TBY_TCPF_RST)
		seen |= TBY_CT_RST;
	if ((v->tcp | seen) != v->tcp)
		v->tcp |= seen;
}

/* The REV key of a FWD half keyed fk: the tuple after DNAT (and SNAT, if any). */
static __always_inline void ct_rev_key(const struct tby_ct_key *fk,
				       const struct tby_ct_val *fwd,
				       struct tby_ct_key *rk)
{
	rk->src = fwd->nat_saddr ? fwd->nat_saddr : fk->src;
	rk->sport = fwd->nat_saddr ? fwd->nat_sport : fk->sport;
	rk->dst = fwd->nat_addr;
	rk->dport = fwd->nat_port;
	rk->proto = fk->proto;
}

/* The FWD key of a REV half keyed rk: the original client -> frontend tuple. */
static __always_inline void ct_fwd_key(const struct tby_ct_key *rk,
				       const struct tby_ct_val *rev,
				       struct tby_ct_key *fk)
{
	fk->src = rev->nat_saddr ? rev->nat_saddr : rk->src;
	fk->sport = rev->nat_saddr ? rev->nat_sport : rk->sport;
	fk->dst = rev->nat_addr;
	fk->dport = rev->nat_port;
	fk->proto = rk->proto;
}

/* Has a TCP connection ended (FIN both ways, or RST)? Both halves' flags ORed. */
static __always_inline int ct_tcp_closed(__u8 tcp)
{
	__u8 fins = TBY_CT_FIN_FWD | TBY_CT_FIN_REV;

	return (tcp & fins) == fins || (tcp & TBY_CT_RST);
}

struct ct_be_search {
	__u32 id;
	__be32 addr;
	__be16 port;
	__u8 found;
};

static long ct_be_match(__u32 ordinal, void *data)
{
	struct ct_be_search *c = data;
	struct tby_nat_be_key k = { .id = c->id, .ordinal = ordinal };
	struct tby_nat_be_val *be = bpf_map_lookup_elem(&tby_nat_be, &k);

	if (be && be->addr == c->addr && be->port == c->port) {
		c->found = 1;
		return 1; /* stop */
	}
	return 0;
}

/*
 * Is the FWD half's backend still one of its frontend's? -1: the frontend is
 * gone; 1 / 0: found or not among its first `max_scan` ordinals; 2: the set is
 * bigger than that (not checked: the caller decides).
 */
static __always_inline int ct_backend_in_set(const struct tby_ct_key *fk,
					     const struct tby_ct_val *fwd,
					     __u32 max_scan)
{
	struct tby_nat_fe_key fek = {
		.addr = fk->dst, .port = fk->dport, .proto = fk->proto
	};
	struct ct_be_search c = {};
	struct tby_nat_fe_val *fe;
	__u32 count;

	fe = bpf_map_lookup_elem(&tby_nat_fe, &fek);
	if (!fe)
		return -1;
	count = fe->count;
	if (count > max_scan)
		return 2;
	c.id = fe->id;
	c.addr = fwd->nat_addr;
	c.port = fwd->nat_port;
	bpf_loop(count, ct_be_match, &c, 0);
	return c.found;
}

#endif /* __TABBY_CT_H */

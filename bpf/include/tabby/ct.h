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
	void *data, *data_end;
	__be16 *ports;

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
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	ports = data + pkt->l4_off;
	if ((void *)(ports + 2) > data_end)
		return -1;
	f->key.sport = ports[0];
	f->key.dport = ports[1];
	f->has_ports = 1;
	if (pkt->ip_proto == IPPROTO_TCP) {
		__u8 *flags = data + pkt->l4_off + 13;

		if ((void *)(flags + 1) > data_end)
			return -1;
		f->tcp_flags = *flags;
	}
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

#endif /* __TABBY_CT_H */

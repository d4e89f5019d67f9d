/* SPDX-License-Identifier: GPL-2.0 */
/*
 * NetworkPolicy per packet (docs/design/policy.md). A local pod some policy
 * selects has a tby_pol_ep entry; others pay that one hash lookup and pass.
 * For an isolated pod, the verdict is cached on the flow's conntrack entry
 * (tby_ct_val.pol), so only a flow's first packet (and a TCP SYN, which may
 * open a new connection on an old tuple) looks at the policy maps:
 *   allowed = peer classes & (port classes | any-protocol classes) != 0
 * one LPM lookup for the peer, one for the port: O(1) in policies and pods.
 * Egress is judged in from-workload after NAT, ingress in to-workload before
 * the reverse NAT: both on the translated (pod to pod) tuple.
 */
#ifndef __TABBY_POLICY_H
#define __TABBY_POLICY_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "counters.h"
#include "ct.h"
#include "fib.h"
#include "log.h"
#include "maps.h"
#include "nat.h"

#define POL_DIR_IN 0
#define POL_DIR_OUT 1

enum pol_result {
	POL_PASS,
	POL_DROP, /* counted already */
};

/*
 * The rule classes of the endpoint's direction that admit (proto, port): those
 * with any port, plus those naming this one (a packet without ports, a
 * non-first fragment, only the former). Shared by IPv4 and IPv6 (policy6.h):
 * one port trie serves both families.
 */
static __always_inline __u64 pol_port_classes(const struct tby_pol_ep_val *ep, __u32 dir,
					      __u8 proto, __be16 port, __u8 has_ports)
{
	struct tby_pol_port_key qk = {
		.prefixlen = 64, .set = ep->set * 2 + dir, .proto = proto, .port = port
	};
	__u64 ports = dir == POL_DIR_IN ? ep->any_in : ep->any_out;
	__u64 *port_bits;

	if (has_ports) {
		port_bits = bpf_map_lookup_elem(&tby_pol_port, &qk);
		if (port_bits)
			ports |= *port_bits;
	}
	return ports;
}

/* Is (peer, proto, port) in one rule class of the endpoint's direction? */
static __always_inline int pol_allows(const struct tby_pol_ep_val *ep, __u32 dir,
				      const struct flow *f, __be32 peer)
{
	struct tby_pol_peer_key pk = { .prefixlen = 64, .set = ep->set * 2 + dir, .addr = peer };
	__u64 *peer_bits = bpf_map_lookup_elem(&tby_pol_peer, &pk);

	if (!peer_bits || !*peer_bits)
		return 0;
	return (*peer_bits &
		pol_port_classes(ep, dir, f->key.proto, f->key.dport, f->has_ports)) != 0;
}

/* A TCP SYN without ACK: a connection (re)starting on this tuple. */
static __always_inline int pol_pure_syn(const struct flow *f)
{
	return f->key.proto == IPPROTO_TCP &&
	       (f->tcp_flags & (TBY_TCPF_SYN | TBY_TCPF_ACK)) == TBY_TCPF_SYN;
}

/*
 * An ICMP error (unreachable, time exceeded, parameter problem) about a flow
 * a policy admitted on this node is related to it and passes, as in Calico:
 * a refused UDP datagram's port unreachable, PMTU's fragmentation needed.
 */
static __always_inline int pol_icmp_related(struct __sk_buff *skb,
					    const struct parsed_pkt *pkt)
{
	struct nat_icmp_quote q;
	struct tby_ct_key k = {}, rk = {};
	struct tby_ct_val *v;
	struct icmphdr icmp;

	if (pkt->ip_proto != IPPROTO_ICMP || pkt->is_frag ||
	    bpf_skb_load_bytes(skb, pkt->l4_off, &icmp, sizeof(icmp)) ||
	    !nat_icmp_is_error(icmp.type) ||
	    bpf_skb_load_bytes(skb, pkt->l4_off + sizeof(icmp), &q, sizeof(q)))
		return 0;
	if (q.ip.ihl != 5 ||
	    (q.ip.protocol != IPPROTO_TCP && q.ip.protocol != IPPROTO_UDP))
		return 0;
	k.src = q.ip.saddr;
	k.dst = q.ip.daddr;
	k.sport = q.sport;
	k.dport = q.dport;
	k.proto = q.ip.protocol;
	v = bpf_map_lookup_elem(&tby_ct, &k);
	if (v && (v->pol & (TBY_CTP_OUT | TBY_CTP_IN)))
		return 1;
	/* the quote may be the reply of the admitted flow (a router's
	 * fragmentation needed about an isolated server's answer): the flow's
	 * entry is keyed the other way */
	ct_key_reverse(&k, &rk);
	v = bpf_map_lookup_elem(&tby_ct, &rk);
	return v && (v->pol & (TBY_CTP_OUT | TBY_CTP_IN));
}

/* Traffic from this node to its pods is always admitted (kubelet probes). */
static __always_inline int pol_from_own_host(__be32 saddr)
{
	struct tby_route_val *rt;

	if (saddr == TBY_HAIRPIN_IP || (cfg_host_ip && saddr == cfg_host_ip))
		return 1;
	rt = route_lookup(saddr);
	return rt && (rt->flags & TBY_RT_LOCAL_HOST);
}

/*
 * The policy of a local pod (the source: dir OUT, the destination:
 * dir IN; ep: its tby_pol_ep entry, looked up by the caller before the flow
 * was read) for the flow f, cached on conntrack. `self` is this end's verdict
 * flag, `reply` the one that makes a packet a reply of a flow the other
 * direction admitted. The entries' activity (seen_ns, TCP flags) is kept by
 * nat_handle(), which meets them in its conntrack lookups.
 */
static __always_inline enum pol_result pol_judge(struct __sk_buff *skb,
						 const struct parsed_pkt *pkt,
						 struct flow *f, __u32 dir,
						 const struct tby_pol_ep_val *ep)
{
	__u16 self = dir == POL_DIR_OUT ? TBY_CTP_OUT : TBY_CTP_IN;
	__u16 reply = dir == POL_DIR_OUT ? TBY_CTP_IN : TBY_CTP_OUT;
	__be32 peer = dir == POL_DIR_OUT ? f->key.dst : f->key.src;
	struct tby_ct_key rk = {};
	struct tby_ct_val *v = NULL, *rv, nv = {};
	int syn = pol_pure_syn(f), ok;
	__u64 now;

	if (!f->has_ports && pol_icmp_related(skb, pkt))
		return POL_PASS;
	if (f->has_ports) {
		v = bpf_map_lookup_elem(&tby_ct, &f->key);
		if (v && (v->pol & self) && !syn)
			return POL_PASS; /* established: admitted before */
		if (!v && !syn) {
			ct_key_reverse(&f->key, &rk);
			rv = bpf_map_lookup_elem(&tby_ct, &rk);
			if (rv && (rv->pol & reply))
				return POL_PASS; /* a reply of a flow the other way admitted */
		}
	}
	ok = !(ep->flags & (dir == POL_DIR_OUT ? TBY_POL_ISO_OUT : TBY_POL_ISO_IN)) ||
	     pol_allows(ep, dir, f, peer) ||
	     (dir == POL_DIR_IN && pol_from_own_host(f->key.src));
	if (!ok) {
		if (v)
			v->pol &= ~self;
		counter_inc(dir == POL_DIR_OUT ? TBY_R_DROP_POL_OUT : TBY_R_DROP_POL_IN);
		/* dir 0 ingress, 1 egress; `tabbyctl bpf policy dump` names the
		 * policies of a set (the default deny that decided) */
		log_debug("policy drop dir=%d set=%u peer=%x", dir, ep->set, bpf_ntohl(peer));
		return POL_DROP;
	}
	if (!f->has_ports)
		return POL_PASS; /* not tracked: judged again on the next packet */
	if (v) {
		v->pol |= self;
		/* a service flow: its FWD half (client -> frontend) too, since the
		 * reply reaches the client reverse-translated (frontend -> client) */
		if (v->type == TBY_CT_NAT_REV && dir == POL_DIR_OUT) {
			ct_fwd_key(&f->key, v, &rk);
			rv = bpf_map_lookup_elem(&tby_ct, &rk);
			if (rv && rv->type == TBY_CT_NAT_FWD)
				rv->pol |= self;
		}
	} else {
		now = bpf_ktime_get_ns();
		nv.created_ns = now;
		nv.seen_ns = now;
		nv.type = TBY_CT_PLAIN;
		nv.pol = self;
		ct_touch(&nv, f, 0);
		if (bpf_map_update_elem(&tby_ct, &f->key, &nv, BPF_NOEXIST)) {
			v = bpf_map_lookup_elem(&tby_ct, &f->key); /* another CPU's */
			if (v)
				v->pol |= self;
		}
	}
	counter_inc(TBY_R_POL_NEW);
	return POL_PASS;
}

/* The packet's flow; not TCP/UDP (or no ports): judged per packet, untracked. */
static __always_inline void pol_flow_of(struct __sk_buff *skb, const struct parsed_pkt *pkt,
					struct flow *f)
{
	if (ct_flow_of(skb, pkt, f)) {
		f->key.src = pkt->saddr;
		f->key.dst = pkt->daddr;
		f->key.proto = pkt->ip_proto;
		f->has_ports = 0;
	}
}

/*
 * from-workload, after NAT: the packet as it now is (translated) is judged by
 * its source's egress policy.
 */
static __always_inline enum pol_result pol_egress(struct __sk_buff *skb, int translated,
						  const struct parsed_pkt *pkt)
{
	struct parsed_pkt now = {};
	struct tby_pol_ep_val *ep;
	struct flow f = {};
	__be32 src = pkt->saddr;

	/* most pods have no policy: their source (SNAT may have changed it)
	 * says so before the packet is parsed again or its ports read */
	if (translated && bpf_skb_load_bytes(skb, TBY_IP_OFF + offsetof(struct iphdr, saddr),
					     &src, sizeof(src)))
		return POL_PASS;
	ep = bpf_map_lookup_elem(&tby_pol_ep, &src);
	if (!ep)
		return POL_PASS; /* selected by no policy: nothing to remember */
	if (translated) {
		if (parse_packet(skb, &now) != PARSE_IPV4)
			return POL_PASS;
		pkt = &now;
	}
	pol_flow_of(skb, pkt, &f);
	return pol_judge(skb, pkt, &f, POL_DIR_OUT, ep);
}

/* to-workload, before the reverse NAT: the destination's ingress policy. */
static __always_inline enum pol_result pol_ingress(struct __sk_buff *skb,
						   const struct parsed_pkt *pkt)
{
	struct tby_pol_ep_val *ep = bpf_map_lookup_elem(&tby_pol_ep, &pkt->daddr);
	struct flow f = {};

	if (!ep)
		return POL_PASS; /* selected by no policy: its ports need not be read */
	pol_flow_of(skb, pkt, &f);
	return pol_judge(skb, pkt, &f, POL_DIR_IN, ep);
}

#endif /* __TABBY_POLICY_H */

/* SPDX-License-Identifier: GPL-2.0 */
/*
 * NetworkPolicy over IPv6 (docs/design/policy.md), policy.h's design on IPv6
 * tuples: a local pod some policy selects has a tby_pol_ep6 entry (the same
 * policy set as its IPv4 address), its peers' IPv6 prefixes are in
 * tby_pol_peer6, ports in the shared tby_pol_port:
 *   allowed = peer classes & (port classes | any-protocol classes) != 0
 * The verdict of a TCP/UDP flow is cached in tby_pol_ct6 (an LRU keyed by the
 * tuple, as tby_ct6_key), so only a flow's first packet (and a TCP SYN) looks
 * at the policy maps; replies of a flow the other direction admitted pass.
 * IPv6 services need no translation here (ClusterIPs at connect(); NodePorts'
 * DNAT happens in from-host before to-workload), so egress is judged on the
 * packet the pod sent, before nat6_from_workload() rewrites a NodePort reply.
 * ICMPv6 neighbor discovery (133-137) always passes: the pod needs its gateway.
 * Only TCP/UDP/ICMPv6 straight after the IPv6 header are recognised; another
 * next header (extension headers, fragments) is judged as that protocol
 * without ports, per packet.
 */
#ifndef __TABBY_POLICY6_H
#define __TABBY_POLICY6_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ipv6.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "counters.h"
#include "ct.h"
#include "ct_timeouts.h"
#include "log.h"
#include "maps.h"
#include "policy.h"

#define POL6_L4_OFF (ETH_HLEN + sizeof(struct ipv6hdr))
#define POL6_ICMPV6 58
#define POL6_AF_INET6 10

struct pol6_flow {
	struct tby_ct6_key key; /* ports 0 when has_ports is 0 */
	__u8 has_ports; /* TCP or UDP: tracked in tby_pol_ct6 */
	__u8 tcp_flags; /* TBY_TCPF_* of a TCP packet */
	__u8 icmp_type; /* ICMPv6: its type */
	__u8 _pad;
};

/* The flow of an IPv6 packet; -1 if the header cannot be read. */
static __always_inline int pol6_flow_of(struct __sk_buff *skb, struct pol6_flow *f)
{
	struct ipv6hdr ip6;
	__be16 ports[2];

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)))
		return -1;
	__builtin_memcpy(f->key.src, &ip6.saddr, 16);
	__builtin_memcpy(f->key.dst, &ip6.daddr, 16);
	f->key.proto = ip6.nexthdr;
	if (ip6.nexthdr == IPPROTO_TCP || ip6.nexthdr == IPPROTO_UDP) {
		if (bpf_skb_load_bytes(skb, POL6_L4_OFF, ports, sizeof(ports)))
			return -1;
		f->key.sport = ports[0];
		f->key.dport = ports[1];
		f->has_ports = 1;
		if (ip6.nexthdr == IPPROTO_TCP &&
		    bpf_skb_load_bytes(skb, POL6_L4_OFF + 13, &f->tcp_flags, 1))
			return -1;
	} else if (ip6.nexthdr == POL6_ICMPV6) {
		if (bpf_skb_load_bytes(skb, POL6_L4_OFF, &f->icmp_type, 1))
			return -1;
	}
	return 0;
}

/* Router / neighbor solicitation and advertisement, redirect. */
static __always_inline int pol6_is_nd(const struct pol6_flow *f)
{
	return f->key.proto == POL6_ICMPV6 && f->icmp_type >= 133 && f->icmp_type <= 137;
}

/* Has the cached flow been idle past its conntrack timeout (ct_timeouts.h)? */
static __always_inline int pol6_expired(const struct tby_pol_ct6_val *v, __u8 proto, __u64 now)
{
	__u64 timeout = TBY_CT_TIMEOUT_UDP_S;

	if (proto == IPPROTO_TCP) {
		if (v->tcp & TBY_CT_RST)
			timeout = TBY_CT_TIMEOUT_TCP_RST_S;
		else if (v->tcp & TBY_CT_FIN_FWD)
			timeout = TBY_CT_TIMEOUT_TCP_FIN_S;
		else
			timeout = TBY_CT_TIMEOUT_TCP_EST_S;
	}
	return now - v->seen_ns > timeout * TBY_NS_PER_S;
}

/* A live cached flow: its activity noted (time, FIN/RST seen). */
static __always_inline struct tby_pol_ct6_val *pol6_ct_live(const struct tby_ct6_key *k,
							   const struct pol6_flow *f, __u64 now)
{
	struct tby_pol_ct6_val *v = bpf_map_lookup_elem(&tby_pol_ct6, k);

	if (!v || pol6_expired(v, k->proto, now))
		return NULL;
	v->seen_ns = now;
	if (f->tcp_flags & TBY_TCPF_FIN)
		v->tcp |= TBY_CT_FIN_FWD;
	if (f->tcp_flags & TBY_TCPF_RST)
		v->tcp |= TBY_CT_RST;
	return v;
}

static __always_inline void pol6_reverse(const struct tby_ct6_key *k, struct tby_ct6_key *r)
{
	__builtin_memcpy(r->src, k->dst, 16);
	__builtin_memcpy(r->dst, k->src, 16);
	r->sport = k->dport;
	r->dport = k->sport;
	r->proto = k->proto;
}

/* Is (peer, proto, port) in one rule class of the endpoint's direction? */
static __always_inline int pol6_allows(const struct tby_pol_ep_val *ep, __u32 dir,
				       const struct pol6_flow *f, const __u8 peer[16])
{
	struct tby_pol_peer6_key pk = { .prefixlen = 32 + 128, .set = ep->set * 2 + dir };
	__u64 *peer_bits;

	__builtin_memcpy(pk.addr, peer, 16);
	peer_bits = bpf_map_lookup_elem(&tby_pol_peer6, &pk);
	if (!peer_bits || !*peer_bits)
		return 0;
	return (*peer_bits &
		pol_port_classes(ep, dir, f->key.proto, f->key.dport, f->has_ports)) != 0;
}

/*
 * An ICMPv6 error (destination unreachable, packet too big, time exceeded,
 * parameter problem) about a flow a policy admitted on this node is related
 * to it and passes, as in Calico: PMTU discovery needs "packet too big".
 */
static __always_inline int pol6_icmp_related(struct __sk_buff *skb, const struct pol6_flow *f)
{
	struct {
		struct ipv6hdr ip6;
		__be16 ports[2];
	} q;
	struct tby_ct6_key k = {}, r = {};
	__u64 now = bpf_ktime_get_ns();
	struct tby_pol_ct6_val *v;

	if (f->key.proto != POL6_ICMPV6 || f->icmp_type < 1 || f->icmp_type > 4 ||
	    bpf_skb_load_bytes(skb, POL6_L4_OFF + 8, &q, sizeof(q)))
		return 0;
	if (q.ip6.nexthdr != IPPROTO_TCP && q.ip6.nexthdr != IPPROTO_UDP)
		return 0;
	__builtin_memcpy(k.src, &q.ip6.saddr, 16);
	__builtin_memcpy(k.dst, &q.ip6.daddr, 16);
	k.sport = q.ports[0];
	k.dport = q.ports[1];
	k.proto = q.ip6.nexthdr;
	v = bpf_map_lookup_elem(&tby_pol_ct6, &k);
	if (v && !pol6_expired(v, k.proto, now) && (v->pol & (TBY_CTP_OUT | TBY_CTP_IN)))
		return 1;
	/* the quote is a reply of the tracked flow (e.g. the pod's own reply was too big) */
	pol6_reverse(&k, &r);
	v = bpf_map_lookup_elem(&tby_pol_ct6, &r);
	return v && !pol6_expired(v, r.proto, now) && (v->pol & (TBY_CTP_OUT | TBY_CTP_IN));
}

/*
 * Traffic this node's own stack sends to its pods is always admitted (kubelet
 * probes), as on IPv4. A packet a local socket sent still carries it at the
 * veth's TC egress; forwarded packets (other pods, other nodes, NodePort
 * clients) were orphaned when they entered this netns's IPv6 stack
 * (ipv6_rcv), and leaving a pod's netns scrubs them too.
 */
static __always_inline int pol6_from_own_host(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk, *full;

	if (!sk || sk->family != POL6_AF_INET6)
		return 0;
	full = bpf_sk_fullsock(sk);
	/* request / timewait sockets belong to real connections; a full socket
	 * without a transport protocol is BPF_PROG_TEST_RUN's stand-in */
	return !full || full->protocol != 0;
}

/*
 * The policy of the local pod (the source: dir OUT, the destination: dir IN)
 * for an IPv6 packet, cached in tby_pol_ct6 as pol_judge() does in tby_ct.
 */
static __always_inline enum pol_result pol6_judge(struct __sk_buff *skb, __u32 dir)
{
	__u16 self = dir == POL_DIR_OUT ? TBY_CTP_OUT : TBY_CTP_IN;
	__u16 reply = dir == POL_DIR_OUT ? TBY_CTP_IN : TBY_CTP_OUT;
	struct tby_pol_ct6_val *v = NULL, *rv, nv = {};
	struct tby_pol_ep6_key local = {};
	struct tby_ct6_key rk = {};
	struct pol6_flow f = {};
	struct tby_pol_ep_val *ep;
	const __u8 *peer;
	int syn, ok;
	__u64 now;

	if (pol6_flow_of(skb, &f)) {
		counter_inc(TBY_R_DROP_MALFORMED);
		return POL_DROP;
	}
	__builtin_memcpy(local.addr, dir == POL_DIR_OUT ? f.key.src : f.key.dst, 16);
	peer = dir == POL_DIR_OUT ? f.key.dst : f.key.src;
	ep = bpf_map_lookup_elem(&tby_pol_ep6, &local);
	if (!ep)
		return POL_PASS; /* selected by no policy: nothing to remember */
	if (pol6_is_nd(&f)) {
		counter_inc(TBY_R_PASS_ND);
		return POL_PASS;
	}
	if (!f.has_ports && pol6_icmp_related(skb, &f))
		return POL_PASS;
	syn = f.key.proto == IPPROTO_TCP &&
	      (f.tcp_flags & (TBY_TCPF_SYN | TBY_TCPF_ACK)) == TBY_TCPF_SYN;
	now = bpf_ktime_get_ns();
	if (f.has_ports) {
		v = pol6_ct_live(&f.key, &f, now);
		if (v && (v->pol & self) && !syn)
			return POL_PASS; /* established: admitted before */
		if (!v && !syn) {
			pol6_reverse(&f.key, &rk);
			rv = pol6_ct_live(&rk, &f, now);
			if (rv && (rv->pol & reply))
				return POL_PASS; /* a reply of a flow the other way admitted */
		}
	}
	ok = !(ep->flags & (dir == POL_DIR_OUT ? TBY_POL_ISO_OUT : TBY_POL_ISO_IN)) ||
	     pol6_allows(ep, dir, &f, peer) ||
	     (dir == POL_DIR_IN && pol6_from_own_host(skb));
	if (!ok) {
		if (v)
			v->pol &= ~self;
		counter_inc(dir == POL_DIR_OUT ? TBY_R_DROP_POL6_OUT : TBY_R_DROP_POL6_IN);
		log_debug("policy6 drop dir=%d set=%u", dir, ep->set);
		return POL_DROP;
	}
	if (!f.has_ports)
		return POL_PASS; /* not tracked: judged again on the next packet */
	if (v) {
		v->pol |= self;
		if (syn)
			v->tcp = 0; /* a new connection on this tuple */
	} else {
		nv.seen_ns = now;
		nv.pol = self;
		if (bpf_map_update_elem(&tby_pol_ct6, &f.key, &nv, BPF_ANY)) {
			counter_inc(TBY_R_DROP_CT_FULL);
			return POL_DROP;
		}
	}
	counter_inc(TBY_R_POL6_NEW);
	return POL_PASS;
}

/* from-workload: the IPv6 packet a pod sent, judged by its egress policy. */
static __always_inline enum pol_result pol6_egress(struct __sk_buff *skb)
{
	return pol6_judge(skb, POL_DIR_OUT);
}

/* to-workload: the IPv6 packet a pod receives, judged by its ingress policy. */
static __always_inline enum pol_result pol6_ingress(struct __sk_buff *skb)
{
	return pol6_judge(skb, POL_DIR_IN);
}

#endif /* __TABBY_POLICY6_H */

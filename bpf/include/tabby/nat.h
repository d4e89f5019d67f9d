/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Service NAT, per packet: conntrack first (established flows and replies pay
 * one or two hash lookups), then, for a new flow to a frontend, the backend
 * choice and the creation of the NAT pair. Every tc program calls
 * nat_handle() with the hooks it may act on.
 */
#ifndef __TABBY_NAT_H
#define __TABBY_NAT_H

#include <linux/bpf.h>
#include <linux/errno.h>
#include <linux/icmp.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/stddef.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "config.h"
#include "counters.h"
#include "ct.h"
#include "exttun.h"
#include "fib.h"
#include "maglev.h"
#include "maps.h"
#include "parse.h"

/* nat_handle() hooks: what a program may do besides translating known flows. */
#define NAT_HOOK_FRONTENDS (1U << 0) /* start new flows to frontends */
#define NAT_HOOK_SNAT_REMOTE (1U << 1) /* from outside: SNAT flows to remote backends */
#define NAT_HOOK_HAIRPIN (1U << 2) /* a pod reaching itself: SNAT to the gateway */
#define NAT_HOOK_MASQ (1U << 3) /* leaving the node: natOutgoing for local pods */
#define NAT_HOOK_PORT_CLASH (1U << 4) /* from a local pod: a new flow's port clash resolved */

enum nat_result {
	NAT_PASS, /* not a service flow, or already translated */
	NAT_DONE, /* translated */
	NAT_REJECT, /* no backend: answer with ICMP port unreachable */
	NAT_DROP, /* counted already */
	NAT_TUNNEL, /* translated; the caller wraps it for *tun (exttun_send) */
	NAT_TOO_BIG, /* untouched: would not fit the ext tunnel (icmp_too_big) */
	NAT_EXT_DSR, /* a forwarded flow's reply, as the frontend: straight to the client */
};

/*
 * The route of a packet's destination as nat_handle() met it: a program that
 * also needs it afterwards (from-workload's fast path) gets it without a
 * second LPM lookup when NAT left the destination as it was.
 */
struct nat_dst_route {
	struct tby_route_val *rt; /* NULL: no route */
	__be32 addr; /* the address rt is the route of */
	__u8 known; /* rt was looked up */
};

/* The pods' gateway (calc/names.py POD_GATEWAY): hairpin flows come from it. */
#define TBY_HAIRPIN_IP bpf_htonl(0xa9fe0101) /* 169.254.1.1 */
#define TBY_SNAT_PORT_MIN 32768
#define TBY_SNAT_PORT_SPAN 28232 /* 32768..60999, Linux's ephemeral range */
#define TBY_SNAT_TRIES 4
#define TBY_NS_PER_S 1000000000ULL

static __always_inline __u16 icmp_fold_csum(__s64 sum)
{
	__u32 csum = (__u32)sum;

	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return (__u16)~csum;
}

/*
 * Rewrites one address (and port) of the packet with checksums. l4 = 0 for a
 * non-first fragment: no L4 header to touch.
 */
static __always_inline int nat_rewrite(struct __sk_buff *skb,
				       const struct parsed_pkt *pkt, int is_dst,
				       __be32 from, __be32 to, __be16 pfrom,
				       __be16 pto)
{
	__u32 addr_off = TBY_IP_OFF + (is_dst ? offsetof(struct iphdr, daddr) :
						offsetof(struct iphdr, saddr));
	__u32 csum_off = pkt->l4_off + (pkt->ip_proto == IPPROTO_TCP ? 16 : 6);
	__u64 mangled = pkt->ip_proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	int l4 = !pkt->is_frag;

	if (l4 && from != to &&
	    bpf_l4_csum_replace(skb, csum_off, from, to,
				BPF_F_PSEUDO_HDR | mangled | sizeof(to)))
		return -1;
	if (l4 && pfrom != pto) {
		if (bpf_l4_csum_replace(skb, csum_off, pfrom, pto,
					mangled | sizeof(pto)))
			return -1;
		if (bpf_skb_store_bytes(skb, pkt->l4_off + (is_dst ? 2 : 0),
					&pto, sizeof(pto), 0))
			return -1;
	}
	if (from != to) {
		if (bpf_l3_csum_replace(skb,
					TBY_IP_OFF + offsetof(struct iphdr, check),
					from, to, sizeof(to)))
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off, &to, sizeof(to), 0))
			return -1;
	}
	return 0;
}

/* The affinity entry's backend, if fresh and still at its ordinal. */
static __always_inline int nat_affinity_get(const struct tby_nat_fe_val *fe,
					    __be32 client,
					    struct tby_nat_be_val *out,
					    __u64 now)
{
	struct tby_nat_aff_key ak = { .id = fe->id, .client = client };
	struct tby_nat_be_key bk = { .id = fe->id };
	struct tby_nat_aff_val *av;
	struct tby_nat_be_val *be;

	av = bpf_map_lookup_elem(&tby_nat_aff, &ak);
	if (!av || now - av->seen_ns > fe->affinity_s * TBY_NS_PER_S)
		return -1;
	if (av->ordinal >= fe->count)
		return -1;
	bk.ordinal = av->ordinal;
	be = bpf_map_lookup_elem(&tby_nat_be, &bk);
	if (!be || be->addr != av->addr || be->port != av->port)
		return -1;
	*out = *be;
	av->seen_ns = now;
	return 0;
}

/*
 * Picks a backend of a frontend with count > 0: Maglev (the same on every
 * node, so it comes before the node-local affinity), affinity, else random.
 */
static __always_inline int nat_pick_backend(const struct tby_nat_fe_val *fe,
					    const struct tby_ct_key *k,
					    struct tby_nat_be_val *out,
					    __u64 now)
{
	struct tby_nat_be_key bk = { .id = fe->id };
	struct tby_nat_be_val *be;
	__be32 client = k->src;

	if ((fe->flags & TBY_NAT_MAGLEV) && !maglev_pick(fe, k, out))
		return 0;
	if ((fe->flags & TBY_NAT_AFFINITY) &&
	    !nat_affinity_get(fe, client, out, now))
		return 0;
	bk.ordinal = bpf_get_prandom_u32() % fe->count;
	be = bpf_map_lookup_elem(&tby_nat_be, &bk);
	if (!be)
		return -1;
	*out = *be;
	if (fe->flags & TBY_NAT_AFFINITY) {
		struct tby_nat_aff_key ak = { .id = fe->id, .client = client };
		struct tby_nat_aff_val av = {
			.seen_ns = now,
			.addr = be->addr,
			.port = be->port,
			.ordinal = bk.ordinal,
		};

		bpf_map_update_elem(&tby_nat_aff, &ak, &av, BPF_ANY);
	}
	return 0;
}

/* loadBalancerSourceRanges: is the client admitted to this backend set? */
static __always_inline int nat_source_allowed(const struct tby_nat_fe_val *fe,
					      __be32 client)
{
	struct tby_nat_src_key k = { .prefixlen = 64, .id = fe->id, .addr = client };

	if (!(fe->flags & TBY_NAT_SRC_RANGES))
		return 1;
	return bpf_map_lookup_elem(&tby_nat_src, &k) != NULL;
}

/*
 * Stores the REV half first, without overwriting another live flow's: a taken
 * translated tuple is a collision (two frontends, one client port and one
 * backend). A REV left by this very flow (its FWD was evicted) is reused, and
 * so is one of a flow that has closed (FIN both ways or RST on either half:
 * the client port was reused for another frontend); its FWD half goes too.
 */
static __always_inline int nat_claim_rev(const struct tby_ct_key *rk,
					 const struct tby_ct_val *rev)
{
	struct tby_ct_key fk = {};
	struct tby_ct_val *old, *old_fwd;
	__u8 tcp;

	if (!bpf_map_update_elem(&tby_ct, rk, rev, BPF_NOEXIST))
		return 0;
	old = bpf_map_lookup_elem(&tby_ct, rk);
	/* a policy-only entry of the same tuple (a direct flow) gives way: its
	 * verdict is judged again on the NAT pair's REV half */
	if (old && old->type == TBY_CT_PLAIN)
		return bpf_map_update_elem(&tby_ct, rk, rev, BPF_ANY);
	/* an external flow forwarded here by another ingress node (exttun.h),
	 * now arriving at this node directly (an ECMP router moved it): the
	 * same flow if it reached the same frontend, and this pair takes over */
	if (old && old->type == TBY_CT_EXT && !rev->nat_saddr &&
	    old->nat_addr == rev->nat_addr && old->nat_port == rev->nat_port) {
		counter_inc(TBY_R_EXT_MOVED);
		return bpf_map_update_elem(&tby_ct, rk, rev, BPF_ANY);
	}
	if (!old || old->type != TBY_CT_NAT_REV)
		return -1;
	if (old->nat_addr == rev->nat_addr && old->nat_port == rev->nat_port &&
	    old->nat_saddr == rev->nat_saddr && old->nat_sport == rev->nat_sport)
		return bpf_map_update_elem(&tby_ct, rk, rev, BPF_EXIST);
	if (rk->proto != IPPROTO_TCP)
		return -1;
	ct_fwd_key(rk, old, &fk); /* the old pair's FWD half */
	tcp = old->tcp;
	old_fwd = bpf_map_lookup_elem(&tby_ct, &fk);
	if (old_fwd)
		tcp |= old_fwd->tcp;
	if (!ct_tcp_closed(tcp))
		return -1;
	bpf_map_delete_elem(&tby_ct, &fk);
	return bpf_map_update_elem(&tby_ct, rk, rev, BPF_ANY);
}

/* A source port from Linux's ephemeral range, at random. */
static __always_inline __be16 nat_random_port(void)
{
	return bpf_htons(TBY_SNAT_PORT_MIN + bpf_get_prandom_u32() % TBY_SNAT_PORT_SPAN);
}

/*
 * Creates the NAT pair of a new flow; fills fwd for the caller's rewrite.
 * With snat, sport is the first source port tried (the client's own, or
 * another when it clashes); others are picked at random if it is taken.
 */
static __always_inline int nat_create_pair(const struct flow *f,
					   const struct tby_nat_be_val *be,
					   __be32 snat, __be16 sport,
					   struct tby_ct_val *fwd, __u64 now)
{
	struct tby_ct_key rk = {
		.dst = be->addr,
		.dport = be->port,
		.proto = f->key.proto,
	};
	struct tby_ct_val rev = {
		.created_ns = now,
		.seen_ns = now,
		.type = TBY_CT_NAT_REV,
		.nat_addr = f->key.dst,
		.nat_port = f->key.dport,
	};
	int i;

	fwd->created_ns = now;
	fwd->seen_ns = now;
	fwd->type = TBY_CT_NAT_FWD;
	fwd->nat_addr = be->addr;
	fwd->nat_port = be->port;
	if (snat) {
		rev.nat_saddr = f->key.src;
		rev.nat_sport = f->key.sport;
	}
	rk.src = snat ? snat : f->key.src;
	for (i = 0; i < TBY_SNAT_TRIES; i++) {
		rk.sport = sport;
		if (!nat_claim_rev(&rk, &rev))
			break;
		/* another flow holds the tuple: only SNAT can pick another port */
		if (!snat)
			return -1;
		sport = nat_random_port();
	}
	if (i == TBY_SNAT_TRIES)
		return -1;
	if (snat) {
		fwd->nat_saddr = snat;
		fwd->nat_sport = sport;
	}
	ct_touch(fwd, f, 0);
	if (bpf_map_update_elem(&tby_ct, &f->key, fwd, BPF_ANY)) {
		bpf_map_delete_elem(&tby_ct, &rk);
		return -1;
	}
	return 0;
}

/* Applies a FWD half: destination to the backend, source to the SNAT. */
static __always_inline int nat_apply_fwd(struct __sk_buff *skb,
					 const struct parsed_pkt *pkt,
					 const struct flow *f,
					 const struct tby_ct_val *v)
{
	if (nat_rewrite(skb, pkt, 1, f->key.dst, v->nat_addr, f->key.dport,
			v->nat_port))
		return -1;
	if (v->nat_saddr && nat_rewrite(skb, pkt, 0, f->key.src, v->nat_saddr,
					f->key.sport, v->nat_sport))
		return -1;
	return 0;
}

/* Applies a REV half to a reply: source back to the frontend, destination
 * back to the original client if the forward packet was SNATed. */
static __always_inline int nat_apply_rev(struct __sk_buff *skb,
					 const struct parsed_pkt *pkt,
					 const struct flow *f,
					 const struct tby_ct_val *v)
{
	if (nat_rewrite(skb, pkt, 0, f->key.src, v->nat_addr, f->key.sport,
			v->nat_port))
		return -1;
	if (v->nat_saddr && nat_rewrite(skb, pkt, 1, f->key.dst, v->nat_saddr,
					f->key.dport, v->nat_sport))
		return -1;
	return 0;
}

/*
 * The ext tunnel's part of a forward packet: checked to fit, translated, and
 * *tun filled for the caller. v is the flow's FWD half (TBY_CTF_TUNNEL).
 */
static __always_inline enum nat_result nat_tunnel_fwd(struct __sk_buff *skb,
						      const struct parsed_pkt *pkt,
						      const struct flow *f,
						      const struct tby_ct_val *v,
						      struct exttun_dst *tun)
{
	if (exttun_too_big(skb, pkt))
		return NAT_TOO_BIG;
	if (nat_apply_fwd(skb, pkt, f, v)) {
		counter_inc(TBY_R_DROP_NAT_FAIL);
		return NAT_DROP;
	}
	tun->remote = v->tun_ip;
	tun->fe_addr = f->key.dst;
	tun->fe_port = f->key.dport;
	tun->flags = (v->flags & TBY_CTF_DSR) ? TBY_EXT_F_DSR : 0;
	return NAT_TUNNEL;
}

/*
 * A backend's reply on its own node, to a flow an ingress node forwarded (v:
 * its TBY_CT_EXT entry). DSR: the frontend becomes the source and the node
 * routes it to the client itself. Tunnel: back to the ingress node, which
 * holds the flow's NAT pair.
 */
static __always_inline enum nat_result nat_ext_reply(struct __sk_buff *skb,
						     const struct parsed_pkt *pkt,
						     const struct flow *f,
						     const struct tby_ct_val *v,
						     struct exttun_dst *tun)
{
	if (v->flags & TBY_CTF_DSR) {
		if (nat_rewrite(skb, pkt, 0, f->key.src, v->nat_addr, f->key.sport,
				v->nat_port)) {
			counter_inc(TBY_R_DROP_NAT_FAIL);
			return NAT_DROP;
		}
		counter_inc(TBY_R_EXT_REPLY_DSR);
		return NAT_EXT_DSR;
	}
	if (!tun)
		return NAT_PASS;
	if (exttun_too_big(skb, pkt))
		return NAT_TOO_BIG;
	tun->remote = v->tun_ip;
	tun->fe_addr = v->nat_addr;
	tun->fe_port = v->nat_port;
	tun->flags = TBY_EXT_F_REPLY;
	return NAT_TUNNEL;
}

/*
 * Has a local pod a live socket from its port pod_port to peer:peer_port? Its
 * netns is looked at with the socket lookup helpers, by the id its route
 * carries (TBY_RT_NETNS): TCP, a connection (not a listener, nor one in
 * TIME_WAIT); UDP, a socket connected to that peer. -1: the pod's netns is
 * not known (a route written before the id was, or not a local pod).
 */
static __always_inline int nat_pod_socket(struct __sk_buff *skb, __u8 proto,
					  __be32 pod, __be16 pod_port,
					  __be32 peer, __be16 peer_port)
{
	struct tby_route_val *rt = route_lookup(pod);
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	int live;

	if (!rt || !(rt->flags & TBY_RT_NETNS))
		return -1;
	/* as a packet from the peer to the pod would find it */
	t.ipv4.saddr = peer;
	t.ipv4.sport = peer_port;
	t.ipv4.daddr = pod;
	t.ipv4.dport = pod_port;
	if (proto == IPPROTO_TCP) {
		sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), rt->netnsid, 0);
		if (!sk)
			return 0;
		live = sk->state != BPF_TCP_LISTEN && sk->state != BPF_TCP_TIME_WAIT;
	} else {
		sk = bpf_sk_lookup_udp(skb, &t, sizeof(t.ipv4), rt->netnsid, 0);
		if (!sk)
			return 0;
		live = sk->dst_ip4 == peer && sk->dst_port == peer_port;
	}
	bpf_sk_release(sk);
	return live;
}

/*
 * Is the translated tuple (the pod's address and port -> the backend) one of
 * the pod's own live sockets, a direct flow to that backend? Linux gives one
 * local port to TCP connections with different destinations (and to UDP
 * sockets with SO_REUSEADDR), so a pod may reach a Service and, directly, one
 * of its backends from the same port. That direct flow has no tby_ct entry
 * (only NAT and policy flows do), and the new pair's REV half would take its
 * replies over (the backend would see one tuple for two connections, and
 * reset the older one). nf_nat resolves such a clash with another source
 * port, and so does nat_new_flow.
 */
static __always_inline int nat_port_clash(struct __sk_buff *skb, const struct flow *f,
					  const struct tby_nat_be_val *be)
{
	return nat_pod_socket(skb, f->key.proto, f->key.src, f->key.sport, be->addr,
			      be->port) > 0;
}

/*
 * bpfExternalServiceMode Tunnel / DSR: a new flow to an external frontend
 * whose backend is a pod on another node goes there in the ext tunnel,
 * keeping the client's address, instead of being SNATed to this node.
 */
static __always_inline int nat_ext_tunnels(const struct tby_nat_fe_val *fe,
					   const struct tby_route_val *rt,
					   const struct exttun_dst *tun)
{
	return cfg_ext_mode && tun && (fe->flags & TBY_NAT_EXTERNAL) && rt &&
	       (rt->flags & TBY_RT_REMOTE_WL) && rt->next_hop &&
	       rt->next_hop != cfg_host_ip;
}

/* A new flow to a frontend (the packet's destination), if it is one. */
static __always_inline enum nat_result nat_new_flow(struct __sk_buff *skb,
						    const struct parsed_pkt *pkt,
						    const struct flow *f,
						    __u32 hooks,
						    struct exttun_dst *tun,
						    struct nat_dst_route *dst)
{
	struct tby_nat_fe_key fk = {
		.addr = f->key.dst,
		.port = f->key.dport,
		.proto = f->key.proto,
	};
	struct tby_ct_val fwd = {};
	struct tby_nat_be_val be;
	struct tby_nat_fe_val *fe;
	struct tby_route_val *rt;
	__be16 sport = f->key.sport;
	__be32 snat = 0;
	__u64 now;

	if (dst) {
		/* frontends are service and node addresses, never a pod's: a
		 * packet to a pod (most of a pod's traffic) skips the frontend
		 * map, whose buckets are mostly cold, for the route its caller
		 * needs anyway */
		dst->rt = route_lookup(f->key.dst);
		dst->addr = f->key.dst;
		dst->known = 1;
		if (dst->rt && (dst->rt->flags & (TBY_RT_LOCAL_WL | TBY_RT_REMOTE_WL)))
			return NAT_PASS;
	}
	fe = bpf_map_lookup_elem(&tby_nat_fe, &fk);
	if (!fe)
		return NAT_PASS;
	if (!nat_source_allowed(fe, f->key.src)) {
		counter_inc(TBY_R_DROP_SRC_RANGE);
		return NAT_DROP;
	}
	if (!fe->count) {
		if (fe->flags & TBY_NAT_DROP_EMPTY) {
			counter_inc(TBY_R_DROP_NO_LOCAL);
			return NAT_DROP;
		}
		return NAT_REJECT;
	}
	if (!f->has_ports) {
		counter_inc(TBY_R_DROP_FRAG);
		return NAT_DROP;
	}
	now = bpf_ktime_get_ns();
	if (nat_pick_backend(fe, &f->key, &be, now)) {
		counter_inc(TBY_R_DROP_NAT_FAIL);
		return NAT_DROP;
	}
	if ((hooks & NAT_HOOK_HAIRPIN) && be.addr == f->key.src) {
		snat = TBY_HAIRPIN_IP;
	} else if ((hooks & NAT_HOOK_PORT_CLASH) && nat_port_clash(skb, f, &be)) {
		/* the client's address, another port */
		snat = f->key.src;
		sport = nat_random_port();
		counter_inc(TBY_R_NAT_PORT_CLASH);
	} else if ((hooks & NAT_HOOK_SNAT_REMOTE) && cfg_host_ip) {
		/* a local pod or this node itself replies through a hook of ours
		 * (from-workload, to-host); anything else must answer via us */
		rt = route_lookup(be.addr);
		/* a flow that starts fragmented (a large UDP datagram) cannot
		 * fit the tunnel's header and nothing here re-fragments: it is
		 * SNATed as kube-proxy would, and the kernel forwards its
		 * fragments */
		if (nat_ext_tunnels(fe, rt, tun) && !pkt->more_frags) {
			fwd.tun_ip = rt->next_hop;
			fwd.flags = TBY_CTF_TUNNEL | (cfg_ext_mode == 2 ? TBY_CTF_DSR : 0);
		} else if (be.addr != cfg_host_ip &&
			   (!rt || !(rt->flags & (TBY_RT_LOCAL_WL | TBY_RT_LOCAL_HOST)))) {
			snat = cfg_host_ip;
		}
	}
	/* a Maglev flow picked up mid-connection (an ECMP router moved it
	 * here) is an established one: it ages by that timeout, not the SYN's */
	if ((fe->flags & TBY_NAT_MAGLEV) && f->key.proto == IPPROTO_TCP &&
	    !(f->tcp_flags & (TBY_TCPF_SYN | TBY_TCPF_RST)))
		fwd.tcp = TBY_CT_SYNACK;
	if (nat_create_pair(f, &be, snat, sport, &fwd, now)) {
		/* the documented collision: refuse the new flow cleanly */
		counter_inc(TBY_R_DROP_CT_FULL);
		return NAT_REJECT;
	}
	counter_inc(TBY_R_NAT_NEW);
	if (fwd.flags & TBY_CTF_TUNNEL)
		return nat_tunnel_fwd(skb, pkt, f, &fwd, tun);
	if (nat_apply_fwd(skb, pkt, f, &fwd)) {
		counter_inc(TBY_R_DROP_NAT_FAIL);
		return NAT_DROP;
	}
	return NAT_DONE;
}

/* The part of an ICMP error this code reads and rewrites. */
struct nat_icmp_quote {
	struct iphdr ip; /* the offending packet's header, as the error quotes it */
	__be16 sport;
	__be16 dport;
	__be32 l4_rest;
};

static __always_inline int nat_icmp_is_error(__u8 type)
{
	return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED ||
	       type == ICMP_PARAMETERPROB;
}

/*
 * An ICMP error about a translated flow (a backend's port unreachable, a
 * router's fragmentation needed) quotes the translated tuple, which is the
 * flow's REV key. The quote gets the frontend (and the original client) back,
 * and so do the outer addresses where they were the translated ones, so the
 * client's socket sees the error (and PMTU discovery works).
 */
static __always_inline enum nat_result nat_icmp_error(struct __sk_buff *skb,
						      const struct parsed_pkt *pkt)
{
	__u32 off = pkt->l4_off + sizeof(struct icmphdr);
	struct nat_icmp_quote old, new;
	struct tby_ct_key k = {};
	struct tby_ct_val *v;
	struct icmphdr icmp;
	__s64 diff;

	if (pkt->is_frag || bpf_skb_load_bytes(skb, pkt->l4_off, &icmp, sizeof(icmp)) ||
	    !nat_icmp_is_error(icmp.type) || bpf_skb_load_bytes(skb, off, &old, sizeof(old)))
		return NAT_PASS;
	if (old.ip.ihl != 5 ||
	    (old.ip.protocol != IPPROTO_TCP && old.ip.protocol != IPPROTO_UDP))
		return NAT_PASS;
	k.src = old.ip.saddr;
	k.dst = old.ip.daddr;
	k.sport = old.sport;
	k.dport = old.dport;
	k.proto = old.ip.protocol;
	v = bpf_map_lookup_elem(&tby_ct, &k);
	if (!v || v->type != TBY_CT_NAT_REV)
		return NAT_PASS;

	new = old;
	new.ip.daddr = v->nat_addr;
	new.dport = v->nat_port;
	if (v->nat_saddr) {
		new.ip.saddr = v->nat_saddr;
		new.sport = v->nat_sport;
	}
	new.ip.check = 0;
	new.ip.check = icmp_fold_csum(bpf_csum_diff(NULL, 0, (__be32 *)&new.ip,
						    sizeof(new.ip), 0));
	diff = bpf_csum_diff((__be32 *)&old, sizeof(old), (__be32 *)&new,
			     sizeof(new), 0);
	if (bpf_l4_csum_replace(skb, pkt->l4_off + offsetof(struct icmphdr, checksum),
				0, diff, 0) ||
	    bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0))
		goto fail;
	/* the outer header: from the backend -> from the frontend; to the SNAT
	 * address -> to the client (L3 only: ICMP has no pseudo header) */
	if (pkt->saddr == old.ip.daddr &&
	    (bpf_l3_csum_replace(skb, TBY_IP_OFF + offsetof(struct iphdr, check),
				 pkt->saddr, new.ip.daddr, sizeof(__be32)) ||
	     bpf_skb_store_bytes(skb, TBY_IP_OFF + offsetof(struct iphdr, saddr),
				 &new.ip.daddr, sizeof(__be32), 0)))
		goto fail;
	if (v->nat_saddr && pkt->daddr == old.ip.saddr &&
	    (bpf_l3_csum_replace(skb, TBY_IP_OFF + offsetof(struct iphdr, check),
				 pkt->daddr, new.ip.saddr, sizeof(__be32)) ||
	     bpf_skb_store_bytes(skb, TBY_IP_OFF + offsetof(struct iphdr, daddr),
				 &new.ip.saddr, sizeof(__be32), 0)))
		goto fail;
	counter_inc(TBY_R_NAT_ICMP_ERR);
	return NAT_DONE;
fail:
	counter_inc(TBY_R_DROP_NAT_FAIL);
	return NAT_DROP;
}

#define TBY_NAT_LIVE_SCAN 64 /* ordinals checked for a reused pair's backend */

/*
 * A SYN on a pair whose connection closed (FIN both ways, or RST, seen on
 * either half) or whose backend left the service is a new connection reusing
 * the client port: the pair is dropped and the flow starts over, as
 * nf_conntrack does. A retransmitted SYN of a live pair keeps it.
 */
static __always_inline int nat_pair_reusable(const struct flow *f,
					     const struct tby_ct_val *v)
{
	struct tby_ct_key rk = {};
	struct tby_ct_val *rev;
	__u8 tcp = v->tcp;

	if (f->key.proto != IPPROTO_TCP || !(f->tcp_flags & TBY_TCPF_SYN) ||
	    (f->tcp_flags & TBY_TCPF_ACK))
		return 0;
	ct_rev_key(&f->key, v, &rk);
	rev = bpf_map_lookup_elem(&tby_ct, &rk);
	if (rev)
		tcp |= rev->tcp;
	if (ct_tcp_closed(tcp))
		return 1;
	/* too big a set to check here (2): the old backend is kept */
	return ct_backend_in_set(&f->key, v, TBY_NAT_LIVE_SCAN) <= 0;
}

/*
 * A packet from a client whose own tuple is a pair's REV half is a direct
 * flow (no service) on the port of a service flow, to its backend: its
 * replies must not be translated, so the pair goes once that service flow is
 * over. Linux gives the port of a closed socket again (TCP: the next port of
 * a destination's sequence, and two sequences cross), while the pair lives on
 * (a SYN that policy dropped: 20 s; UDP: 60 s).
 * - TCP: a SYN, and the pair closed, or (from a local pod) the service flow's
 *   socket gone from the pod. Were it alive, both connections would be one
 *   tuple at the backend: nf_nat gives the direct one another port, which
 *   one tby_ct key cannot hold here, so the pair stays (a rare case).
 * - UDP has no end: a datagram a local pod sends straight to the backend from
 *   the pair's port means the port has moved on. Were both sockets open
 *   (SO_REUSEADDR), the service flow's next datagram starts a pair on
 *   another port (nat_port_clash).
 */
static __always_inline int nat_rev_taken_over(struct __sk_buff *skb,
					      const struct flow *f,
					      const struct tby_ct_val *rev,
					      __u32 hooks,
					      struct tby_ct_key *fwd_key)
{
	struct tby_ct_val *fwd;
	__u8 tcp = rev->tcp;

	ct_fwd_key(&f->key, rev, fwd_key);
	if (f->key.proto == IPPROTO_UDP)
		return !!(hooks & NAT_HOOK_PORT_CLASH);
	if (f->key.proto != IPPROTO_TCP || !(f->tcp_flags & TBY_TCPF_SYN) ||
	    (f->tcp_flags & TBY_TCPF_ACK))
		return 0;
	fwd = bpf_map_lookup_elem(&tby_ct, fwd_key);
	if (fwd)
		tcp |= fwd->tcp;
	if (ct_tcp_closed(tcp))
		return 1;
	return (hooks & NAT_HOOK_PORT_CLASH) &&
	       !nat_pod_socket(skb, IPPROTO_TCP, fwd_key->src, fwd_key->sport,
			       fwd_key->dst, fwd_key->dport);
}

static __always_inline void nat_delete_pair(const struct flow *f,
					    const struct tby_ct_val *v)
{
	struct tby_ct_key rk = {};

	ct_rev_key(&f->key, v, &rk);
	bpf_map_delete_elem(&tby_ct, &rk);
	bpf_map_delete_elem(&tby_ct, &f->key);
}

/*
 * natOutgoing (Calico's IPPool field): a local pod of such a pool reaching
 * an address outside the pools leaves with the node's address. The pair is a
 * NAT pair whose "backend" is the destination itself: FWD only SNATs, and
 * the REV half turns replies back towards the pod.
 */
static __always_inline enum nat_result nat_masquerade(struct __sk_buff *skb,
						      const struct parsed_pkt *pkt,
						      const struct flow *f)
{
	struct tby_nat_be_val same = { .addr = f->key.dst, .port = f->key.dport };
	struct tby_route_val *rt;
	struct tby_ct_val fwd = {};

	if (!cfg_host_ip || !f->has_ports || pkt->is_frag)
		return NAT_PASS;
	rt = route_lookup(f->key.src);
	if (!rt || (rt->flags & (TBY_RT_LOCAL_WL | TBY_RT_NAT_OUT)) !=
			   (TBY_RT_LOCAL_WL | TBY_RT_NAT_OUT))
		return NAT_PASS;
	/*
	 * Inside the cluster (pods, tunnel addresses, and the nodes, which
	 * route pods themselves) nothing is masqueraded: a pod's reply to a
	 * flow another node SNATed towards it must keep its address. Only a
	 * flow's first packet starts a pair (a TCP SYN; any UDP datagram).
	 */
	rt = route_lookup(f->key.dst);
	if (rt && (rt->flags & (TBY_RT_LOCAL_WL | TBY_RT_REMOTE_WL | TBY_RT_TUNNEL_ADDR |
				TBY_RT_LOCAL_HOST | TBY_RT_REMOTE_HOST)))
		return NAT_PASS;
	if (f->key.proto == IPPROTO_TCP &&
	    (f->tcp_flags & (TBY_TCPF_SYN | TBY_TCPF_ACK)) != TBY_TCPF_SYN)
		return NAT_PASS;
	if (nat_create_pair(f, &same, cfg_host_ip, f->key.sport, &fwd, bpf_ktime_get_ns())) {
		counter_inc(TBY_R_DROP_CT_FULL);
		return NAT_DROP;
	}
	if (nat_apply_fwd(skb, pkt, f, &fwd)) {
		counter_inc(TBY_R_DROP_NAT_FAIL);
		return NAT_DROP;
	}
	counter_inc(TBY_R_NAT_MASQ);
	return NAT_DONE;
}

/*
 * Conntrack, then frontends. A FWD hit translates the forward direction; a
 * REV hit on the reversed tuple translates a reply. A REV hit on the packet's
 * own tuple (or a FWD hit on the reversed one) is a packet some earlier hook
 * on this node already translated: it passes. tun: where a program that can
 * send into the ext tunnel learns where to (NAT_TUNNEL); NULL elsewhere.
 * dst: where a caller that needs the destination's route learns it, if the
 * frontend step looked it up (NULL: not wanted).
 */
static __always_inline enum nat_result nat_handle_dst(struct __sk_buff *skb,
						      const struct parsed_pkt *pkt,
						      __u32 hooks,
						      struct exttun_dst *tun,
						      struct nat_dst_route *dst)
{
	struct flow f = {};
	struct tby_ct_key rk = {}; /* padding is part of the key */
	struct tby_ct_val *v;

	if (pkt->ip_proto == IPPROTO_ICMP)
		return nat_icmp_error(skb, pkt);
	if (ct_flow_of(skb, pkt, &f))
		return NAT_PASS;
	if (f.has_ports) {
		v = bpf_map_lookup_elem(&tby_ct, &f.key);
		if (v && v->type == TBY_CT_NAT_FWD && (hooks & NAT_HOOK_FRONTENDS) &&
		    nat_pair_reusable(&f, v)) {
			nat_delete_pair(&f, v);
			v = NULL;
		}
		if (v && v->type == TBY_CT_NAT_REV && (hooks & NAT_HOOK_FRONTENDS) &&
		    nat_rev_taken_over(skb, &f, v, hooks, &rk)) {
			bpf_map_delete_elem(&tby_ct, &rk);
			bpf_map_delete_elem(&tby_ct, &f.key);
			v = NULL;
		}
		if (v) {
			ct_touch(v, &f, 0);
			if (v->type != TBY_CT_NAT_FWD)
				return NAT_PASS;
			if ((v->flags & TBY_CTF_TUNNEL) && tun) {
				/* DSR: this node never sees the SYN-ACK; the
				 * client's ACK says the flow is established */
				if ((v->flags & TBY_CTF_DSR) && !(v->tcp & TBY_CT_SYNACK) &&
				    (f.tcp_flags & (TBY_TCPF_SYN | TBY_TCPF_ACK)) == TBY_TCPF_ACK)
					v->tcp |= TBY_CT_SYNACK;
				counter_inc(TBY_R_NAT_FWD);
				return nat_tunnel_fwd(skb, pkt, &f, v, tun);
			}
			if (nat_apply_fwd(skb, pkt, &f, v)) {
				counter_inc(TBY_R_DROP_NAT_FAIL);
				return NAT_DROP;
			}
			counter_inc(pkt->is_frag ? TBY_R_NAT_FRAG : TBY_R_NAT_FWD);
			return NAT_DONE;
		}
		ct_key_reverse(&f.key, &rk);
		v = bpf_map_lookup_elem(&tby_ct, &rk);
		if (v) {
			ct_touch(v, &f, 1);
			if (v->type == TBY_CT_EXT)
				return nat_ext_reply(skb, pkt, &f, v, tun);
			if (v->type != TBY_CT_NAT_REV)
				return NAT_PASS;
			if (nat_apply_rev(skb, pkt, &f, v)) {
				counter_inc(TBY_R_DROP_NAT_FAIL);
				return NAT_DROP;
			}
			counter_inc(pkt->is_frag ? TBY_R_NAT_FRAG : TBY_R_NAT_REV);
			return NAT_DONE;
		}
	}
	if (hooks & NAT_HOOK_MASQ)
		return nat_masquerade(skb, pkt, &f);
	if (!(hooks & NAT_HOOK_FRONTENDS))
		return NAT_PASS;
	return nat_new_flow(skb, pkt, &f, hooks, tun, dst);
}

static __always_inline enum nat_result nat_handle(struct __sk_buff *skb,
						  const struct parsed_pkt *pkt,
						  __u32 hooks,
						  struct exttun_dst *tun)
{
	return nat_handle_dst(skb, pkt, hooks, tun, NULL);
}

#endif /* __TABBY_NAT_H */

/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The ext tunnel: how external traffic to a NodePort / LoadBalancer IP /
 * externalIP reaches a backend pod on another node without SNAT
 * (bpfExternalServiceMode Tunnel or DSR, as Calico's eBPF mode does it). The
 * ingress node DNATs the packet to the backend and wraps it in VXLAN on its
 * own VNI (TBY_EXT_VNI), built here in BPF on the data interface whatever the
 * pools' encapsulation, and sends it to the backend's node. That node strips
 * it in from-host and records the flow (TBY_CT_EXT, keyed client -> backend)
 * with the frontend and the ingress node, so that the backend's replies go
 * either back through the ingress node in the same tunnel (Tunnel; the
 * ingress node reverse-translates them) or straight to the client with the
 * frontend as their source (DSR).
 *
 * Wire format: outer IPv4 (DF, TTL 64, this node -> peer) | UDP (source port
 * from the flow hash, destination the VXLAN port, checksum 0) | VXLAN (I
 * flag, TBY_EXT_VNI) | struct tby_ext_hdr in place of the inner Ethernet
 * header: it carries the frontend (so the backend's node can answer as it in
 * DSR) and ends with ETH_P_IP, so capture tools still decode the inner packet
 * | the inner IPv4 packet, as translated by the ingress node.
 */
#ifndef __TABBY_EXTTUN_H
#define __TABBY_EXTTUN_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "config.h"
#include "counters.h"
#include "ct.h"
#include "fib.h"
#include "mark.h"
#include "parse.h"
#include "types.h"

#define TBY_EXT_VNI 0x7ab1e /* the ext tunnel's VNI; pod VXLAN uses cfg_vni */
#define TBY_VXLAN_I_FLAG 0x08000000

/* tby_ext_hdr.flags */
#define TBY_EXT_F_DSR (1U << 0) /* the backend's node answers the client itself */
#define TBY_EXT_F_REPLY (1U << 1) /* a backend's reply, back to the ingress node */

/* In place of the inner Ethernet header of an ext tunnel packet. */
struct tby_ext_hdr {
	__be32 fe_addr; /* the frontend the client reached */
	__be16 fe_port;
	__u8 flags; /* TBY_EXT_F_* */
	__u8 _pad[5];
	__be16 proto; /* ETH_P_IP */
} __attribute__((packed));

struct exttun_hdrs {
	struct iphdr ip;
	struct udphdr udp;
	__be32 vx_flags;
	__be32 vx_vni; /* VNI << 8 */
	struct tby_ext_hdr ext;
} __attribute__((packed));

#define TBY_EXT_HLEN ((__u32)sizeof(struct exttun_hdrs)) /* 50, as VXLAN's */

/* Where the ingress node sends a forwarded flow, and what it tells the peer. */
struct exttun_dst {
	__be32 remote; /* the peer node */
	__be32 fe_addr;
	__be16 fe_port;
	__u8 flags; /* TBY_EXT_F_* */
};

enum exttun_result {
	EXTTUN_PASS, /* not ext tunnel traffic: untouched */
	EXTTUN_DONE, /* header removed; the inner packet is at TBY_IP_OFF */
	EXTTUN_DROP, /* counted already */
	EXTTUN_POD_VXLAN, /* the pod network's VXLAN (cfg_vni): the VXLAN device's */
};

/*
 * Would the packet overflow the data interface once wrapped? A GSO aggregate
 * of TCP never does: the encapsulation lowers its gso_size by the header.
 */
static __always_inline int exttun_too_big(struct __sk_buff *skb,
					  const struct parsed_pkt *pkt)
{
	if (skb->gso_size && pkt->ip_proto == IPPROTO_TCP)
		return 0;
	return pkt->ip_end - TBY_IP_OFF + TBY_EXT_HLEN > cfg_data_mtu;
}

/* The MTU an inner packet may have on the ext tunnel. */
static __always_inline __u16 exttun_room(void)
{
	return cfg_data_mtu > TBY_EXT_HLEN ? cfg_data_mtu - TBY_EXT_HLEN : 0;
}

/*
 * Wraps the (translated) IPv4 packet for dst->remote. The Ethernet header is
 * left as it is: the caller sends the packet with fib_send_out(), which
 * routes the outer destination and fills in the MAC addresses. 0 on success.
 */
static __always_inline int exttun_encap(struct __sk_buff *skb, const struct exttun_dst *dst,
					__u8 inner_proto)
{
	__u32 inner_len = skb->len - TBY_IP_OFF;
	__u64 flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
		      BPF_F_ADJ_ROOM_ENCAP_L2_ETH | BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN);
	struct exttun_hdrs h = {};
	struct iphdr ip = {};

	/* UDP GSO segments are datagrams: their size must not change */
	if (inner_proto == IPPROTO_UDP)
		flags |= BPF_F_ADJ_ROOM_FIXED_GSO;
	ip.version = 4;
	ip.ihl = 5;
	ip.ttl = 64;
	ip.protocol = IPPROTO_UDP;
	ip.frag_off = bpf_htons(TBY_IP_DF);
	ip.tot_len = bpf_htons(inner_len + TBY_EXT_HLEN);
	ip.saddr = cfg_host_ip;
	ip.daddr = dst->remote;
	ip.check = parse_ip_hdr_csum(&ip);
	h.ip = ip;
	/* flow entropy for ECMP on the way, as the kernel's VXLAN does */
	h.udp.source = bpf_htons(49152 | (bpf_get_hash_recalc(skb) & 0x3fff));
	h.udp.dest = bpf_htons(cfg_vxlan_port);
	h.udp.len = bpf_htons(inner_len + TBY_EXT_HLEN - sizeof(struct iphdr));
	h.vx_flags = bpf_htonl(TBY_VXLAN_I_FLAG);
	h.vx_vni = bpf_htonl(TBY_EXT_VNI << 8);
	h.ext.fe_addr = dst->fe_addr;
	h.ext.fe_port = dst->fe_port;
	h.ext.flags = dst->flags;
	h.ext.proto = bpf_htons(ETH_P_IP);

	if (bpf_skb_adjust_room(skb, TBY_EXT_HLEN, BPF_ADJ_ROOM_MAC, flags) ||
	    bpf_skb_store_bytes(skb, TBY_IP_OFF, &h, sizeof(h), 0))
		return -1;
	return 0;
}

/* Wraps and sends out of the data interface; the TC verdict. */
static __always_inline int exttun_send(struct __sk_buff *skb, const struct exttun_dst *dst,
				       __u8 inner_proto, enum tby_reason counted)
{
	if (exttun_encap(skb, dst, inner_proto)) {
		counter_inc(TBY_R_DROP_ENCAP_FAIL);
		return TC_ACT_SHOT;
	}
	counter_inc(counted);
	mark_nat_done(skb);
	return fib_send_out(skb, cfg_host_ip, dst->remote, cfg_data_ifindex);
}

/*
 * from-host: a UDP packet to this node. Ext tunnel packets (our VXLAN port
 * and TBY_EXT_VNI) are accepted from known nodes only and unwrapped; *ext
 * gets their header. The pod network's VXLAN (our port, cfg_vni) is told
 * apart: nothing translates its outer header, and the VXLAN device's ingress
 * program judges what it carries. Everything else passes untouched.
 */
static __always_inline enum exttun_result exttun_decap(struct __sk_buff *skb,
						       const struct parsed_pkt *pkt,
						       struct tby_ext_hdr *ext)
{
	struct {
		struct udphdr udp;
		__be32 vx_flags;
		__be32 vx_vni;
		struct tby_ext_hdr ext;
	} __attribute__((packed)) h;
	struct tby_route_val *rt;
	__u32 hl = pkt->l4_off - TBY_IP_OFF;

	if (pkt->is_frag || bpf_skb_load_bytes(skb, pkt->l4_off, &h, sizeof(h)))
		return EXTTUN_PASS;
	if (h.udp.dest != bpf_htons(cfg_vxlan_port))
		return EXTTUN_PASS;
	if (h.vx_vni == bpf_htonl(cfg_vni << 8))
		return EXTTUN_POD_VXLAN;
	if (h.vx_vni != bpf_htonl(TBY_EXT_VNI << 8))
		return EXTTUN_PASS;
	rt = route_lookup(pkt->saddr);
	if (!rt || !(rt->flags & TBY_RT_REMOTE_HOST)) {
		counter_inc(TBY_R_DROP_EXT_SRC);
		return EXTTUN_DROP;
	}
	if (pkt->more_frags || h.ext.proto != bpf_htons(ETH_P_IP) || hl > 60 ||
	    bpf_skb_adjust_room(skb, -(__s32)(hl + TBY_EXT_HLEN - sizeof(struct iphdr)),
				BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO)) {
		counter_inc(TBY_R_DROP_MALFORMED);
		return EXTTUN_DROP;
	}
	*ext = h.ext;
	return EXTTUN_DONE;
}

#define TBY_EXT_COLLISION 1 /* exttun_record(): the documented collision */

/*
 * The backend's node: records (or refreshes) the forwarded flow of an
 * unwrapped packet, which must be for a local pod (rt: the route of its
 * destination; else -1, counted). A flow
 * of the same client port to the same backend through another frontend,
 * still open, is the documented collision: TBY_EXT_COLLISION, not counted,
 * the caller refuses it (the first flow keeps working).
 */
static __always_inline int exttun_record(struct __sk_buff *skb,
					 const struct parsed_pkt *pkt,
					 const struct tby_ext_hdr *ext, __be32 ingress,
					 const struct tby_route_val *rt)
{
	__u32 flags = (ext->flags & TBY_EXT_F_DSR) ? TBY_CTF_DSR : 0;
	struct tby_ct_val nv = {}, *v;
	struct flow f = {};

	if (!rt || !(rt->flags & TBY_RT_LOCAL_WL) || ct_flow_of(skb, pkt, &f) ||
	    !f.has_ports) {
		counter_inc(TBY_R_DROP_EXT_FLOW);
		return -1;
	}
	v = bpf_map_lookup_elem(&tby_ct, &f.key);
	if (v && v->type == TBY_CT_EXT && v->nat_addr == ext->fe_addr &&
	    v->nat_port == ext->fe_port) {
		/* the flow may arrive through another ingress node (ECMP) */
		if (v->tun_ip != ingress || v->flags != flags) {
			v->tun_ip = ingress;
			v->flags = flags;
			counter_inc(TBY_R_EXT_MOVED);
		}
		ct_touch(v, &f, 0);
		counter_inc(TBY_R_EXT_RX);
		return 0;
	}
	/* a flow that entered through this very node (its local NAT pair, not
	 * SNATed) and now arrives through another ingress node: the pair's REV
	 * half keeps translating the pod's replies, straight to the client */
	if (v && v->type == TBY_CT_NAT_REV && !v->nat_saddr && v->nat_addr == ext->fe_addr &&
	    v->nat_port == ext->fe_port) {
		ct_touch(v, &f, 0);
		if (!(v->flags & TBY_CTF_MOVED)) {
			v->flags |= TBY_CTF_MOVED;
			counter_inc(TBY_R_EXT_MOVED);
		}
		counter_inc(TBY_R_EXT_RX);
		return 0;
	}
	if (v && !(f.key.proto == IPPROTO_TCP && (f.tcp_flags & TBY_TCPF_SYN) &&
		   ct_tcp_closed(v->tcp)))
		return TBY_EXT_COLLISION;
	nv.created_ns = bpf_ktime_get_ns();
	nv.type = TBY_CT_EXT;
	nv.nat_addr = ext->fe_addr;
	nv.nat_port = ext->fe_port;
	nv.tun_ip = ingress;
	nv.flags = flags;
	ct_touch(&nv, &f, 0);
	if (bpf_map_update_elem(&tby_ct, &f.key, &nv, BPF_ANY)) {
		counter_inc(TBY_R_DROP_CT_FULL);
		return -1;
	}
	counter_inc(TBY_R_EXT_RX);
	return 0;
}

#endif /* __TABBY_EXTTUN_H */

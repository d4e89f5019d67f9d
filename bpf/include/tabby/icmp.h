/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Rejecting a packet the way kube-proxy's REJECT rule does for a service
 * without endpoints: the packet is turned into an ICMP port unreachable from
 * the service address to the client and sent back out of the interface it
 * came in on. TCP clients get ECONNREFUSED, UDP clients an error on the next
 * receive: never a silent black hole.
 */
#ifndef __TABBY_ICMP_H
#define __TABBY_ICMP_H

#include <linux/bpf.h>
#include <linux/icmp.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "counters.h"
#include "nat.h"
#include "parse.h"

/*
 * What the error quotes of the offending packet: its IP header (no options)
 * and the start of its L4 header. 8 bytes of it are what RFC 792 asks for;
 * TCP gets its whole 20-byte header because a locally sent TCP packet is
 * CHECKSUM_PARTIAL and the kernel refuses to cut it before its checksum
 * field. That state stays on the skb: harmless, since such a packet only
 * ever goes back into the veth it came from, where nothing recomputes it.
 */
#define TBY_ICMP_QUOTE_UDP 28
#define TBY_ICMP_QUOTE_TCP 40
#define TBY_ICMP_ROOM (sizeof(struct iphdr) + sizeof(struct icmphdr))

/*
 * Rewrites the packet in place into an ICMP destination unreachable of this
 * code (frag_mtu: the next-hop MTU of ICMP_FRAG_NEEDED); 0 on success.
 */
static __always_inline int icmp_build_unreach(struct __sk_buff *skb,
					      const __u32 quote_len, __u8 code,
					      __u16 frag_mtu)
{
	struct {
		struct icmphdr icmp;
		__u8 quote[TBY_ICMP_QUOTE_TCP];
	} body = {};
	struct iphdr ip = {};
	struct ethhdr eth;
	__u8 mac[ETH_ALEN];

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) ||
	    bpf_skb_load_bytes(skb, TBY_IP_OFF, body.quote, quote_len))
		return -1;
	/* the quote starts with the original header: addresses swap from it */
	__builtin_memcpy(&ip.daddr, body.quote + offsetof(struct iphdr, saddr), 4);
	__builtin_memcpy(&ip.saddr, body.quote + offsetof(struct iphdr, daddr), 4);
	if (bpf_skb_change_tail(skb, TBY_IP_OFF + quote_len, 0) ||
	    bpf_skb_adjust_room(skb, TBY_ICMP_ROOM, BPF_ADJ_ROOM_MAC, 0))
		return -1;

	ip.version = 4;
	ip.ihl = 5;
	ip.ttl = 64;
	ip.protocol = IPPROTO_ICMP;
	ip.tot_len = bpf_htons(sizeof(ip) + sizeof(body.icmp) + quote_len);
	ip.check = icmp_fold_csum(bpf_csum_diff(NULL, 0, (__be32 *)&ip, sizeof(ip), 0));
	body.icmp.type = ICMP_DEST_UNREACH;
	body.icmp.code = code;
	body.icmp.un.frag.mtu = bpf_htons(frag_mtu);
	body.icmp.checksum =
		icmp_fold_csum(bpf_csum_diff(NULL, 0, (__be32 *)&body,
					sizeof(body.icmp) + quote_len, 0));

	__builtin_memcpy(mac, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, mac, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) ||
	    bpf_skb_store_bytes(skb, TBY_IP_OFF, &ip, sizeof(ip), 0) ||
	    bpf_skb_store_bytes(skb, TBY_IP_OFF + sizeof(ip), &body.icmp,
				sizeof(body.icmp), 0))
		return -1;
	return 0;
}

/*
 * The packet becomes an ICMP error sent back out of the interface it arrived
 * on (towards the pod, or towards the router), from the address it was sent
 * to. Only option-less IPv4 is answered; anything else is dropped.
 */
static __always_inline int icmp_answer(struct __sk_buff *skb,
				       const struct parsed_pkt *pkt, __u8 code,
				       __u16 frag_mtu, enum tby_reason counted)
{
	__u32 quote = pkt->ip_proto == IPPROTO_TCP ? TBY_ICMP_QUOTE_TCP :
						     TBY_ICMP_QUOTE_UDP;

	if (pkt->l4_off != TBY_IP_OFF + sizeof(struct iphdr) || pkt->is_frag ||
	    (quote == TBY_ICMP_QUOTE_TCP ?
		     icmp_build_unreach(skb, TBY_ICMP_QUOTE_TCP, code, frag_mtu) :
		     icmp_build_unreach(skb, TBY_ICMP_QUOTE_UDP, code, frag_mtu))) {
		counter_inc(TBY_R_DROP_NAT_FAIL);
		return TC_ACT_SHOT;
	}
	counter_inc(counted);
	return bpf_redirect(skb->ifindex, 0);
}

#define TBY_ICMP_WHOLE_MAX 80 /* an option-less IPv4 header and the longest TCP header */

/*
 * Port unreachable quoting the whole packet, for a TCP SYN without payload
 * that the ext tunnel brought: bpf_skb_change_tail() refuses such an skb
 * (it still carries the tunnel's encapsulation state), so nothing is cut and
 * the error only grows the packet by its own headers. The quote is at most 80
 * bytes; the checksum runs over a zero-padded buffer, as zeros add nothing.
 */
static __always_inline int icmp_refuse_syn(struct __sk_buff *skb,
					   const struct parsed_pkt *pkt,
					   enum tby_reason counted)
{
	struct {
		struct icmphdr icmp;
		__u8 quote[TBY_ICMP_WHOLE_MAX];
	} body = {};
	struct iphdr ip = {};
	struct ethhdr eth;
	__u8 mac[ETH_ALEN];
	__u32 len = pkt->ip_end - TBY_IP_OFF;
	__u32 i;

	if (pkt->l4_off != TBY_IP_OFF + sizeof(struct iphdr) || pkt->is_frag ||
	    len > TBY_ICMP_WHOLE_MAX || len % 4 || bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)))
		goto fail;
	/* word by word: fixed-size loads the verifier can bound */
#pragma unroll
	for (i = 0; i < TBY_ICMP_WHOLE_MAX / 4; i++) {
		if (i * 4 >= len)
			break;
		if (bpf_skb_load_bytes(skb, TBY_IP_OFF + i * 4, body.quote + i * 4, 4))
			goto fail;
	}
	__builtin_memcpy(&ip.daddr, body.quote + offsetof(struct iphdr, saddr), 4);
	__builtin_memcpy(&ip.saddr, body.quote + offsetof(struct iphdr, daddr), 4);
	if (bpf_skb_adjust_room(skb, TBY_ICMP_ROOM, BPF_ADJ_ROOM_MAC, 0))
		goto fail;
	ip.version = 4;
	ip.ihl = 5;
	ip.ttl = 64;
	ip.protocol = IPPROTO_ICMP;
	ip.tot_len = bpf_htons(TBY_ICMP_ROOM + len);
	ip.check = icmp_fold_csum(bpf_csum_diff(NULL, 0, (__be32 *)&ip, sizeof(ip), 0));
	body.icmp.type = ICMP_DEST_UNREACH;
	body.icmp.code = ICMP_PORT_UNREACH;
	body.icmp.checksum =
		icmp_fold_csum(bpf_csum_diff(NULL, 0, (__be32 *)&body, sizeof(body), 0));
	__builtin_memcpy(mac, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, mac, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) ||
	    bpf_skb_store_bytes(skb, TBY_IP_OFF, &ip, sizeof(ip), 0) ||
	    bpf_skb_store_bytes(skb, TBY_IP_OFF + sizeof(ip), &body.icmp,
				sizeof(body.icmp), 0))
		goto fail;
	counter_inc(counted);
	return bpf_redirect(skb->ifindex, 0);
fail:
	counter_inc(TBY_R_DROP_NAT_FAIL);
	return TC_ACT_SHOT;
}

/* A service without endpoints: port unreachable, as kube-proxy's REJECT. */
static __always_inline int icmp_reject(struct __sk_buff *skb,
				       const struct parsed_pkt *pkt)
{
	return icmp_answer(skb, pkt, ICMP_PORT_UNREACH, 0, TBY_R_NAT_REJECT);
}

/*
 * A DF packet that would not fit the data interface once the ext tunnel's
 * header is added: fragmentation needed, with the MTU left for it, so the
 * sender's PMTU discovery shrinks its packets. Without DF nothing here can
 * fragment it: dropped.
 */
static __always_inline int icmp_too_big(struct __sk_buff *skb,
					const struct parsed_pkt *pkt,
					__u16 room)
{
	if (!pkt->dont_frag) {
		counter_inc(TBY_R_DROP_EXT_TOO_BIG);
		return TC_ACT_SHOT;
	}
	return icmp_answer(skb, pkt, ICMP_FRAG_NEEDED, room, TBY_R_EXT_FRAG_NEEDED);
}

#endif /* __TABBY_ICMP_H */

/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Ethernet / IPv4 parsing. Every length is checked against skb->len, never
 * only against data_end: traffic from local sockets arrives non-linear (the
 * payload sits in frags), so data_end - data is shorter than the packet. The
 * headers we read are pulled into the linear area with bpf_skb_pull_data()
 * when they are not there already.
 */
#ifndef __TABBY_PARSE_H
#define __TABBY_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define TBY_IP_OFF ETH_HLEN
#define TBY_IP_MF 0x2000
#define TBY_IP_DF 0x4000
#define TBY_IP_OFFSET 0x1fff

enum parse_result {
	PARSE_IPV4, /* pkt filled in, headers linear up to pkt->l4_off + L4 header */
	PARSE_ARP,
	PARSE_IPV6,
	PARSE_OTHER, /* another ethertype; eth_proto tells which */
	PARSE_MALFORMED,
};

struct parsed_pkt {
	__be16 eth_proto;
	__u8 ip_proto;
	__u8 is_frag; /* non-first fragment: no L4 header */
	__u8 more_frags; /* MF set: a first or middle fragment */
	__u8 dont_frag; /* DF set */
	__be16 ip_id;
	__be32 saddr;
	__be32 daddr;
	__u32 l4_off; /* from the start of the frame */
	__u32 ip_end; /* ETH_HLEN + tot_len: L2 padding may follow */
};

/* RFC 1071 over a 20-byte IPv4 header whose check field is 0 (a header we build). */
static __always_inline __u16 parse_ip_hdr_csum(const struct iphdr *iph)
{
	const __u16 *w = (const __u16 *)iph;
	__u32 sum = 0;
	int i;

#pragma unroll
	for (i = 0; i < (int)(sizeof(*iph) / 2); i++)
		sum += w[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* Makes the first len bytes linear. Fails if the packet is shorter. */
static __always_inline int parse_pull(struct __sk_buff *skb, __u32 len)
{
	/* keeps clang from sharing &skb->data_end with the caller's code as a
	 * pointer into the context, which the verifier refuses ("dereference of
	 * modified ctx ptr"): every caller reads the fields afresh */
	asm volatile("" : "+r"(skb));
	if ((void *)(long)skb->data + len <= (void *)(long)skb->data_end)
		return 0;
	if (len > skb->len)
		return -1;
	return bpf_skb_pull_data(skb, len);
}

/*
 * skb->data and skb->data_end, read afresh at each call: the same barrier as
 * parse_pull's, so clang cannot keep &skb->data_end from an earlier read.
 */
static __always_inline void parse_bounds(struct __sk_buff *skb, void **data, void **data_end)
{
	asm volatile("" : "+r"(skb));
	*data = (void *)(long)skb->data;
	*data_end = (void *)(long)skb->data_end;
}

/* Minimum L4 header a packet of this protocol must carry; 0 = not checked. */
static __always_inline __u32 parse_l4_min(__u8 proto)
{
	switch (proto) {
	case IPPROTO_TCP:
		return sizeof(struct tcphdr);
	case IPPROTO_UDP:
		return sizeof(struct udphdr);
	case IPPROTO_ICMP:
		return sizeof(struct icmphdr);
	default:
		return 0;
	}
}

/* L4 checks beyond the fixed header size: TCP doff, UDP length. */
static __always_inline int parse_l4_sane(struct __sk_buff *skb,
					 struct parsed_pkt *pkt)
{
	__u32 l4_len = pkt->ip_end - pkt->l4_off;
	void *data, *data_end;

	parse_bounds(skb, &data, &data_end);

	if (pkt->ip_proto == IPPROTO_TCP) {
		struct tcphdr *th = data + pkt->l4_off;

		if ((void *)(th + 1) > data_end)
			return -1;
		if (th->doff < 5 || th->doff * 4U > l4_len)
			return -1;
	} else if (pkt->ip_proto == IPPROTO_UDP) {
		struct udphdr *uh = data + pkt->l4_off;
		__u16 ulen;

		if ((void *)(uh + 1) > data_end)
			return -1;
		ulen = bpf_ntohs(uh->len);
		/* len 0 is legal only for IPv6 jumbograms; a first fragment
		 * carries only the start of the datagram */
		if (ulen < sizeof(*uh) || (ulen > l4_len && !pkt->more_frags))
			return -1;
	}
	return 0;
}

/*
 * Parses the Ethernet header and, for IPv4, the IP header and the presence
 * of the L4 header. Only PARSE_IPV4 fills in more than eth_proto.
 */
static __always_inline enum parse_result parse_packet(struct __sk_buff *skb,
						      struct parsed_pkt *pkt)
{
	struct ethhdr *eth;
	struct iphdr *iph;
	void *data, *data_end;
	__u32 hl, tot_len, l4_min;

	if (parse_pull(skb, ETH_HLEN))
		return PARSE_MALFORMED;
	parse_bounds(skb, &data, &data_end);
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return PARSE_MALFORMED;
	pkt->eth_proto = eth->h_proto;

	switch (eth->h_proto) {
	case bpf_htons(ETH_P_IP):
		break;
	case bpf_htons(ETH_P_ARP):
		return PARSE_ARP;
	case bpf_htons(ETH_P_IPV6):
		return PARSE_IPV6;
	default:
		return PARSE_OTHER;
	}

	if (parse_pull(skb, TBY_IP_OFF + sizeof(*iph)))
		return PARSE_MALFORMED;
	parse_bounds(skb, &data, &data_end);
	iph = data + TBY_IP_OFF;
	if ((void *)(iph + 1) > data_end)
		return PARSE_MALFORMED;
	if (iph->version != 4 || iph->ihl < 5)
		return PARSE_MALFORMED;
	hl = iph->ihl * 4;
	tot_len = bpf_ntohs(iph->tot_len);
	if (tot_len < hl || TBY_IP_OFF + tot_len > skb->len)
		return PARSE_MALFORMED;

	pkt->ip_proto = iph->protocol;
	pkt->is_frag = (iph->frag_off & bpf_htons(TBY_IP_OFFSET)) != 0;
	pkt->more_frags = (iph->frag_off & bpf_htons(TBY_IP_MF)) != 0;
	pkt->dont_frag = (iph->frag_off & bpf_htons(TBY_IP_DF)) != 0;
	pkt->ip_id = iph->id;
	pkt->saddr = iph->saddr;
	pkt->daddr = iph->daddr;
	pkt->l4_off = TBY_IP_OFF + hl;
	pkt->ip_end = TBY_IP_OFF + tot_len;

	if (pkt->is_frag)
		return PARSE_IPV4;
	l4_min = parse_l4_min(pkt->ip_proto);
	if (!l4_min)
		return PARSE_IPV4;
	if (pkt->l4_off + l4_min > pkt->ip_end)
		return PARSE_MALFORMED;
	if (parse_pull(skb, pkt->l4_off + l4_min))
		return PARSE_MALFORMED;
	if (parse_l4_sane(skb, pkt))
		return PARSE_MALFORMED;
	return PARSE_IPV4;
}

#endif /* __TABBY_PARSE_H */

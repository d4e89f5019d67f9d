// SPDX-License-Identifier: GPL-2.0
/*
 * to-host: TC egress of the node's data interface, i.e. packets leaving for
 * the network. Replies that the node's own stack sends for a service flow
 * (a hostNetwork backend reached through a NodePort) get their frontend back;
 * pods of natOutgoing pools leaving the cluster get the node's address;
 * then packets routed to an IP-in-IP block get their outer header (ipip.h).
 * Packets a program of this node already handled (mark.h: the ext tunnel's,
 * DSR replies) skip the NAT part.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "tabby/types.h"
#include "tabby/maps.h"
#include "tabby/config.h"
#include "tabby/counters.h"
#include "tabby/ipip.h"
#include "tabby/mark.h"
#include "tabby/nat.h"
#include "tabby/parse.h"

SEC("tc")
int tby_to_host(struct __sk_buff *skb)
{
	struct parsed_pkt pkt = {};

	if (parse_packet(skb, &pkt) != PARSE_IPV4)
		return TC_ACT_OK;
	if (!mark_is_nat_done(skb) && nat_handle(skb, &pkt, NAT_HOOK_MASQ, NULL) == NAT_DROP)
		return TC_ACT_SHOT;
	if (ipip_encap(skb) == IPIP_DROP)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";

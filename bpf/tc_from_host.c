// SPDX-License-Identifier: GPL-2.0
/*
 * from-host: TC ingress of the node's data interface, i.e. packets from the
 * network. parse -> IP-in-IP from a known node: decapsulate, parse the inner
 * packet -> conntrack (replies of SNATed service flows) -> NodePort /
 * LoadBalancer / externalIP frontends -> let the node's kernel route.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "tabby/types.h"
#include "tabby/maps.h"
#include "tabby/config.h"
#include "tabby/counters.h"
#include "tabby/icmp.h"
#include "tabby/ipip.h"
#include "tabby/nat.h"
#include "tabby/parse.h"

SEC("tc")
int tby_from_host(struct __sk_buff *skb)
{
	struct parsed_pkt pkt = {};

	if (parse_packet(skb, &pkt) != PARSE_IPV4)
		return TC_ACT_OK; /* the node's own stack judges the rest */
	if (pkt.ip_proto == IPPROTO_IPIP && pkt.daddr == cfg_host_ip && cfg_host_ip) {
		if (ipip_decap(skb, &pkt) == IPIP_DROP)
			return TC_ACT_SHOT;
		/* the inner packet, as if it had arrived plain */
		if (parse_packet(skb, &pkt) != PARSE_IPV4) {
			counter_inc(TBY_R_DROP_MALFORMED);
			return TC_ACT_SHOT;
		}
	}

	switch (nat_handle(skb, &pkt, NAT_HOOK_FRONTENDS | NAT_HOOK_SNAT_REMOTE)) {
	case NAT_REJECT:
		return icmp_reject(skb, &pkt);
	case NAT_DROP:
		return TC_ACT_SHOT;
	default:
		return TC_ACT_OK;
	}
}

char LICENSE[] SEC("license") = "GPL";

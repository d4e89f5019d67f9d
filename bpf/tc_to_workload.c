// SPDX-License-Identifier: GPL-2.0
/*
 * to-workload: TC egress of a pod's host-side veth, i.e. packets delivered to
 * the pod. parse -> ingress policy (on the tuple as it arrived: pod to pod)
 * -> conntrack (replies of flows NATed elsewhere) -> deliver. IPv6: ingress
 * policy (policy6.h) only.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "tabby/types.h"
#include "tabby/maps.h"
#include "tabby/config.h"
#include "tabby/counters.h"
#include "tabby/nat.h"
#include "tabby/parse.h"
#include "tabby/policy.h"
#include "tabby/policy6.h"

SEC("tc")
int tby_to_wl(struct __sk_buff *skb)
{
	struct parsed_pkt pkt = {};

	switch (parse_packet(skb, &pkt)) {
	case PARSE_IPV4:
		if (pol_ingress(skb, &pkt) == POL_DROP)
			return TC_ACT_SHOT;
		if (nat_handle(skb, &pkt, 0, NULL) == NAT_DROP)
			return TC_ACT_SHOT;
		counter_inc(TBY_R_PASS_WL_IN);
		return TC_ACT_OK;
	case PARSE_IPV6:
		if (pol6_ingress(skb) == POL_DROP)
			return TC_ACT_SHOT;
		counter_inc(TBY_R_PASS_NON_IP);
		return TC_ACT_OK;
	case PARSE_ARP:
	case PARSE_OTHER:
		/* the node's own stack decides what a pod receives */
		counter_inc(TBY_R_PASS_NON_IP);
		return TC_ACT_OK;
	default:
		counter_inc(TBY_R_DROP_MALFORMED);
		return TC_ACT_SHOT;
	}
}

char LICENSE[] SEC("license") = "GPL";

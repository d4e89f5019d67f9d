// SPDX-License-Identifier: GPL-2.0
/*
 * tunnel: TC on the node's single collect-metadata VXLAN device.
 * egress: route the inner destination to the node owning it and set the
 * tunnel key; ingress: accept only our VNI from known nodes, translate
 * replies of service flows this node NATed, and (fwd.h) send local pods'
 * packets straight to their veth.
 */
#include <linux/bpf.h>
#include <linux/if_packet.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "tabby/types.h"
#include "tabby/maps.h"
#include "tabby/config.h"
#include "tabby/counters.h"
#include "tabby/encap.h"
#include "tabby/fib.h"
#include "tabby/fwd.h"
#include "tabby/mark.h"
#include "tabby/nat.h"
#include "tabby/parse.h"

/*
 * A destination goes through the tunnel if it is a remote pod block or a
 * remote tunnel address marked for VXLAN and its node is not us (a route to
 * ourselves through the tunnel would loop).
 */
static __always_inline int tun_route_ok(const struct tby_route_val *rt)
{
	if (!(rt->flags & TBY_RT_ENCAP_VXLAN))
		return 0;
	if (!(rt->flags & (TBY_RT_REMOTE_WL | TBY_RT_TUNNEL_ADDR)))
		return 0;
	if (rt->flags & (TBY_RT_LOCAL_WL | TBY_RT_LOCAL_HOST))
		return 0;
	return rt->next_hop && rt->next_hop != cfg_host_ip;
}

SEC("tc")
int tby_tun_egress(struct __sk_buff *skb)
{
	struct parsed_pkt pkt = {};
	struct tby_route_val *rt;

	switch (parse_packet(skb, &pkt)) {
	case PARSE_IPV4:
		break;
	case PARSE_MALFORMED:
		counter_inc(TBY_R_DROP_MALFORMED);
		return TC_ACT_SHOT;
	default:
		/* no key => the device would drop it anyway; say why */
		counter_inc(TBY_R_DROP_NO_ROUTE);
		return TC_ACT_SHOT;
	}

	rt = route_lookup(pkt.daddr);
	if (!rt || !tun_route_ok(rt)) {
		counter_inc(TBY_R_DROP_NO_ROUTE);
		return TC_ACT_SHOT;
	}
	if (encap_set_vxlan_key(skb, rt->next_hop)) {
		counter_inc(TBY_R_DROP_ENCAP_FAIL);
		return TC_ACT_SHOT;
	}
	counter_inc(TBY_R_ENCAP_VXLAN);
	/* once wrapped (same netns: the mark is kept), its outer header leaves
	 * through to-host, whose lookups could only miss on it */
	mark_nat_done(skb);
	return TC_ACT_OK;
}

SEC("tc")
int tby_tun_ingress(struct __sk_buff *skb)
{
	struct bpf_tunnel_key key = {};
	struct parsed_pkt pkt = {};
	struct tby_route_val *rt;

	if (encap_get_vxlan_key(skb, &key) || key.tunnel_id != cfg_vni) {
		counter_inc(TBY_R_DROP_BAD_TUNNEL);
		return TC_ACT_SHOT;
	}
	rt = route_lookup(bpf_htonl(key.remote_ipv4));
	if (!rt || !(rt->flags & TBY_RT_REMOTE_HOST)) {
		counter_inc(TBY_R_DROP_UNKNOWN_VTEP);
		return TC_ACT_SHOT;
	}

	switch (parse_packet(skb, &pkt)) {
	case PARSE_IPV4:
	case PARSE_ARP:
	case PARSE_IPV6:
		break;
	case PARSE_OTHER:
		counter_inc(TBY_R_DROP_ETHERTYPE);
		return TC_ACT_SHOT;
	default:
		counter_inc(TBY_R_DROP_MALFORMED);
		return TC_ACT_SHOT;
	}

	/*
	 * The sender's NOARP device put its own MAC as destination, so the
	 * frame arrives as PACKET_OTHERHOST and IP would discard it.
	 */
	if (skb->pkt_type == PACKET_OTHERHOST)
		bpf_skb_change_type(skb, PACKET_HOST);
	if (pkt.eth_proto != bpf_htons(ETH_P_IP)) {
		counter_inc(TBY_R_DECAP_VXLAN);
		return TC_ACT_OK;
	}
	if (nat_handle(skb, &pkt, 0, NULL) == NAT_DROP)
		return TC_ACT_SHOT;
	counter_inc(TBY_R_DECAP_VXLAN);
	/* a local pod's packet: to its veth (to-workload runs there) */
	return fwd_local_wl(skb, NULL);
}

char LICENSE[] SEC("license") = "GPL";

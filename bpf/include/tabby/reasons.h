/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Why a packet was passed or dropped: the index of tby_counters. The names are
 * ABI towards src/tabby/bpf/maps/counters.py (checked from BTF by
 * tests/layout); append new reasons before TBY_REASON_MAX, never renumber.
 */
#ifndef __TABBY_REASONS_H
#define __TABBY_REASONS_H

enum tby_reason {
	TBY_R_PASS_WL_OUT, /* left a local pod, source verified */
	TBY_R_PASS_WL_IN, /* delivered to a local pod */
	TBY_R_PASS_NON_IP, /* ARP / IPv6 passed untouched (for now) */
	TBY_R_ENCAP_VXLAN, /* tunnel key set towards a remote node */
	TBY_R_DECAP_VXLAN, /* accepted from a known remote node */
	TBY_R_DROP_MALFORMED, /* truncated or inconsistent headers */
	TBY_R_DROP_SPOOF, /* pod used a source address not its own */
	TBY_R_DROP_NO_ROUTE, /* tunnel egress without a remote route */
	TBY_R_DROP_BAD_TUNNEL, /* no tunnel metadata or a foreign VNI */
	TBY_R_DROP_UNKNOWN_VTEP, /* outer source is not a known node */
	TBY_R_DROP_ETHERTYPE, /* an L3 protocol a pod may not send */
	TBY_R_DROP_ENCAP_FAIL, /* tunnel key or IP-in-IP header could not be set */
	TBY_R_NAT_NEW, /* a new service flow: backend chosen, NAT pair created */
	TBY_R_NAT_FWD, /* forward packet of a NAT flow translated */
	TBY_R_NAT_REV, /* reply of a NAT flow translated back */
	TBY_R_NAT_REJECT, /* service without endpoints: ICMP port unreachable sent */
	TBY_R_NAT_ICMP_ERR, /* ICMP error about a NAT flow translated back */
	TBY_R_NAT_FRAG, /* non-first fragment of a NAT flow translated */
	TBY_R_CTLB_CONNECT, /* connect() to a service rewritten to a backend */
	TBY_R_CTLB_SENDMSG, /* unconnected UDP send to a service rewritten */
	TBY_R_CTLB_RECVMSG, /* reply source rewritten back to the service */
	TBY_R_DROP_NO_LOCAL, /* Local traffic policy and no local backend */
	TBY_R_DROP_SRC_RANGE, /* client outside loadBalancerSourceRanges */
	TBY_R_DROP_NAT_FAIL, /* rewrite or ICMP reply could not be built */
	TBY_R_DROP_FRAG, /* non-first fragment of an unknown datagram to a service */
	TBY_R_DROP_CT_FULL, /* no NAT port or conntrack slot for a new flow */
	TBY_R_NAT_MASQ, /* natOutgoing: a pod's flow leaving the cluster SNATed */
	TBY_R_ENCAP_IPIP, /* IP-in-IP header added towards a remote node */
	TBY_R_DECAP_IPIP, /* IP-in-IP from a known node: outer header removed */
	TBY_R_DROP_IPIP_SRC, /* IP-in-IP to us from an address that is no node */
	TBY_R_DROP_IPIP_FRAG, /* fragmented IP-in-IP: never sent by a node (MTU, DF) */
	TBY_R_EXT_FWD, /* ingress: external flow forwarded to its backend's node */
	TBY_R_EXT_RX, /* backend's node: packet of a forwarded flow received */
	TBY_R_EXT_REPLY_TUN, /* backend's node: reply tunnelled back to the ingress node */
	TBY_R_EXT_REPLY_DSR, /* backend's node: reply sent straight to the client (DSR) */
	TBY_R_EXT_FRAG_NEEDED, /* too big once encapsulated: ICMP fragmentation needed sent */
	TBY_R_DROP_EXT_SRC, /* ext tunnel packet from an address that is no node */
	TBY_R_DROP_EXT_FLOW, /* forwarded flow for no local pod, or colliding with another */
	TBY_R_DROP_EXT_TOO_BIG, /* too big once encapsulated and DF clear */
	TBY_R_DROP_POL_IN, /* a local pod's ingress policy denied a new flow */
	TBY_R_DROP_POL_OUT, /* a local pod's egress policy denied a new flow */
	TBY_R_POL_NEW, /* a new flow of an isolated pod admitted and cached on conntrack */
	TBY_R_MAGLEV_PICK, /* a new flow's backend taken from its Maglev table */
	TBY_R_MAGLEV_MISS, /* a Maglev frontend without its table (slot): random backend */
	TBY_R_EXT_MOVED, /* a flow arrived through another ingress node and kept its backend */
	TBY_R_EXT_REFUSED, /* backend's node: a colliding forwarded flow refused with ICMP */
	TBY_R_NAT6_NEW, /* a new IPv6 NodePort flow: backend chosen, pair in tby_ct6 */
	TBY_R_NAT6, /* a packet of an IPv6 NodePort flow translated (either way) */
	TBY_R_POL6_NEW, /* a new IPv6 flow of an isolated pod admitted, in tby_pol_ct6 */
	TBY_R_DROP_POL6_IN, /* a local pod's ingress policy denied a new IPv6 flow */
	TBY_R_DROP_POL6_OUT, /* a local pod's egress policy denied a new IPv6 flow */
	TBY_R_PASS_ND, /* ICMPv6 neighbor discovery (133-137): never judged by policy */
	TBY_R_FWD_REDIRECT, /* to the next hop's device by a FIB lookup (fast path, ext tunnel) */
	TBY_R_FWD_STACK, /* fast path on, left to the stack: fragment, options, TTL, not TCP/UDP */
	TBY_R_FWD_FIB_MISS, /* the FIB said no (route, local, MTU, neighbour): stack / redirect_neigh */
	TBY_R_FWD_PEER, /* fast path: a local pod's packet put into its netns (bpf_redirect_peer) */
	TBY_R_NAT_PORT_CLASH, /* a pod's new service flow took another port: its own clashed */
	TBY_REASON_MAX,
};

/* Reasons that are drops: logged at bpfLogLevel Debug. */
#define TBY_DROP_REASONS                                                \
	((1ULL << TBY_R_DROP_MALFORMED) | (1ULL << TBY_R_DROP_SPOOF) |   \
	 (1ULL << TBY_R_DROP_NO_ROUTE) | (1ULL << TBY_R_DROP_BAD_TUNNEL) | \
	 (1ULL << TBY_R_DROP_UNKNOWN_VTEP) | (1ULL << TBY_R_DROP_ETHERTYPE) | \
	 (1ULL << TBY_R_DROP_ENCAP_FAIL) | (1ULL << TBY_R_DROP_NO_LOCAL) | \
	 (1ULL << TBY_R_DROP_SRC_RANGE) | (1ULL << TBY_R_DROP_NAT_FAIL) |  \
	 (1ULL << TBY_R_DROP_FRAG) | (1ULL << TBY_R_DROP_CT_FULL) |     \
	 (1ULL << TBY_R_DROP_IPIP_SRC) | (1ULL << TBY_R_DROP_IPIP_FRAG) | \
	 (1ULL << TBY_R_DROP_EXT_SRC) | (1ULL << TBY_R_DROP_EXT_FLOW) |   \
	 (1ULL << TBY_R_DROP_EXT_TOO_BIG) | (1ULL << TBY_R_DROP_POL_IN) |  \
	 (1ULL << TBY_R_DROP_POL_OUT) | (1ULL << TBY_R_DROP_POL6_IN) | \
	 (1ULL << TBY_R_DROP_POL6_OUT))

/*
 * The counter key is a plain __u32 (array maps demand an integer key), so no
 * map carries the enum into BTF. This otherwise unused variable does, in a
 * section libbpf skips when loading, so the layout test can read the names.
 */
enum tby_reason tby_btf_reason __attribute__((section(".tby.btf"), used));

#endif /* __TABBY_REASONS_H */

/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Every map key and value layout of the datapath, and the flag constants
 * stored in them. This file is the single source of truth: the Python mirrors
 * in src/tabby/bpf/maps/ are checked against the BTF of the compiled objects
 * (tests/layout). Network-order fields are typed __be16/__be32 so that the
 * check can see their byte order. Change a layout incompatibly => bump the
 * map name's _vN suffix.
 */
#ifndef __TABBY_TYPES_H
#define __TABBY_TYPES_H

#include <linux/types.h>

/* tby_route_val.flags: what a destination is, and how to reach it. */
#define TBY_RT_LOCAL_WL (1U << 0) /* pod on this node; ifindex = host veth */
#define TBY_RT_REMOTE_WL (1U << 1) /* pod block on another node via next_hop */
#define TBY_RT_LOCAL_HOST (1U << 2) /* an address of this node */
#define TBY_RT_REMOTE_HOST (1U << 3) /* an address of another node */
#define TBY_RT_ENCAP_VXLAN (1U << 4) /* reach it through the VXLAN device */
#define TBY_RT_ENCAP_IPIP (1U << 5) /* reach it with IP-in-IP */
#define TBY_RT_TUNNEL_ADDR (1U << 6) /* a node's tunnel-device address */
#define TBY_RT_NAT_OUT (1U << 7) /* local pod of a natOutgoing pool: SNAT when leaving */
#define TBY_RT_NETNS (1U << 8) /* local pod whose netns id (netnsid) this node knows */

/* Key of tby_routes; the layout struct bpf_lpm_trie_key requires. */
struct tby_route_key {
	__u32 prefixlen; /* in bits, 0..32 */
	__be32 addr;
};

struct tby_route_val {
	__u32 flags; /* TBY_RT_* */
	__u32 ifindex; /* TBY_RT_LOCAL_WL: host-side veth */
	__be32 next_hop; /* remote routes: the owning node's underlay IP */
	__u32 netnsid; /* TBY_RT_NETNS: the pod's netns, as this node's netns numbers it */
};

/* tby_nat_fe_val.flags: how a frontend picks and treats its backends. */
#define TBY_NAT_AFFINITY (1U << 0) /* sessionAffinity ClientIP */
#define TBY_NAT_DROP_EMPTY (1U << 1) /* Local traffic policy, no local backend: drop */
#define TBY_NAT_SRC_RANGES (1U << 2) /* loadBalancerSourceRanges: check tby_nat_src */
#define TBY_NAT_EXTERNAL (1U << 3) /* NodePort / LoadBalancer / externalIP frontend */
#define TBY_NAT_MAGLEV (1U << 4) /* new flows: backend from tby_maglev by the 5-tuple hash */

/* Key of tby_nat_fe: a service frontend as a packet addresses it. */
struct tby_nat_fe_key {
	__be32 addr; /* ClusterIP, node IP (NodePort), LB ingress IP or externalIP */
	__be16 port;
	__u8 proto; /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 _pad;
};

struct tby_nat_fe_val {
	__u32 id; /* backend set: key of tby_nat_be (with an ordinal) */
	__u32 count; /* usable backends, ordinals 0..count-1; 0 => reject or drop */
	__u32 flags; /* TBY_NAT_* */
	__u32 affinity_s; /* sessionAffinity timeout */
};

struct tby_nat_be_key {
	__u32 id;
	__u32 ordinal;
};

struct tby_nat_be_val {
	__be32 addr;
	__be16 port;
	__u16 _pad;
};

/*
 * Maglev (lb.projectcalico.org/external-traffic-strategy: maglev): slot
 * 0..cfg_maglev_m-1 of a backend set's lookup table (value: struct
 * tby_nat_be_val, the backend itself). Every node writes the same table for
 * the same backends (calc/maglev.py), so a flow whose packets move to another
 * ingress node mid-connection reaches the same backend there.
 */
struct tby_maglev_key {
	__u32 id; /* backend set, as tby_nat_fe_val.id */
	__u32 slot;
};

/*
 * IPv6 services (ClusterIP, at connect() only: cgroup_ctlb.c's connect6 /
 * sendmsg6 / recvmsg6). Frontends share tby_nat_fe_val and tby_nat_be_key with
 * IPv4; addresses are 16 bytes in network order.
 */
struct tby_nat_fe6_key {
	__u8 addr[16]; /* an IPv6 ClusterIP */
	__be16 port;
	__u8 proto; /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 _pad;
};

struct tby_nat_be6_val {
	__u8 addr[16];
	__be16 port;
	__u16 _pad;
};

/*
 * IPv6 NodePorts per packet (nat6.h): one entry per direction of a flow, keyed
 * by the tuple as it arrives, holding the tuple to rewrite it to.
 */
struct tby_ct6_key {
	__u8 src[16];
	__u8 dst[16];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 _pad[3];
};

struct tby_ct6_val {
	__u8 src[16];
	__u8 dst[16];
	__be16 sport;
	__be16 dport;
	__u32 _pad;
};

/* IPv6 anti-spoofing: a local pod's IPv6 address -> its host-side veth. */
struct tby_wl6_key {
	__u8 addr[16];
};

struct tby_wl6_val {
	__u32 ifindex;
	__u32 _pad;
};

/*
 * tby_wl_devs (key: a local pod's host-side veth ifindex): what the fast path
 * needs to put a packet into that pod without asking the FIB: the frame's
 * MACs and the pod's MTU (fwd.h).
 */
struct tby_wl_dev_val {
	__u8 mac[6]; /* the pod's interface: the frame's destination */
	__u8 host_mac[6]; /* the host-side veth, the pod's gateway: its source */
	__u16 mtu; /* the veth's, as the pod's: larger packets go to the stack */
	__u16 _pad;
};

/* sessionAffinity ClientIP: the backend a client was last given. */
struct tby_nat_aff_key {
	__u32 id;
	__be32 client;
};

struct tby_nat_aff_val {
	__u64 seen_ns; /* bpf_ktime_get_ns() of the last new flow */
	__be32 addr;
	__be16 port;
	__u16 ordinal; /* where addr:port sat in the set: checked before reuse */
};

/* loadBalancerSourceRanges: LPM over (id, client address); a hit admits. */
struct tby_nat_src_key {
	__u32 prefixlen; /* 32 (the id) + the CIDR's prefix length */
	__u32 id;
	__be32 addr;
};

/* tby_ct_val.type */
#define TBY_CT_NAT_FWD 1 /* keyed by client->frontend: rewrite to the backend */
#define TBY_CT_NAT_REV 2 /* keyed by the translated tuple: replies get the frontend back */
#define TBY_CT_EXT 3 /* backend's node: a flow an ingress node forwarded (exttun.h) */

/* tby_ct_val.flags */
#define TBY_CTF_TUNNEL (1U << 0) /* ingress FWD half: sent to tun_ip in the ext tunnel */
#define TBY_CTF_DSR (1U << 1) /* replies leave the backend's node straight to the client */
/* REV half of a local pair whose flow now arrives through another ingress node */
#define TBY_CTF_MOVED (1U << 2)

/* tby_ct_val.tcp: TCP flags seen, either direction. */
#define TBY_CT_SYN (1U << 0)
#define TBY_CT_SYNACK (1U << 1) /* established once the reply's SYN-ACK passed */
#define TBY_CT_FIN_FWD (1U << 2)
#define TBY_CT_FIN_REV (1U << 3)
#define TBY_CT_RST (1U << 4)

/* A flow as a packet carries it (ports 0 for a protocol without them). */
struct tby_ct_key {
	__be32 src;
	__be32 dst;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 _pad[3];
};

/*
 * One half of a NAT pair. FWD: nat_addr:nat_port is the backend and, when
 * nat_saddr is set, the packet's source becomes nat_saddr:nat_sport (SNAT).
 * REV: nat_addr:nat_port is the frontend (the reply's new source) and, when
 * nat_saddr is set, the reply's destination becomes nat_saddr:nat_sport (the
 * original client).
 * EXT (alone, no partner; keyed client -> backend): nat_addr:nat_port is the
 * frontend the client reached on the ingress node tun_ip.
 */
struct tby_ct_val {
	__u64 created_ns;
	__u64 seen_ns;
	__u8 type; /* TBY_CT_NAT_* */
	__u8 tcp; /* TBY_CT_SYN... */
	__u16 pol; /* TBY_CTP_*: policy verdicts cached on this flow */
	__be32 nat_addr;
	__be16 nat_port;
	__be16 nat_sport;
	__be32 nat_saddr;
	__be32 tun_ip; /* F_TUNNEL: the backend's node; EXT: the ingress node */
	__u32 flags; /* TBY_CTF_* */
};

/*
 * What one conntrack sweep (tby_ct_gc) did; slot 0 of tby_ct_gc_st, written
 * once at the end of each run. Counts are entries (halves), not pairs.
 */
struct tby_ct_gc_stats {
	__u64 started_ns; /* bpf_ktime_get_ns() the sweep judged against */
	__u64 scanned; /* entries visited */
	__u64 kept; /* visited and left in place */
	__u64 expired; /* deleted: idle past their timeout (orphans included) */
	__u64 stale_udp; /* deleted: UDP to a backend its frontend no longer has */
	__u64 orphans; /* of expired: halves whose partner was already gone */
};

/* Non-first IPv4 fragments carry no ports: the first one records them. */
struct tby_frag_key {
	__be32 src;
	__be32 dst;
	__be16 id;
	__u8 proto;
	__u8 _pad;
};

struct tby_frag_val {
	__be16 sport;
	__be16 dport;
};

/*
 * Connect-time load balancing: what a socket's translated peer really was.
 * Keyed by (socket cookie, backend) so one unconnected UDP socket talking to
 * several services keeps each reply's frontend apart.
 */
struct tby_ctlb_sk_key {
	__u64 cookie; /* bpf_get_socket_cookie() */
	__be32 addr; /* backend the socket was sent to */
	__be16 port;
	__u16 _pad;
};

struct tby_ctlb_sk_val {
	__be32 addr; /* the frontend the application asked for */
	__be16 port;
	__u16 _pad;
};

/*
 * A connected socket's translation (connect4), kept in the socket itself
 * (tby_ctlb_conns, socket-local storage): it lives and dies with the socket.
 */
struct tby_ctlb_conn {
	__be32 be_addr; /* the backend connect() went to */
	__be32 fe_addr; /* the frontend the application asked for */
	__be16 be_port;
	__be16 fe_port;
};

/* The same for IPv6 sockets (tby_ctlb_sk6). */
struct tby_ctlb_sk6_key {
	__u64 cookie;
	__u8 addr[16];
	__be16 port;
	__u16 _pad;
	__u32 _pad2;
};

struct tby_ctlb_sk6_val {
	__u8 addr[16];
	__be16 port;
	__u16 _pad;
};

/* A connected IPv6 socket's translation (tby_ctlb_conns6), as struct tby_ctlb_conn. */
struct tby_ctlb_conn6 {
	__u8 be_addr[16];
	__u8 fe_addr[16];
	__be16 be_port;
	__be16 fe_port;
};

/*
 * NetworkPolicy (docs/design/policy.md). tby_ct_val.type of a flow that is no
 * NAT pair but carries a policy verdict, keyed by its (translated) tuple.
 */
#define TBY_CT_PLAIN 4
/* tby_ct_val.pol: which ends' policies admitted the flow on this node */
#define TBY_CTP_OUT (1U << 0) /* the source pod's egress */
#define TBY_CTP_IN (1U << 1) /* the destination pod's ingress */

/* tby_pol_ep_val.flags: the directions some policy isolates the pod in */
#define TBY_POL_ISO_IN (1U << 0)
#define TBY_POL_ISO_OUT (1U << 1)

/* A local pod that some policy selects (key: its address). */
struct tby_pol_ep_val {
	__u32 set; /* policy-set id: peer/port keys use set * 2 + direction */
	__u32 flags; /* TBY_POL_ISO_* */
	__u64 any_in; /* rule classes admitting every protocol and port, ingress */
	__u64 any_out; /* the same, egress */
};

/* LPM: (set * 2 + direction, peer address) -> u64 bitmap of rule classes. */
struct tby_pol_peer_key {
	__u32 prefixlen; /* 32 + the peer prefix length */
	__u32 set;
	__be32 addr;
};

/* LPM: (set * 2 + direction, protocol, port) -> u64 bitmap of rule classes. */
struct tby_pol_port_key {
	__u32 prefixlen; /* 48 + the port prefix length (0..16) */
	__u32 set;
	__u8 proto;
	__u8 _pad;
	__be16 port;
};

/*
 * IPv6 NetworkPolicy (policy6.h): the same policy sets as IPv4. A dual-stack
 * pod's IPv6 address keys tby_pol_ep6 with the same tby_pol_ep_val as its IPv4
 * address in tby_pol_ep; its peers' IPv6 prefixes are in tby_pol_peer6 under the
 * same set and class bits; ports (tby_pol_port) are shared by both families.
 */
struct tby_pol_ep6_key {
	__u8 addr[16];
};

/* LPM: (set * 2 + direction, IPv6 peer address) -> u64 bitmap of rule classes. */
struct tby_pol_peer6_key {
	__u32 prefixlen; /* 32 + the peer prefix length (0..128) */
	__u32 set;
	__u8 addr[16];
};

/*
 * IPv6 flows of isolated pods (an LRU keyed by the tuple as tby_ct6_key, no
 * sweep): which ends' policies admitted the flow on this node. A flow idle
 * past its conntrack timeout (ct_timeouts.h) counts as absent.
 */
struct tby_pol_ct6_val {
	__u64 seen_ns; /* bpf_ktime_get_ns() of its last packet */
	__u16 pol; /* TBY_CTP_* */
	__u8 tcp; /* TBY_CT_SYN... seen, either direction */
	__u8 _pad[5];
};

#endif /* __TABBY_TYPES_H */

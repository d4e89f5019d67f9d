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

/* Key of tby_routes; the layout struct bpf_lpm_trie_key requires. */
struct tby_route_key {
	__u32 prefixlen; /* in bits, 0..32 */
	__be32 addr;
};

struct tby_route_val {
	__u32 flags; /* TBY_RT_* */
	__u32 ifindex; /* TBY_RT_LOCAL_WL: host-side veth */
	__be32 next_hop; /* remote routes: the owning node's underlay IP */
	__u32 _pad;
};

#endif /* __TABBY_TYPES_H */

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
	TBY_R_DROP_ENCAP_FAIL, /* bpf_skb_set_tunnel_key failed */
	TBY_REASON_MAX,
};

/*
 * The counter key is a plain __u32 (array maps demand an integer key), so no
 * map carries the enum into BTF. This otherwise unused variable does, in a
 * section libbpf skips when loading, so the layout test can read the names.
 */
enum tby_reason tby_btf_reason __attribute__((section(".tby.btf"), used));

#endif /* __TABBY_REASONS_H */

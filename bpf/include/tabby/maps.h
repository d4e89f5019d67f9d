/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Every map of the datapath, defined once. All are pinned by name, so every
 * object loaded with the node's pin root (/sys/fs/bpf/tabby/<node>/) shares
 * the same instances and they survive an agent restart.
 */
#ifndef __TABBY_MAPS_H
#define __TABBY_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "types.h"
#include "reasons.h"

/* Destination CIDR -> local pod | remote block via node | host, with encap. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct tby_route_key);
	__type(value, struct tby_route_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_routes SEC(".maps");

/* Per-CPU packet count per enum tby_reason. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TBY_REASON_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_counters SEC(".maps");

/* Service frontend (VIP:port/proto) -> backend set, its size and flags. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 131072);
	__type(key, struct tby_nat_fe_key);
	__type(value, struct tby_nat_fe_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_nat_fe SEC(".maps");

/* (backend set, ordinal) -> backend address and port. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 524288);
	__type(key, struct tby_nat_be_key);
	__type(value, struct tby_nat_be_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_nat_be SEC(".maps");

/*
 * Maglev lookup tables, all in one hash: (backend set, slot) -> backend.
 * Allocated on use (no prealloc): a node without Maglev services pays nothing;
 * capacity = bpfMaglevMaxServices x table size, checked by dataplane/nat.py.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 262144);
	__type(key, struct tby_maglev_key);
	__type(value, struct tby_nat_be_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_maglev SEC(".maps");

/* sessionAffinity ClientIP: (backend set, client) -> last backend. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tby_nat_aff_key);
	__type(value, struct tby_nat_aff_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_nat_aff SEC(".maps");

/* loadBalancerSourceRanges: (backend set, client CIDR) -> admitted. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 16384);
	__type(key, struct tby_nat_src_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_nat_src SEC(".maps");

/* Conntrack: both halves of every NAT pair; LRU, swept by tby_ct_gc. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 512000);
	__type(key, struct tby_ct_key);
	__type(value, struct tby_ct_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_ct SEC(".maps");

/* Result of the last conntrack sweep (tby_ct_gc): slot 0 only. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tby_ct_gc_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_ct_gc_st SEC(".maps");

/* Ports of fragmented datagrams, for their non-first fragments. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct tby_frag_key);
	__type(value, struct tby_frag_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_frags SEC(".maps");

/*
 * Connect-time LB of unconnected UDP: (socket cookie, backend) -> frontend, for
 * the replies. An LRU: a closed socket's entries age out.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct tby_ctlb_sk_key);
	__type(value, struct tby_ctlb_sk_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_ctlb_sk SEC(".maps");

/*
 * Connect-time LB of a connected socket (TCP, connected UDP): its translation,
 * in the socket's own storage. Freed with the socket: nothing to evict, and a
 * socket we never translated answers getpeername without a hash lookup.
 */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct tby_ctlb_conn);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_ctlb_conns SEC(".maps");

/* IPv6 service frontends (ClusterIP:port/proto) -> backend set, as tby_nat_fe. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct tby_nat_fe6_key);
	__type(value, struct tby_nat_fe_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_nat_fe6 SEC(".maps");

/* IPv6 backend sets: (id, ordinal) -> backend, as tby_nat_be. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tby_nat_be_key);
	__type(value, struct tby_nat_be6_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_nat_be6 SEC(".maps");

/* Connect-time LB of unconnected UDP over IPv6: (socket cookie, backend) -> frontend. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tby_ctlb_sk6_key);
	__type(value, struct tby_ctlb_sk6_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_ctlb_sk6 SEC(".maps");

/* Connect-time LB of a connected IPv6 socket, in its own storage (as tby_ctlb_conns). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct tby_ctlb_conn6);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_ctlb_conns6 SEC(".maps");

/* IPv6 NodePort flows (nat6.h): tuple as it arrives -> tuple to rewrite to. An
 * LRU: no sweep; an idle flow's pair ages out under pressure. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tby_ct6_key);
	__type(value, struct tby_ct6_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_ct6 SEC(".maps");

/* IPv6 anti-spoofing: local pod IPv6 address -> its host-side veth. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct tby_wl6_key);
	__type(value, struct tby_wl6_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_wl6 SEC(".maps");

/* The fast path's local deliveries: host veth ifindex -> the pod's MACs, MTU. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct tby_wl_dev_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_wl_devs SEC(".maps");

/* NetworkPolicy: local pod address -> its policy set and isolation. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __be32);
	__type(value, struct tby_pol_ep_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_pol_ep SEC(".maps");

/* NetworkPolicy: (set, direction, peer prefix) -> rule classes holding it. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 262144);
	__type(key, struct tby_pol_peer_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_pol_peer SEC(".maps");

/* NetworkPolicy: (set, direction, protocol, port prefix) -> rule classes. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct tby_pol_port_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_pol_port SEC(".maps");

/* IPv6 NetworkPolicy: local pod IPv6 address -> its policy set (as tby_pol_ep). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct tby_pol_ep6_key);
	__type(value, struct tby_pol_ep_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_pol_ep6 SEC(".maps");

/* IPv6 NetworkPolicy: (set, direction, IPv6 peer prefix) -> rule classes. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 262144);
	__type(key, struct tby_pol_peer6_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_pol_peer6 SEC(".maps");

/* IPv6 flows of isolated pods: tuple -> policy verdicts (an LRU, no sweep). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct tby_ct6_key);
	__type(value, struct tby_pol_ct6_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tby_pol_ct6 SEC(".maps");

#endif /* __TABBY_MAPS_H */

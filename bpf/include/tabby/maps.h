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

#endif /* __TABBY_MAPS_H */

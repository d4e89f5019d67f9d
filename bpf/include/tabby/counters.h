/* SPDX-License-Identifier: GPL-2.0 */
#ifndef __TABBY_COUNTERS_H
#define __TABBY_COUNTERS_H

#include "log.h"
#include "maps.h"

/* Per-CPU slot: a plain add, no atomic needed. */
static __always_inline void counter_inc(enum tby_reason reason)
{
	__u32 key = reason;
	__u64 *packets = bpf_map_lookup_elem(&tby_counters, &key);

	if (packets)
		*packets += 1;
	if ((1ULL << reason) & TBY_DROP_REASONS)
		log_debug("drop reason=%d", reason);
}

#endif /* __TABBY_COUNTERS_H */

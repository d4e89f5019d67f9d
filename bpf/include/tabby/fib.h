/* SPDX-License-Identifier: GPL-2.0 */
#ifndef __TABBY_FIB_H
#define __TABBY_FIB_H

#include "maps.h"

/* Longest-prefix match of an IPv4 address in tby_routes; NULL if none. */
static __always_inline struct tby_route_val *route_lookup(__be32 addr)
{
	struct tby_route_key key = {
		.prefixlen = 32,
		.addr = addr,
	};

	return bpf_map_lookup_elem(&tby_routes, &key);
}

#endif /* __TABBY_FIB_H */

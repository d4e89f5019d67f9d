/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Maglev consistent hashing for the frontends of a Service annotated
 * lb.projectcalico.org/external-traffic-strategy: maglev (as Calico does it):
 * a new flow's backend is the table slot its 5-tuple hashes to. The hash has
 * a fixed seed (never bpf_get_prandom_u32, never a per-boot value) and the
 * table is the same on every node (calc/maglev.py fills it from the sorted
 * backends), so an ECMP router moving a flow to another ingress node
 * mid-connection moves it to the same backend. Mirror of the hash:
 * src/tabby/bpf/maps/maglev.py (flow_hash), checked by tests/bpf.
 */
#ifndef __TABBY_MAGLEV_H
#define __TABBY_MAGLEV_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "config.h"
#include "counters.h"
#include "maps.h"
#include "types.h"

#define TBY_MAGLEV_SEED 0x7ab1e5edU

static __always_inline __u32 maglev_rol32(__u32 x, int k)
{
	return (x << k) | (x >> (32 - k));
}

/*
 * Bob Jenkins' lookup3 final mix over three words (the addresses and the
 * ports as the packet carries them, read as host-order words), the protocol
 * folded into the initial value.
 */
static __always_inline __u32 maglev_flow_hash(const struct tby_ct_key *k)
{
	__u32 init = TBY_MAGLEV_SEED + k->proto;
	__u32 a = k->src + init, b = k->dst + init;
	__u32 c = (((__u32)k->sport << 16) | k->dport) + init;

	c ^= b;
	c -= maglev_rol32(b, 14);
	a ^= c;
	a -= maglev_rol32(c, 11);
	b ^= a;
	b -= maglev_rol32(a, 25);
	c ^= b;
	c -= maglev_rol32(b, 16);
	a ^= c;
	a -= maglev_rol32(c, 4);
	b ^= a;
	b -= maglev_rol32(a, 14);
	c ^= b;
	c -= maglev_rol32(b, 24);
	return c;
}

/* The backend of a new flow from its set's table; -1 when the table (or
 * the slot) is missing, and the caller falls back to the random choice. */
static __always_inline int maglev_pick(const struct tby_nat_fe_val *fe,
				       const struct tby_ct_key *k,
				       struct tby_nat_be_val *out)
{
	struct tby_maglev_key mk = { .id = fe->id };
	struct tby_nat_be_val *be;

	if (!cfg_maglev_m) {
		counter_inc(TBY_R_MAGLEV_MISS);
		return -1;
	}
	mk.slot = maglev_flow_hash(k) % cfg_maglev_m;
	be = bpf_map_lookup_elem(&tby_maglev, &mk);
	if (!be) {
		counter_inc(TBY_R_MAGLEV_MISS);
		return -1;
	}
	*out = *be;
	counter_inc(TBY_R_MAGLEV_PICK);
	return 0;
}

#endif /* __TABBY_MAGLEV_H */

// SPDX-License-Identifier: GPL-2.0
/*
 * ct_gc: the conntrack sweep. Not attached anywhere: the agent runs it with
 * BPF_PROG_TEST_RUN (a dummy packet; SEC("tc") because that prog type has
 * bpf_for_each_map_elem, bpf_loop and bpf_ktime_get_ns and test-runs without
 * the sleepable restrictions of SEC("syscall")) every few seconds and right
 * after a NAT apply removed backends. One run visits every tby_ct entry once,
 * in the kernel, and writes what it did to slot 0 of tby_ct_gc_st. Its only
 * input is skb->cb[0] (test_run ctx): seconds to add to "now", 0 in service.
 *
 * Per NAT pair (FWD + REV, each half computes the other's key):
 * - state is the OR of both halves' tcp flags, last activity the later seen_ns;
 * - idle past its state's timeout (ct_timeouts.h) => both halves deleted; a
 *   DSR ingress node's pair (it never sees a reply) is closing from the
 *   client's FIN on, as Calico's cleanup judges it;
 * - UDP whose backend is no longer one of its frontend's ordinals, or whose
 *   frontend is gone => both halves deleted, whatever their age (what
 *   kube-proxy does, so that clients re-resolve instead of blackholing);
 *   TCP to a removed backend is left to finish (or time out);
 * - a half whose partner is gone is judged alone, by the same timeouts.
 * The FWD half decides (and counts) for its pair; visiting a REV whose FWD is
 * there costs one lookup. So "kept" counts entries exactly, while "scanned"
 * depends on whether a deleted pair's REV came before its FWD in the walk.
 *
 * Races: a packet may refresh seen_ns between our read and the delete; that
 * flow then starts a new pair on its next packet, as after an LRU eviction.
 * The stale-UDP check must not run in the middle of a NAT apply (ordinals
 * being rewritten): the agent runs both from its one dataplane thread.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "tabby/types.h"
#include "tabby/maps.h"
#include "tabby/config.h"
#include "tabby/ct.h"
#include "tabby/ct_timeouts.h"

struct ct_gc_ctx {
	__u64 now_ns;
	struct tby_ct_gc_stats st;
};

static __always_inline int ct_gc_key_eq(const struct tby_ct_key *a,
					const struct tby_ct_key *b)
{
	return a->src == b->src && a->dst == b->dst && a->sport == b->sport &&
	       a->dport == b->dport && a->proto == b->proto;
}

/*
 * Each half names the other: a REV found under a FWD's computed key that does
 * not point back (another flow's, after port reuse) is not its partner and
 * must not be deleted with it.
 */
static __always_inline int ct_gc_pair_ok(const struct tby_ct_key *fk,
					 const struct tby_ct_val *fwd,
					 const struct tby_ct_key *rk,
					 const struct tby_ct_val *rev)
{
	struct tby_ct_key k = {};

	if (fwd->type != TBY_CT_NAT_FWD || rev->type != TBY_CT_NAT_REV)
		return 0;
	ct_rev_key(fk, fwd, &k);
	if (!ct_gc_key_eq(&k, rk))
		return 0;
	ct_fwd_key(rk, rev, &k);
	return ct_gc_key_eq(&k, fk);
}

/*
 * dsr: the pair is a DSR ingress node's (TBY_CTF_DSR on its FWD half), which
 * sees the client's packets only: the client's FIN is all of the close it can
 * see (as Calico's cleanup judges a DSR entry). A half-closed connection
 * still sending keeps it alive: the client's ACKs refresh it.
 */
static __always_inline __u64 ct_gc_timeout_ns(__u8 proto, __u8 tcp, int dsr)
{
	__u8 fins = TBY_CT_FIN_FWD | TBY_CT_FIN_REV;
	__u64 s;

	if (proto == IPPROTO_TCP) {
		if (tcp & TBY_CT_RST)
			s = TBY_CT_TIMEOUT_TCP_RST_S;
		else if ((tcp & fins) == fins || (dsr && (tcp & TBY_CT_FIN_FWD)))
			s = TBY_CT_TIMEOUT_TCP_FIN_S;
		else if (tcp & TBY_CT_SYNACK)
			s = TBY_CT_TIMEOUT_TCP_EST_S;
		else
			s = TBY_CT_TIMEOUT_TCP_SYN_S;
	} else if (proto == IPPROTO_UDP) {
		s = TBY_CT_TIMEOUT_UDP_S;
	} else {
		s = TBY_CT_TIMEOUT_OTHER_S;
	}
	return s * TBY_NS_PER_S;
}

/* A UDP FWD half is stale when its backend is not among its frontend's (or
 * the frontend is gone); a set too big to scan is left to its timeout. */
static __always_inline int ct_gc_udp_stale(const struct tby_ct_key *fk,
					   const struct tby_ct_val *fwd)
{
	int in_set = ct_backend_in_set(fk, fwd, TBY_CT_GC_MAX_ORDINALS);

	return in_set == -1 || in_set == 0;
}

/*
 * bpf_for_each_map_elem callback, once per entry. Deleting the visited
 * element (and its partner) of an LRU hash here is allowed; a freed element
 * may be reused at once by a new flow on another CPU, which can make this
 * walk skip or revisit some entries. That is acceptable: the next sweep,
 * seconds later, gets what this one missed.
 */
static long ct_gc_visit(void *map, struct tby_ct_key *key,
			struct tby_ct_val *val, struct ct_gc_ctx *ctx)
{
	struct tby_ct_key fk = {}, rk = {};
	struct tby_ct_val *fwd = NULL, *rev = NULL, *other;
	__u64 last, idle_ns;
	__u64 *reason;
	__u8 tcp;
	int dsr;
	int n = 0;

	(void)map;
	ctx->st.scanned++;

	if (val->type == TBY_CT_NAT_REV) {
		rev = val;
		rk = *key;
		ct_fwd_key(&rk, rev, &fk);
		other = bpf_map_lookup_elem(&tby_ct, &fk);
		if (other && ct_gc_pair_ok(&fk, other, &rk, rev))
			return 0; /* its FWD decides for the pair, and counts it */
	} else {
		/* FWD, a policy-only flow (PLAIN), or a type we do not know:
		 * judged alone, timeouts only */
		fwd = val;
		fk = *key;
		if (val->type == TBY_CT_NAT_FWD) {
			ct_rev_key(&fk, fwd, &rk);
			other = bpf_map_lookup_elem(&tby_ct, &rk);
			if (other && ct_gc_pair_ok(&fk, fwd, &rk, other))
				rev = other;
		}
	}

	tcp = val->tcp;
	last = val->seen_ns;
	if (fwd && rev) {
		tcp = fwd->tcp | rev->tcp;
		last = fwd->seen_ns > rev->seen_ns ? fwd->seen_ns :
						     rev->seen_ns;
	}
	idle_ns = ctx->now_ns > last ? ctx->now_ns - last : 0;

	dsr = fwd && fwd->type == TBY_CT_NAT_FWD && (fwd->flags & TBY_CTF_DSR);
	if (idle_ns > ct_gc_timeout_ns(key->proto, tcp, dsr)) {
		reason = &ctx->st.expired;
		/* a policy-only flow (TBY_CT_PLAIN) is single by design */
		if (!(fwd && rev) && val->type != TBY_CT_PLAIN)
			ctx->st.orphans++;
	} else if (key->proto == IPPROTO_UDP && fwd &&
		   fwd->type == TBY_CT_NAT_FWD && ct_gc_udp_stale(&fk, fwd)) {
		reason = &ctx->st.stale_udp;
	} else {
		ctx->st.kept += fwd && rev ? 2 : 1;
		return 0;
	}

	/*
	 * fwd/rev point into the map: everything is read before deleting. The
	 * partner goes first: the walk reads the visited element's next pointer
	 * after we return, and unlinking a partner that follows it in the bucket
	 * fixes that pointer only while the visited element is still linked
	 * (else the walk would step onto the freed partner). A visited REV has
	 * no partner here (see above).
	 */
	if (val == fwd && rev && !bpf_map_delete_elem(&tby_ct, &rk))
		n++;
	if (!bpf_map_delete_elem(&tby_ct, val == fwd ? &fk : &rk))
		n++;
	*reason += n;
	return 0;
}

SEC("tc")
int tby_ct_gc(struct __sk_buff *skb)
{
	struct ct_gc_ctx ctx = {};
	__u32 zero = 0;
	long visited;

	/*
	 * Judge as of cb[0] seconds from now: 0 from the agent; tests and the
	 * bench sweep "in the future" rather than back-date entries past boot.
	 */
	ctx.now_ns = bpf_ktime_get_ns() + (__u64)skb->cb[0] * TBY_NS_PER_S;
	ctx.st.started_ns = ctx.now_ns;
	visited = bpf_for_each_map_elem(&tby_ct, ct_gc_visit, &ctx, 0);
	bpf_map_update_elem(&tby_ct_gc_st, &zero, &ctx.st, BPF_ANY);
	/* TC_ACT_OK: swept (the agent checks it); TC_ACT_SHOT: the walk failed */
	return visited < 0 ? TC_ACT_SHOT : TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";

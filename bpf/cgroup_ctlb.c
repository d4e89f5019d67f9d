// SPDX-License-Identifier: GPL-2.0
/*
 * Connect-time load balancing (Calico's bpfConnectTimeLoadBalancing, Cilium's
 * socket LB). Socket-address hooks on the node's cgroup (pods are its
 * children) rewrite a service frontend to a backend before the kernel routes
 * it, so the flow never needs per-packet NAT:
 *   connect4     connect() to a frontend -> a backend (TCP; UDP if cfg_ctlb_udp)
 *   sendmsg4     unconnected UDP sendto() a frontend -> a backend, per datagram
 *   recvmsg4     a reply's source backend -> the frontend the socket asked for
 *   getpeername4 the connected backend -> the frontend
 * Each translation is recorded: a connected socket's in its own storage
 * (tby_ctlb_conns, gone with the socket), an unconnected UDP datagram's as
 * (socket cookie, backend) -> frontend in tby_ctlb_sk (an LRU). The reverse
 * hooks only undo what is recorded.
 *
 * IPv6 (connect6, sendmsg6, recvmsg6, getpeername6; tby_nat_fe6/be6,
 * tby_ctlb_conns6, tby_ctlb_sk6): IPv6 ClusterIPs exist only here, there is
 * no per-packet IPv6 path, so TCP and UDP are both translated in every mode,
 * a frontend with no backends refuses the connect() (EPERM), and
 * sessionAffinity and source ranges are not honoured (a random backend each
 * time).
 *
 * A frontend is left to the per-packet path (no translation, no count) when it
 * has no backends (the tc path rejects), when it checks source ranges, or when
 * it has ClientIP affinity and the socket's source address is not known yet
 * (nothing bound, no IP_PKTINFO): affinity is keyed by client IP, which for an
 * unbound socket only exists after routing, so the tc path keys it correctly.
 *
 * tby_ctlb_reap (iter/udp) is the cure for the connected-UDP trap: a UDP
 * socket connected to a backend that has since left its service would keep
 * sending to it forever. The agent runs this iterator in each pod netns when
 * backends go away; it destroys (bpf_sock_destroy: the application sees
 * ECONNABORTED and reconnects through connect4) every connected UDP socket
 * that we translated and whose backend is no longer one of its frontend's.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "tabby/types.h"
#include "tabby/maps.h"
#include "tabby/config.h"
#include "tabby/counters.h"

#define SOCK_ALLOW 1 /* cgroup sock_addr verdict: carry on (we never refuse) */
#define TBY_AF_INET 2
#define TBY_SK_ESTABLISHED 1 /* TCP_ESTABLISHED: what a connected UDP socket is */
#define NSEC_PER_SEC 1000000000ULL

static __always_inline struct tby_nat_fe_val *ctlb_lookup_frontend(__be32 addr, __u32 port,
								   __u32 proto)
{
	struct tby_nat_fe_key key = {
		.addr = addr,
		.port = (__be16)port, /* user_port: network order in the low 16 bits */
		.proto = (__u8)proto,
	};

	return bpf_map_lookup_elem(&tby_nat_fe, &key);
}

struct ctlb_search {
	__u32 id;
	__be32 addr;
	__be16 port;
	__u8 found;
};

static long ctlb_search_cb(__u32 ordinal, void *data)
{
	struct ctlb_search *s = data;
	struct tby_nat_be_key key = { .id = s->id, .ordinal = ordinal };
	struct tby_nat_be_val *be = bpf_map_lookup_elem(&tby_nat_be, &key);

	if (be && be->addr == s->addr && be->port == s->port) {
		s->found = 1;
		return 1; /* stop */
	}
	return 0;
}

/*
 * Is addr:port still among the frontend's backends? A scan, not a lookup: the
 * backend map is keyed by ordinal. Only paid by affinity hits and the reaper.
 */
static __always_inline int ctlb_is_backend(const struct tby_nat_fe_val *fe, __be32 addr,
					   __be16 port)
{
	struct ctlb_search s = { .id = fe->id, .addr = addr, .port = port };

	bpf_loop(fe->count, ctlb_search_cb, &s, 0);
	return s.found;
}

/*
 * Pick the frontend's backend into *out. Returns 0, or -1 to leave the flow to
 * the per-packet path (see the header comment for when).
 */
static __always_inline int ctlb_choose(const struct tby_nat_fe_val *fe, __be32 client,
				       struct tby_nat_be_val *out)
{
	struct tby_nat_be_key be_key = { .id = fe->id };
	struct tby_nat_aff_key aff_key = { .id = fe->id, .client = client };
	struct tby_nat_aff_val aff = {};
	struct tby_nat_aff_val *seen;
	struct tby_nat_be_val *be;
	__u64 now = 0;

	if (fe->count == 0 || (fe->flags & TBY_NAT_SRC_RANGES))
		return -1;
	if (fe->flags & TBY_NAT_AFFINITY) {
		if (!client)
			return -1;
		now = bpf_ktime_get_ns();
		seen = bpf_map_lookup_elem(&tby_nat_aff, &aff_key);
		if (seen && now - seen->seen_ns < (__u64)fe->affinity_s * NSEC_PER_SEC &&
		    ctlb_is_backend(fe, seen->addr, seen->port)) {
			seen->seen_ns = now;
			out->addr = seen->addr;
			out->port = seen->port;
			return 0;
		}
	}
	be_key.ordinal = bpf_get_prandom_u32() % fe->count;
	be = bpf_map_lookup_elem(&tby_nat_be, &be_key);
	if (!be)
		return -1; /* a set being rewritten: the tc path copes */
	out->addr = be->addr;
	out->port = be->port;
	if (fe->flags & TBY_NAT_AFFINITY) {
		aff.seen_ns = now;
		aff.addr = be->addr;
		aff.port = be->port;
		bpf_map_update_elem(&tby_nat_aff, &aff_key, &aff, BPF_ANY);
	}
	return 0;
}

/* Record that ctx's socket was sent to be instead of its frontend; 0 if done. */
static __always_inline int ctlb_record(struct bpf_sock_addr *ctx, const struct tby_nat_be_val *be,
				       int connected)
{
	struct tby_ctlb_sk_key key = {};
	struct tby_ctlb_sk_val orig = {};
	struct tby_ctlb_conn *conn;

	if (connected) {
		conn = bpf_sk_storage_get(&tby_ctlb_conns, ctx->sk, 0,
					  BPF_SK_STORAGE_GET_F_CREATE);
		if (!conn)
			return -1;
		conn->be_addr = be->addr;
		conn->be_port = be->port;
		conn->fe_addr = ctx->user_ip4;
		conn->fe_port = (__be16)ctx->user_port;
		return 0;
	}
	key.cookie = bpf_get_socket_cookie(ctx);
	key.addr = be->addr;
	key.port = be->port;
	orig.addr = ctx->user_ip4;
	orig.port = (__be16)ctx->user_port;
	return bpf_map_update_elem(&tby_ctlb_sk, &key, &orig, BPF_ANY) ? -1 : 0;
}

/*
 * Translate ctx's destination if it is a frontend of ours; returns 1 if done.
 * The reverse entry is written first: a translation we could not record would
 * show the backend to getpeername()/recvfrom(), so then we do not translate.
 * ``connected``: connect4's (the record lives in the socket), else sendmsg4's.
 */
static __always_inline int ctlb_translate(struct bpf_sock_addr *ctx, __be32 client, int connected)
{
	struct tby_nat_fe_val *fe;
	struct tby_nat_be_val be;

	fe = ctlb_lookup_frontend(ctx->user_ip4, ctx->user_port, ctx->protocol);
	if (!fe || ctlb_choose(fe, client, &be) || ctlb_record(ctx, &be, connected))
		return 0;
	ctx->user_ip4 = be.addr;
	ctx->user_port = be.port;
	return 1;
}

/* getpeername4, and recvmsg4 first: a connected socket's backend shows as its frontend. */
static __always_inline int ctlb_restore_connected(struct bpf_sock_addr *ctx)
{
	struct tby_ctlb_conn *conn = bpf_sk_storage_get(&tby_ctlb_conns, ctx->sk, 0, 0);

	if (!conn || conn->be_addr != ctx->user_ip4 || conn->be_port != (__be16)ctx->user_port)
		return 0;
	ctx->user_ip4 = conn->fe_addr;
	ctx->user_port = conn->fe_port;
	return 1;
}

/* recvmsg4: a backend we translated to shows as its frontend. */
static __always_inline int ctlb_restore_frontend(struct bpf_sock_addr *ctx)
{
	struct tby_ctlb_sk_key key = {
		.addr = ctx->user_ip4,
		.port = (__be16)ctx->user_port,
	};
	struct tby_ctlb_sk_val *orig;

	if (ctlb_restore_connected(ctx))
		return 1;
	key.cookie = bpf_get_socket_cookie(ctx);
	orig = bpf_map_lookup_elem(&tby_ctlb_sk, &key);
	if (!orig)
		return 0;
	ctx->user_ip4 = orig->addr;
	ctx->user_port = orig->port;
	return 1;
}

/*
 * UDP is translated at the socket in mode Enabled, and always for the node's
 * own sockets: pods' UDP has the per-packet path on their veth, the node's
 * stack has none.
 */
static __always_inline int ctlb_udp_here(struct bpf_sock_addr *ctx)
{
	return cfg_ctlb_udp ||
	       (cfg_host_netns && bpf_get_netns_cookie(ctx) == cfg_host_netns);
}

SEC("cgroup/connect4")
int tby_ctlb_conn4(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	__u32 proto = ctx->protocol;

	if (proto != IPPROTO_TCP && !(proto == IPPROTO_UDP && ctlb_udp_here(ctx)))
		return SOCK_ALLOW;
	if (ctlb_translate(ctx, sk ? sk->src_ip4 : 0, 1))
		counter_inc(TBY_R_CTLB_CONNECT);
	else if (proto == IPPROTO_UDP)
		/* connected again, elsewhere: the last translation no longer applies */
		bpf_sk_storage_delete(&tby_ctlb_conns, ctx->sk);
	return SOCK_ALLOW;
}

SEC("cgroup/sendmsg4")
int tby_ctlb_send4(struct bpf_sock_addr *ctx)
{
	if (!ctlb_udp_here(ctx))
		return SOCK_ALLOW;
	/* msg_src_ip4: the bound address or IP_PKTINFO's, 0 if the route picks */
	if (ctlb_translate(ctx, ctx->msg_src_ip4, 0))
		counter_inc(TBY_R_CTLB_SENDMSG);
	return SOCK_ALLOW;
}

SEC("cgroup/recvmsg4")
int tby_ctlb_recv4(struct bpf_sock_addr *ctx)
{
	if (ctlb_restore_frontend(ctx))
		counter_inc(TBY_R_CTLB_RECVMSG);
	return SOCK_ALLOW;
}

SEC("cgroup/getpeername4")
int tby_ctlb_peer4(struct bpf_sock_addr *ctx)
{
	ctlb_restore_connected(ctx);
	return SOCK_ALLOW;
}

/* --- IPv6 ------------------------------------------------------------------ */

#define SOCK_REFUSE 0 /* cgroup sock_addr verdict: the call fails with EPERM */

static __always_inline void ctlb6_read(const struct bpf_sock_addr *ctx, __u8 addr[16])
{
	__u32 w[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };

	__builtin_memcpy(addr, w, 16);
}

static __always_inline void ctlb6_write(struct bpf_sock_addr *ctx, const __u8 addr[16])
{
	__u32 w[4];

	__builtin_memcpy(w, addr, 16);
	ctx->user_ip6[0] = w[0];
	ctx->user_ip6[1] = w[1];
	ctx->user_ip6[2] = w[2];
	ctx->user_ip6[3] = w[3];
}

/* Record an IPv6 translation (as ctlb_record); 0 if done. */
static __always_inline int ctlb6_record(struct bpf_sock_addr *ctx, const struct tby_nat_fe6_key *fk,
					const struct tby_nat_be6_val *be, int connected)
{
	struct tby_ctlb_sk6_key key = {};
	struct tby_ctlb_sk6_val orig = {};
	struct tby_ctlb_conn6 *conn;

	if (connected) {
		conn = bpf_sk_storage_get(&tby_ctlb_conns6, ctx->sk, 0,
					  BPF_SK_STORAGE_GET_F_CREATE);
		if (!conn)
			return -1;
		__builtin_memcpy(conn->be_addr, be->addr, 16);
		conn->be_port = be->port;
		__builtin_memcpy(conn->fe_addr, fk->addr, 16);
		conn->fe_port = fk->port;
		return 0;
	}
	key.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(key.addr, be->addr, 16);
	key.port = be->port;
	__builtin_memcpy(orig.addr, fk->addr, 16);
	orig.port = fk->port;
	return bpf_map_update_elem(&tby_ctlb_sk6, &key, &orig, BPF_ANY) ? -1 : 0;
}

/*
 * Translate ctx's IPv6 destination if it is a frontend of ours: 1 translated,
 * 0 not ours, -1 ours with nothing to translate to (refuse). ``connected`` as
 * ctlb_translate's.
 */
static __always_inline int ctlb6_translate(struct bpf_sock_addr *ctx, int connected)
{
	struct tby_nat_fe6_key fk = {};
	struct tby_nat_be_key bk = {};
	struct tby_nat_be6_val *be;
	struct tby_nat_fe_val *fe;

	ctlb6_read(ctx, fk.addr);
	fk.port = (__be16)ctx->user_port;
	fk.proto = (__u8)ctx->protocol;
	fe = bpf_map_lookup_elem(&tby_nat_fe6, &fk);
	if (!fe)
		return 0;
	if (fe->count == 0)
		return -1;
	bk.id = fe->id;
	bk.ordinal = bpf_get_prandom_u32() % fe->count;
	be = bpf_map_lookup_elem(&tby_nat_be6, &bk);
	if (!be || ctlb6_record(ctx, &fk, be, connected))
		return -1; /* a set being rewritten, or no room to record */
	ctlb6_write(ctx, be->addr);
	ctx->user_port = be->port;
	return 1;
}

/* getpeername6, and recvmsg6 first: a connected socket's backend shows as its frontend. */
static __always_inline int ctlb6_restore_connected(struct bpf_sock_addr *ctx)
{
	struct tby_ctlb_conn6 *conn = bpf_sk_storage_get(&tby_ctlb_conns6, ctx->sk, 0, 0);
	__u32 be[4];

	if (!conn || conn->be_port != (__be16)ctx->user_port)
		return 0;
	__builtin_memcpy(be, conn->be_addr, 16);
	if ((be[0] ^ ctx->user_ip6[0]) | (be[1] ^ ctx->user_ip6[1]) | (be[2] ^ ctx->user_ip6[2]) |
	    (be[3] ^ ctx->user_ip6[3]))
		return 0;
	ctlb6_write(ctx, conn->fe_addr);
	ctx->user_port = conn->fe_port;
	/* keeps clang from merging this store with recvmsg6's other one into a
	 * store through a computed ctx pointer, which the verifier refuses */
	__asm__ __volatile__("" ::: "memory");
	return 1;
}

static __always_inline int ctlb6_restore_frontend(struct bpf_sock_addr *ctx)
{
	struct tby_ctlb_sk6_key key = {};
	struct tby_ctlb_sk6_val *orig;

	if (ctlb6_restore_connected(ctx))
		return 1;
	key.cookie = bpf_get_socket_cookie(ctx);
	ctlb6_read(ctx, key.addr);
	key.port = (__be16)ctx->user_port;
	orig = bpf_map_lookup_elem(&tby_ctlb_sk6, &key);
	if (!orig)
		return 0;
	ctlb6_write(ctx, orig->addr);
	ctx->user_port = orig->port;
	return 1;
}

SEC("cgroup/connect6")
int tby_ctlb_conn6(struct bpf_sock_addr *ctx)
{
	__u32 proto = ctx->protocol;
	int done;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return SOCK_ALLOW;
	done = ctlb6_translate(ctx, 1);
	if (done < 0)
		return SOCK_REFUSE;
	if (done)
		counter_inc(TBY_R_CTLB_CONNECT);
	else if (proto == IPPROTO_UDP)
		bpf_sk_storage_delete(&tby_ctlb_conns6, ctx->sk); /* as connect4's */
	return SOCK_ALLOW;
}

SEC("cgroup/sendmsg6")
int tby_ctlb_send6(struct bpf_sock_addr *ctx)
{
	int done = ctlb6_translate(ctx, 0);

	if (done < 0)
		return SOCK_REFUSE;
	if (done)
		counter_inc(TBY_R_CTLB_SENDMSG);
	return SOCK_ALLOW;
}

SEC("cgroup/recvmsg6")
int tby_ctlb_recv6(struct bpf_sock_addr *ctx)
{
	if (ctlb6_restore_frontend(ctx))
		counter_inc(TBY_R_CTLB_RECVMSG);
	return SOCK_ALLOW;
}

SEC("cgroup/getpeername6")
int tby_ctlb_peer6(struct bpf_sock_addr *ctx)
{
	ctlb6_restore_connected(ctx);
	return SOCK_ALLOW;
}

/*
 * Just the kernel fields the reaper reads, relocated by CO-RE against the
 * running kernel's BTF (the UAPI headers we build with have no struct sock).
 */
struct sock_common {
	unsigned short skc_family;
	volatile unsigned char skc_state;
	__be32 skc_daddr;
	__be16 skc_dport;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
} __attribute__((preserve_access_index));

struct seq_file;

struct bpf_iter_meta {
	struct seq_file *seq;
} __attribute__((preserve_access_index));

struct udp_sock;

struct bpf_iter__udp {
	struct bpf_iter_meta *meta;
	struct udp_sock *udp_sk;
} __attribute__((preserve_access_index));

extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

/*
 * One call per UDP socket of the netns the iterator was created in. Each
 * socket destroyed is reported to the reader as a struct tby_ctlb_sk_key.
 */
SEC("iter/udp")
int tby_ctlb_reap(struct bpf_iter__udp *ctx)
{
	struct sock *sk = (struct sock *)ctx->udp_sk;
	struct tby_ctlb_sk_key key = {};
	struct tby_ctlb_conn *conn;
	struct tby_nat_fe_val *fe;

	if (!sk || sk->__sk_common.skc_family != TBY_AF_INET ||
	    sk->__sk_common.skc_state != TBY_SK_ESTABLISHED)
		return 0;
	key.addr = sk->__sk_common.skc_daddr;
	key.port = sk->__sk_common.skc_dport;
	conn = bpf_sk_storage_get(&tby_ctlb_conns, sk, 0, 0);
	if (!conn || conn->be_addr != key.addr || conn->be_port != key.port)
		return 0; /* not connected through us */
	fe = ctlb_lookup_frontend(conn->fe_addr, conn->fe_port, IPPROTO_UDP);
	if (fe && ctlb_is_backend(fe, key.addr, key.port))
		return 0;
	key.cookie = bpf_get_socket_cookie(sk);
	if (bpf_sock_destroy((struct sock_common *)sk))
		return 0;
	bpf_seq_write(ctx->meta->seq, &key, sizeof(key));
	return 0;
}

char LICENSE[] SEC("license") = "GPL";

/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Conntrack idle timeouts, Calico's BPFConntrackTimeouts defaults. A pair's
 * idle time is now minus the later seen_ns of its two halves; its state is
 * the OR of both halves' tcp flags. Mirrored by tabby.bpf.maps.ctgc.Timeouts
 * (tests/bpf/test_ct_gc.py checks the values).
 */
#ifndef __TABBY_CT_TIMEOUTS_H
#define __TABBY_CT_TIMEOUTS_H

#define TBY_NS_PER_S 1000000000ULL

#define TBY_CT_TIMEOUT_TCP_SYN_S 20 /* TCPSynSent: SYN seen, no SYN-ACK yet */
#define TBY_CT_TIMEOUT_TCP_EST_S 3600 /* TCPEstablished */
#define TBY_CT_TIMEOUT_TCP_FIN_S 30 /* TCPFinsSeen: FIN both ways (DSR ingress: the client's) */
#define TBY_CT_TIMEOUT_TCP_RST_S 40 /* TCPResetSeen */
#define TBY_CT_TIMEOUT_UDP_S 60 /* UDPTimeout */
#define TBY_CT_TIMEOUT_OTHER_S 60 /* any other protocol */

/*
 * Backend ordinals of one frontend the stale-UDP check compares against. A
 * frontend with more than this never has its UDP flows judged stale (the
 * check stays conservative: it deletes only what it has proven stale).
 */
#define TBY_CT_GC_MAX_ORDINALS 4096

#endif /* __TABBY_CT_TIMEOUTS_H */

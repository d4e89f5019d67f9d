/* SPDX-License-Identifier: GPL-2.0 */
/*
 * skb->mark bits tabby sets on a packet that one of this node's programs has
 * already handled and that leaves through the data interface: to-host's
 * conntrack lookups would only miss on it (an ext tunnel packet's outer
 * tuple, a pod VXLAN packet's, a DSR reply already carrying its frontend),
 * so to-host skips NAT for it. Only the bits of TBY_MARK_MASK are ours (kube-proxy uses 0x4000 /
 * 0x8000, Calico's default iptablesMarkMask is 0xffff0000: choose another
 * value there if both run); the mark never leaves the node's namespace.
 */
#ifndef __TABBY_MARK_H
#define __TABBY_MARK_H

#include <linux/bpf.h>

#define TBY_MARK_MASK 0x0ff00000U
#define TBY_MARK_NAT_DONE 0x07a00000U /* translated on this node: to-host skips NAT */

static __always_inline void mark_nat_done(struct __sk_buff *skb)
{
	skb->mark = (skb->mark & ~TBY_MARK_MASK) | TBY_MARK_NAT_DONE;
}

static __always_inline int mark_is_nat_done(const struct __sk_buff *skb)
{
	return (skb->mark & TBY_MARK_MASK) == TBY_MARK_NAT_DONE;
}

#endif /* __TABBY_MARK_H */

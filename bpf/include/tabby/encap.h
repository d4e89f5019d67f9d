/* SPDX-License-Identifier: GPL-2.0 */
/*
 * VXLAN through the node's collect-metadata device: the programs only set or
 * read the tunnel key; the device builds and strips the outer headers.
 */
#ifndef __TABBY_ENCAP_H
#define __TABBY_ENCAP_H

#include <linux/bpf.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "config.h"

#define TBY_TUNNEL_TTL 64

/* Sends the packet to remote (network order) on cfg_vni; 0 on success. */
static __always_inline int encap_set_vxlan_key(struct __sk_buff *skb,
					       __be32 remote)
{
	struct bpf_tunnel_key key = {
		.tunnel_id = cfg_vni,
		.remote_ipv4 = bpf_ntohl(remote),
		.tunnel_ttl = TBY_TUNNEL_TTL,
	};

	/* UDP checksum 0 is legal for IPv4 VXLAN and saves a pass over the
	 * payload. */
	return bpf_skb_set_tunnel_key(skb, &key, sizeof(key),
				      BPF_F_ZERO_CSUM_TX);
}

/* Reads the received tunnel key; remote_ipv4 comes back in host order. */
static __always_inline int encap_get_vxlan_key(struct __sk_buff *skb,
					       struct bpf_tunnel_key *key)
{
	return bpf_skb_get_tunnel_key(skb, key, sizeof(*key), 0);
}

#endif /* __TABBY_ENCAP_H */

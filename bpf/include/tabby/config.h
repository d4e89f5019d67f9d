/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Load-time configuration: `const volatile` globals in .rodata, written by the
 * loader before bpf_object__load() (src/tabby/bpf/objects.py, mirror
 * DatapathConfig) and then frozen, so the verifier prunes on them. One build
 * serves every node. Keep the order: the mirror is checked against the
 * .rodata DATASEC of every object.
 */
#ifndef __TABBY_CONFIG_H
#define __TABBY_CONFIG_H

#include <linux/types.h>

const volatile __u32 cfg_vni = 4096; /* VXLAN network identifier */
const volatile __be32 cfg_host_ip = 0; /* this node's underlay address */
const volatile __u32 cfg_log_level = 0; /* 0 off, 1 info, 2 debug */
const volatile __u32 cfg_ctlb_udp = 0; /* connect-time LB also for UDP (mode Enabled) */
/* the node's own netns: its (hostNetwork) sockets get UDP translated in every
 * mode, since no per-packet path serves what the node's stack sends */
const volatile __u64 cfg_host_netns = 0;
/* bpfExternalServiceMode for new flows to external frontends whose backend is
 * a pod on another node: 0 SNAT to this node (kube-proxy), 1 Tunnel, 2 DSR */
const volatile __u32 cfg_ext_mode = 0;
const volatile __u32 cfg_data_ifindex = 0; /* the data interface (ext tunnel out) */
const volatile __u32 cfg_data_mtu = 1500; /* its MTU: what an encapsulated packet must fit */
const volatile __u32 cfg_vxlan_port = 4789; /* UDP port of VXLAN, ext tunnel included */
/* Maglev table size M (a prime; bpfMaglevMaxEndpointsPerService); 0: no table */
const volatile __u32 cfg_maglev_m = 0;
/* bpfRedirectToPeer: 1 forwarded packets skip the node's stack (fwd.h) */
const volatile __u32 cfg_redirect = 0;

#endif /* __TABBY_CONFIG_H */

"""Names derived from resources, shared by the CNI plugin (creates) and the agent (finds)."""

from __future__ import annotations

import hashlib

HOST_IFACE_PREFIX = "tby"
TUNNEL_DEVICE = "tby.vxlan"
POD_GATEWAY = "169.254.1.1"  # Calico's fixed next hop: the node answers for it by proxy ARP
# Calico's IPv6 next hop (the link-local address of MAC ee:ee:ee:ee:ee:ee): every pod's host-side
# veth carries it, so the node itself answers the pod's neighbor solicitation for it
POD_GATEWAY6 = "fe80::ecee:eeff:feee:eeee"


def host_ifname(namespace: str, pod: str) -> str:
    """Host side of a pod's veth: 'tby' + 11 hex digits (15 chars max), like cali*."""
    digest = hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()
    return HOST_IFACE_PREFIX + digest[:11]


TUNNEL_HANDLE_PREFIX = "vxlan-tunnel-addr-"


def tunnel_handle(node: str) -> str:
    """IPAM handle of a node's VXLAN tunnel address."""
    return f"{TUNNEL_HANDLE_PREFIX}{node}"


def block_name(cidr: str) -> str:
    """IPAMBlock object name for a block CIDR (Calico's style: dots and slash become dashes)."""
    return cidr.replace(".", "-").replace(":", "-").replace("/", "-")

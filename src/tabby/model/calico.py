"""Calico-shaped kinds (projectcalico.org/v3): FelixConfiguration, IPPool, BGPConfiguration,
BGPPeer; and tabby's IPAMBlock.

Field names are Calico's so Calico users' manifests apply unchanged.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from tabby.model import calico_selectors
from tabby.model.core import resource
from tabby.model.errors import FieldError
from tabby.model.schema import (
    Struct,
    at,
    boolean,
    cidr,
    enum,
    integer,
    ip,
    key_of,
    list_of,
    map_of,
    port,
    string,
)

_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def _regex(value: Any, path: str) -> str:
    try:
        re.compile(string(value, path))
    except re.error as err:
        raise FieldError(path, f"not a valid regular expression: {err}") from None
    return str(value)


def _duration(value: Any, path: str) -> str:
    if not isinstance(value, str) or not _DURATION.match(value):
        raise FieldError(path, "must be a duration such as 90s or 1m30s")
    return value


_positive = integer(1)
_mtu = integer(0, 65535)  # 0: detect automatically, as in Calico

_felix_spec = Struct(
    {
        "bpfEnabled": boolean,
        "bpfExternalServiceMode": enum("Tunnel", "DSR"),
        "bpfRedirectToPeer": enum("Enabled", "Disabled"),
        "bpfLogLevel": enum("Off", "Info", "Debug"),
        "bpfDataIfacePattern": _regex,
        "bpfConnectTimeLoadBalancing": enum("TCP", "Enabled", "Disabled"),
        "bpfAttachType": enum("TCX", "TC"),
        "bpfKubeProxyHealthzPort": integer(0, 65535),
        "bpfKubeProxyIptablesCleanupEnabled": boolean,
        "bpfMaglevMaxServices": integer(1, 3000),
        "bpfMaglevMaxEndpointsPerService": integer(1, 3000),
        "bpfMapSizeNATFrontend": _positive,
        "bpfMapSizeNATBackend": _positive,
        "bpfMapSizeConntrack": _positive,
        "bpfMapSizeRoute": _positive,
        "vxlanVNI": integer(1, 16777215),
        "vxlanPort": port,
        "vxlanMTU": _mtu,
        "ipipMTU": _mtu,
        "wireguardMTU": _mtu,
        "logSeverityScreen": enum("Debug", "Info", "Warning", "Error", "Fatal"),
        "healthPort": port,
        "prometheusMetricsEnabled": boolean,
        "prometheusMetricsPort": port,
        "routeRefreshInterval": _duration,
        "awsSrcDstCheck": enum("DoNothing", "Enable", "Disable"),
        "wireguardEnabled": boolean,
        "ipv6Support": boolean,
    },
    defaults={"bpfEnabled": True, "vxlanVNI": 4096, "vxlanPort": 4789},
)

felix_configuration = resource(spec=_felix_spec).extend({}, defaults={"spec": {}})

# --- IPPool ------------------------------------------------------------------------------------

_encap = enum("Never", "Always", "CrossSubnet")


def _default_block_size(spec: dict[str, Any]) -> int:
    return 26 if ipaddress.ip_network(spec["cidr"]).version == 4 else 122


def _pool_rules(spec: dict[str, Any], path: str) -> dict[str, Any]:
    net = ipaddress.ip_network(spec["cidr"])
    if not net.prefixlen <= spec["blockSize"] <= net.max_prefixlen:
        raise FieldError(
            at(path, "blockSize"),
            f"must be between the pool's prefix length ({net.prefixlen}) and {net.max_prefixlen}",
        )
    if spec["ipipMode"] != "Never" and spec["vxlanMode"] != "Never":
        raise FieldError(at(path, "vxlanMode"), "ipipMode and vxlanMode cannot both be enabled")
    if net.version == 6:
        for key in ("ipipMode", "vxlanMode"):
            if spec[key] != "Never":  # as Calico: IPv6 pools are routed natively (BGP)
                raise FieldError(
                    at(path, key), f"{spec[key]}: an IPv6 pool is not encapsulated (use Never)"
                )
    return spec


_pool_spec = Struct(
    {
        "cidr": cidr,
        "blockSize": integer(0, 128),
        "ipipMode": _encap,
        "vxlanMode": _encap,
        "natOutgoing": boolean,
        "disabled": boolean,
        "nodeSelector": string,
        "allowedUses": list_of(enum("Workload", "Tunnel", "LoadBalancer")),
    },
    required=("cidr",),
    defaults={
        "blockSize": _default_block_size,
        "ipipMode": "Never",
        "vxlanMode": "Never",
        "natOutgoing": False,
        "disabled": False,
        "nodeSelector": "all()",
        "allowedUses": ["Workload", "Tunnel"],
    },
    post=_pool_rules,
)

ip_pool = resource(spec=_pool_spec).extend({}, required=("metadata", "spec"))

# --- IPAMBlock (tabby-internal) ----------------------------------------------------------------


def _affinity(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.startswith("host:") or len(value) == 5:
        raise FieldError(path, 'must be "host:<node name>"')
    return value


def _block_rules(spec: dict[str, Any], path: str) -> dict[str, Any]:
    net = ipaddress.ip_network(spec["cidr"])
    allocations = {}
    for addr, handle in spec["allocations"].items():
        here = key_of(at(path, "allocations"), addr)
        addr = ip(addr, here)
        if ipaddress.ip_address(addr) not in net:
            raise FieldError(here, f"{addr} is outside the block {net}")
        allocations[addr] = handle
    spec["allocations"] = allocations
    return spec


_block_spec = Struct(
    {"cidr": cidr, "affinity": _affinity, "allocations": map_of(string)},
    required=("cidr",),
    defaults={"allocations": {}},
    post=_block_rules,
)

ipam_block = resource(spec=_block_spec).extend({}, required=("metadata", "spec"))

# --- IPAMHandle (tabby-internal): which address a handle (a container, a tunnel) holds ----------

_handle_spec = Struct(
    {"handle": string, "address": ip, "node": string},
    required=("handle", "address", "node"),
)

ipam_handle = resource(spec=_handle_spec).extend({}, required=("metadata", "spec"))

# --- BGP (the BIRD backend): BGPConfiguration, BGPPeer -----------------------------------------

_as_number = integer(1, 4294967295)


def _selector(value: Any, path: str) -> str:
    """A Calico selector expression (``route-reflector == 'true'``, ``all()``)."""
    try:
        calico_selectors.parse(string(value, path))
    except ValueError as err:
        raise FieldError(path, f"not a valid selector: {err}") from None
    return str(value)


def _peer_ip(value: Any, path: str) -> str:
    """Calico's peerIP: an address, optionally with a port (``10.0.0.1:1179``, ``[fd::1]:179``)."""
    text = string(value, path)
    host, port_text = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    ip(host, path)
    if port_text and not (port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise FieldError(path, f"port {port_text!r} must be an integer 1-65535")
    return text


_bgp_configuration_spec = Struct(
    {
        "logSeverityScreen": enum("Debug", "Info", "Warning", "Error", "Fatal"),
        "nodeToNodeMeshEnabled": boolean,
        "asNumber": _as_number,
        "listenPort": port,
        "nodeMeshMaxRestartTime": _duration,
        # tabby's extension (Calico sets it per BGPPeer only): the mesh's keepalive; hold = 3x
        "nodeMeshKeepaliveTime": _duration,
    },
    defaults={"nodeToNodeMeshEnabled": True, "asNumber": 64512, "listenPort": 179},
)

bgp_configuration = resource(spec=_bgp_configuration_spec).extend({}, defaults={"spec": {}})


def _peer_rules(spec: dict[str, Any], path: str) -> dict[str, Any]:
    if spec.get("node") and spec.get("nodeSelector"):
        raise FieldError(at(path, "nodeSelector"), "cannot be combined with node")
    has_ip, has_sel = bool(spec.get("peerIP")), bool(spec.get("peerSelector"))
    if has_ip == has_sel:
        raise FieldError(at(path, "peerIP"), "needs exactly one of peerIP and peerSelector")
    if has_ip and "asNumber" not in spec:
        raise FieldError(at(path, "asNumber"), "required with peerIP")
    return spec


_bgp_peer_spec = Struct(
    {
        "node": string,
        "nodeSelector": _selector,
        "peerIP": _peer_ip,
        "peerSelector": _selector,
        "asNumber": _as_number,
        "keepaliveTime": _duration,
        "maxRestartTime": _duration,
        "sourceAddress": enum("UseNodeIP", "None"),
    },
    defaults={"sourceAddress": "UseNodeIP"},
    post=_peer_rules,
)

bgp_peer = resource(spec=_bgp_peer_spec).extend({}, required=("metadata", "spec"))


def duration_s(text: str) -> float:
    """Seconds in a Go duration already checked by the schema (``1m30s``, ``500ms``)."""
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(
        float(num) * units[unit]
        for num, _, unit in re.findall(r"(\d+(\.\d+)?)(ns|us|µs|ms|s|m|h)", text)
    )

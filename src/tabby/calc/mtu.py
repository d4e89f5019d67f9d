"""MTU arithmetic: a pod's MTU is the data interface's minus the encapsulation it may pay.

As Calico computes it: every encapsulation the cluster enables (a pool's vxlanMode or ipipMode
not Never, FelixConfiguration wireguardEnabled) gives a candidate — its configured MTU
(``vxlanMTU``, ``ipipMTU``, ``wireguardMTU``; kOps' ``mtu`` sets all three) or the data
interface's MTU minus its overhead — and pods get the smallest, so a packet fits whichever way
it leaves the node. With no encapsulation, pods get the data interface's MTU.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

Encap = Literal["vxlan", "ipip", "none"]
OVERHEAD = {"vxlan": 50, "ipip": 20, "wireguard": 60, "none": 0}
_CONFIGURED = {"vxlan": "vxlanMTU", "ipip": "ipipMTU", "wireguard": "wireguardMTU"}


def pod_mtu(data_mtu: int, encap: Encap) -> int:
    return data_mtu - OVERHEAD[encap]


def encapsulations(felix: Mapping[str, Any], pools: Iterable[Mapping[str, Any]]) -> list[str]:
    """The encapsulations the cluster enables (pools that are not disabled, the config)."""
    out = []
    for pool in pools:
        spec = pool.get("spec", {}) or {}
        if spec.get("disabled"):
            continue
        for key, encap in (("vxlanMode", "vxlan"), ("ipipMode", "ipip")):
            if spec.get(key, "Never") != "Never" and encap not in out:
                out.append(encap)
    if felix.get("wireguardEnabled"):
        out.append("wireguard")
    return out


def encap_mtu(data_mtu: int, felix: Mapping[str, Any], encap: str) -> int:
    """One encapsulation's MTU: configured, else the data MTU minus its overhead."""
    configured = int(felix.get(_CONFIGURED.get(encap, ""), 0) or 0)
    return configured or data_mtu - OVERHEAD[encap]


def workload_mtu(
    data_mtu: int, felix: Mapping[str, Any], pools: Iterable[Mapping[str, Any]]
) -> int:
    """The MTU a pod's interface gets (Calico's veth MTU when the CNI config leaves it 0)."""
    candidates = [encap_mtu(data_mtu, felix, e) for e in encapsulations(felix, pools)]
    return min(candidates, default=data_mtu)

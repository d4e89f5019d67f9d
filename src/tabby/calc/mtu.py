"""MTU arithmetic: a pod's MTU is the data interface's minus the encapsulation it may pay."""

from __future__ import annotations

from typing import Literal

Encap = Literal["vxlan", "ipip", "none"]
OVERHEAD = {"vxlan": 50, "ipip": 20, "none": 0}


def pod_mtu(data_mtu: int, encap: Encap) -> int:
    return data_mtu - OVERHEAD[encap]

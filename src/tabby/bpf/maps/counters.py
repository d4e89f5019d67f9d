"""tby_counters: per-CPU packet counts per reason (enum tby_reason of reasons.h).

The Python enum mirrors the C enum name for name and value; tests/layout checks it against the
BTF of every object (reasons.h anchors the enum in BTF).
"""

from __future__ import annotations

import ctypes
import enum
from typing import Any

from tabby.bpf import libbpf
from tabby.bpf.maps.spec import BPF_MAP_TYPE_PERCPU_ARRAY, MapSpec

C_PREFIX = "TBY_R_"


class Reason(enum.IntEnum):
    """enum tby_reason without its TBY_R_ prefix; append only, like the C enum."""

    PASS_WL_OUT = 0
    PASS_WL_IN = 1
    PASS_NON_IP = 2
    ENCAP_VXLAN = 3
    DECAP_VXLAN = 4
    DROP_MALFORMED = 5
    DROP_SPOOF = 6
    DROP_NO_ROUTE = 7
    DROP_BAD_TUNNEL = 8
    DROP_UNKNOWN_VTEP = 9
    DROP_ETHERTYPE = 10
    DROP_ENCAP_FAIL = 11
    NAT_NEW = 12
    NAT_FWD = 13
    NAT_REV = 14
    NAT_REJECT = 15
    NAT_ICMP_ERR = 16
    NAT_FRAG = 17
    CTLB_CONNECT = 18
    CTLB_SENDMSG = 19
    CTLB_RECVMSG = 20
    DROP_NO_LOCAL = 21
    DROP_SRC_RANGE = 22
    DROP_NAT_FAIL = 23
    DROP_FRAG = 24
    DROP_CT_FULL = 25
    NAT_MASQ = 26
    ENCAP_IPIP = 27
    DECAP_IPIP = 28
    DROP_IPIP_SRC = 29
    DROP_IPIP_FRAG = 30
    EXT_FWD = 31
    EXT_RX = 32
    EXT_REPLY_TUN = 33
    EXT_REPLY_DSR = 34
    EXT_FRAG_NEEDED = 35
    DROP_EXT_SRC = 36
    DROP_EXT_FLOW = 37
    DROP_EXT_TOO_BIG = 38
    DROP_POL_IN = 39
    DROP_POL_OUT = 40
    POL_NEW = 41
    MAGLEV_PICK = 42
    MAGLEV_MISS = 43
    EXT_MOVED = 44
    EXT_REFUSED = 45
    NAT6_NEW = 46
    NAT6 = 47
    POL6_NEW = 48
    DROP_POL6_IN = 49
    DROP_POL6_OUT = 50
    PASS_ND = 51
    FWD_REDIRECT = 52
    FWD_STACK = 53
    FWD_FIB_MISS = 54
    FWD_PEER = 55
    NAT_PORT_CLASH = 56

    @property
    def c_name(self) -> str:
        return C_PREFIX + self.name

    @property
    def label(self) -> str:
        """Lower-case name, as used in dumps and metrics labels (``drop_spoof``)."""
        return self.name.lower()

    @property
    def is_drop(self) -> bool:
        return self.name.startswith("DROP_")


REASON_MAX = len(Reason)  # TBY_REASON_MAX

COUNTERS_SPEC = MapSpec(
    base_name="tby_counters",
    map_type=BPF_MAP_TYPE_PERCPU_ARRAY,
    key_type=ctypes.c_uint32,
    value_type=ctypes.c_uint64,
    max_entries=REASON_MAX,
)


class Counters:
    """Reads tby_counters, summing the per-CPU slots."""

    def __init__(self, bpf_map: libbpf.Map[Any, Any]) -> None:
        self.map = bpf_map

    def get(self, reason: Reason) -> int:
        slots = self.map.lookup(ctypes.c_uint32(reason))
        return sum(slots) if slots is not None else 0

    def read(self) -> dict[str, int]:
        """{reason label: packets over all CPUs} for every reason, zeros included."""
        return {reason.label: self.get(reason) for reason in Reason}

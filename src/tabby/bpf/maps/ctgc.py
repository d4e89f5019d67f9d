"""The conntrack sweep's result map (mirror of types.h) and its timeouts (ct_timeouts.h).

``tby_ct_gc`` writes one ``struct tby_ct_gc_stats`` into slot 0 of ``tby_ct_gc_st`` at the end of
each run; the agent reads it right after the run (``dataplane/conntrack.py``). A map rather than
``.bss``: libbpf 1.1 keeps a stale ``.bss`` image after load, and ``.rodata`` is the shared node
config every object mirrors.
"""

from __future__ import annotations

import ctypes
from typing import Final

from tabby.bpf.maps.spec import BPF_MAP_TYPE_ARRAY, MapSpec


class CtGcStats(ctypes.Structure):
    """struct tby_ct_gc_stats: counts are entries (halves), not pairs."""

    _fields_ = [
        ("started_ns", ctypes.c_uint64),
        ("scanned", ctypes.c_uint64),
        ("kept", ctypes.c_uint64),
        ("expired", ctypes.c_uint64),
        ("stale_udp", ctypes.c_uint64),
        ("orphans", ctypes.c_uint64),
    ]


# TBY_CT_TIMEOUT_<name>_S of ct_timeouts.h (checked by tests/bpf/test_ct_gc.py)
TIMEOUTS_S: Final[dict[str, int]] = {
    "TCP_SYN": 20,  # SYN seen, no SYN-ACK yet
    "TCP_EST": 3600,
    "TCP_FIN": 30,  # FIN both ways
    "TCP_RST": 40,
    "UDP": 60,
    "OTHER": 60,
}


CT_GC_STATS_SPEC = MapSpec("tby_ct_gc_st", BPF_MAP_TYPE_ARRAY, ctypes.c_uint32, CtGcStats, 1)

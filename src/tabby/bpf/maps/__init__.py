"""One module per map family: ctypes mirrors of bpf/include/tabby/types.h, a MapSpec, a manager.

The mirrors are checked against the compiled objects' BTF by tests/layout.
"""

from tabby.bpf.maps.conntrack import CONNTRACK6_SPEC, CONNTRACK_SPEC, FRAGS_SPEC
from tabby.bpf.maps.counters import COUNTERS_SPEC
from tabby.bpf.maps.ctgc import CT_GC_STATS_SPEC
from tabby.bpf.maps.ctlb import (
    CTLB_CONNS6_SPEC,
    CTLB_CONNS_SPEC,
    CTLB_SOCKETS6_SPEC,
    CTLB_SOCKETS_SPEC,
)
from tabby.bpf.maps.maglev import MAGLEV_SPEC
from tabby.bpf.maps.nat import (
    AFFINITY_SPEC,
    BACKENDS6_SPEC,
    BACKENDS_SPEC,
    FRONTENDS6_SPEC,
    FRONTENDS_SPEC,
    SOURCE_RANGES_SPEC,
)
from tabby.bpf.maps.policy import (
    ENDPOINTS6_SPEC,
    ENDPOINTS_SPEC,
    PEERS6_SPEC,
    PEERS_SPEC,
    POL_CT6_SPEC,
    PORTS_SPEC,
)
from tabby.bpf.maps.routes import ROUTES_SPEC, WL_DEVS_SPEC
from tabby.bpf.maps.spec import MapSpec
from tabby.bpf.maps.workloads6 import WORKLOADS6_SPEC

ALL_SPECS: tuple[MapSpec, ...] = (
    ROUTES_SPEC,
    WL_DEVS_SPEC,
    COUNTERS_SPEC,
    FRONTENDS_SPEC,
    BACKENDS_SPEC,
    MAGLEV_SPEC,
    AFFINITY_SPEC,
    SOURCE_RANGES_SPEC,
    CONNTRACK_SPEC,
    FRAGS_SPEC,
    CT_GC_STATS_SPEC,
    CTLB_SOCKETS_SPEC,
    CTLB_CONNS_SPEC,
    FRONTENDS6_SPEC,
    BACKENDS6_SPEC,
    CTLB_SOCKETS6_SPEC,
    CTLB_CONNS6_SPEC,
    CONNTRACK6_SPEC,
    WORKLOADS6_SPEC,
    ENDPOINTS_SPEC,
    PEERS_SPEC,
    PORTS_SPEC,
    ENDPOINTS6_SPEC,
    PEERS6_SPEC,
    POL_CT6_SPEC,
)

__all__ = ["ALL_SPECS", "MapSpec"]

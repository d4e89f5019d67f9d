"""One module per map family: ctypes mirrors of bpf/include/tabby/types.h, a MapSpec, a manager.

The mirrors are checked against the compiled objects' BTF by tests/layout.
"""

from tabby.bpf.maps.counters import COUNTERS_SPEC
from tabby.bpf.maps.routes import ROUTES_SPEC
from tabby.bpf.maps.spec import MapSpec

ALL_SPECS: tuple[MapSpec, ...] = (ROUTES_SPEC, COUNTERS_SPEC)

__all__ = ["ALL_SPECS", "COUNTERS_SPEC", "ROUTES_SPEC", "MapSpec"]

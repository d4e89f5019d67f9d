"""Loading a node's datapath: every entry object, configured for the node, sharing pinned maps.

Invariants:
- all objects of a node are loaded with the same pin root, so the maps declared
  LIBBPF_PIN_BY_NAME (tby_routes, tby_counters, ...) exist once per node and survive restarts:
  loading again on the same pin root reuses them, contents included; a pin this build defines
  differently (an upgrade) is recreated with its entries carried over (``pins.py``); so is
  one given another size by bpfMapSize* (``mapsizes.py``), every entry kept or the old maps
  put back;
- node-specific values (VNI, host IP, log level) are written into ``.rodata`` before load, so
  one build serves every node and no compiler runs on a node.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tabby.bpf import libbpf, mapsizes, pins
from tabby.bpf.maps.counters import COUNTERS_SPEC, Counters
from tabby.bpf.maps.routes import ROUTES_SPEC, RoutesMap
from tabby.bpf.maps.spec import MapSpec

PIN_BASE = "/sys/fs/bpf/tabby"
BPF_DIR_ENV = "TABBY_BPF_DIR"

# entry object -> the programs it holds (names as in SEC functions, <= 15 chars)
ENTRY_OBJECTS: dict[str, tuple[str, ...]] = {
    "tc_from_workload.o": ("tby_from_wl",),
    "tc_to_workload.o": ("tby_to_wl",),
    "tc_tunnel.o": ("tby_tun_egress", "tby_tun_ingress"),
    "tc_from_host.o": ("tby_from_host",),
    "tc_to_host.o": ("tby_to_host",),
    "ct_gc.o": ("tby_ct_gc",),  # not attached: run by dataplane/conntrack.py
    # connect-time LB (dataplane/ctlb.py): cgroup socket hooks + the stale-UDP socket reaper
    "cgroup_ctlb.o": (
        "tby_ctlb_conn4",
        "tby_ctlb_send4",
        "tby_ctlb_recv4",
        "tby_ctlb_peer4",
        "tby_ctlb_conn6",
        "tby_ctlb_send6",
        "tby_ctlb_recv6",
        "tby_ctlb_peer6",
        "tby_ctlb_reap",
    ),
}

_be32 = ctypes.c_uint32.__ctype_be__


# cfg_ext_mode (config.h): what happens to external traffic whose backend is a pod on another
# node. SNAT: kube-proxy's way (the ingress node's address); Tunnel and DSR: bpfExternalServiceMode.
EXT_MODES = {"SNAT": 0, "Tunnel": 1, "DSR": 2}


class DatapathConfig(ctypes.Structure):
    """Mirror of the ``.rodata`` of every entry object (config.h), in declaration order."""

    # .rodata ends where its last variable does, not at a multiple of cfg_host_netns' 8 bytes
    # (whose offset is a multiple of 8 anyway): no tail padding
    _pack_ = 4
    _fields_ = [
        ("cfg_vni", ctypes.c_uint32),
        ("cfg_host_ip", _be32),
        ("cfg_log_level", ctypes.c_uint32),
        ("cfg_ctlb_udp", ctypes.c_uint32),
        ("cfg_host_netns", ctypes.c_uint64),
        ("cfg_ext_mode", ctypes.c_uint32),
        ("cfg_data_ifindex", ctypes.c_uint32),
        ("cfg_data_mtu", ctypes.c_uint32),
        ("cfg_vxlan_port", ctypes.c_uint32),
        ("cfg_maglev_m", ctypes.c_uint32),
        ("cfg_redirect", ctypes.c_uint32),
    ]

    @classmethod
    def build(
        cls,
        vni: int = 4096,
        host_ip: str = "0.0.0.0",
        log_level: int = 0,
        ctlb_udp: bool = False,
        host_netns: int = 0,
        ext_mode: str = "SNAT",
        data_ifindex: int = 0,
        data_mtu: int = 1500,
        vxlan_port: int = 4789,
        maglev_m: int = 0,
        redirect: bool = False,
    ) -> DatapathConfig:
        if not 0 < vni < 1 << 24:
            raise ValueError(f"VNI {vni} is outside 1..16777215")
        return cls(
            cfg_vni=vni,
            cfg_host_ip=int(ipaddress.IPv4Address(host_ip)),
            cfg_log_level=log_level,
            cfg_ctlb_udp=int(ctlb_udp),
            cfg_host_netns=host_netns,
            cfg_ext_mode=EXT_MODES[ext_mode],
            cfg_data_ifindex=data_ifindex,
            cfg_data_mtu=data_mtu,
            cfg_vxlan_port=vxlan_port,
            cfg_maglev_m=maglev_m,
            cfg_redirect=int(redirect),
        )


def default_bpf_dir() -> Path:
    """$TABBY_BPF_DIR, else build/bpf of the source tree this module lives in."""
    env = os.environ.get(BPF_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "build" / "bpf"


def node_pin_root(node: str) -> str:
    """The pin directory of one node; ``node`` carries the lab name (``demo-node1``)."""
    if not node or "/" in node or node in (".", ".."):
        raise ValueError(f"bad node name for a pin directory: {node!r}")
    return f"{PIN_BASE}/{node}"


@dataclass
class _Loaded:
    path: Path
    obj: libbpf.Object


class DatapathObjects:
    """The node's loaded entry objects; program fds by name, typed shared maps.

    Usage: ``with DatapathObjects(pin_root, DatapathConfig.build(...)) as dp: dp.prog_fd(...)``.
    Closing releases our fds only: pinned maps (and pinned links) stay.
    """

    def __init__(
        self,
        pin_root: str,
        config: DatapathConfig,
        bpf_dir: str | Path | None = None,
        map_sizes: Mapping[str, int] | None = None,
    ) -> None:
        """``map_sizes``: map name -> max_entries, instead of the ELF's (``mapsizes.plan``)."""
        self.pin_root = pin_root
        self.config = config
        self.map_sizes = dict(map_sizes or {})
        self.bpf_dir = Path(bpf_dir) if bpf_dir is not None else default_bpf_dir()
        self._loaded: list[_Loaded] = []
        self._prog_owner: dict[str, libbpf.Object] = {}

    def load(self) -> DatapathObjects:
        """Open, configure and load every entry object; all or nothing."""
        missing = [n for n in ENTRY_OBJECTS if not (self.bpf_dir / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"BPF objects missing in {self.bpf_dir}: {', '.join(missing)} (run `make bpf`)"
            )
        os.makedirs(self.pin_root, mode=0o700, exist_ok=True)
        # pins this build defines differently (an upgrade): recreated, entries carried over
        set_aside: list[pins.SetAside] = []
        try:
            for name, progs in ENTRY_OBJECTS.items():
                path = self.bpf_dir / name
                obj = libbpf.Object(str(path), pin_root=self.pin_root)
                self._loaded.append(_Loaded(path, obj))
                obj.set_rodata(self.config)
                for spec in obj.maps():  # every object: they all declare the shared maps
                    if spec.name in self.map_sizes:
                        obj.set_max_entries(spec.name, self.map_sizes[spec.name])
                moved = pins.set_aside_mismatched(obj.maps())
                set_aside += moved
                obj.load()
                for aside in moved:
                    new_fd = obj.map_fd(aside.name)
                    pins.carry_over(aside, new_fd)
                    if aside.name in self.map_sizes:
                        mapsizes.check_kept(aside.name, self.map_sizes, aside.fd, new_fd)
                for prog in progs:
                    self._prog_owner[prog] = obj
        except BaseException:
            self.close()
            pins.put_back(set_aside)
            raise
        finally:
            pins.release(set_aside)
        return self

    def __enter__(self) -> DatapathObjects:
        return self.load()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def objects(self) -> dict[str, libbpf.Object]:
        return {entry.path.name: entry.obj for entry in self._loaded}

    def prog_fd(self, name: str) -> int:
        try:
            obj = self._prog_owner[name]
        except KeyError:
            raise KeyError(f"no program {name!r}; known: {sorted(self._prog_owner)}") from None
        return obj.prog_fd(name)

    def prog_fds(self) -> dict[str, int]:
        return {name: obj.prog_fd(name) for name, obj in self._prog_owner.items()}

    def map(self, spec: MapSpec) -> libbpf.Map[Any, Any]:
        """A shared map through the first object (every object holds the same pinned map)."""
        if not self._loaded:
            raise ValueError("datapath objects are not loaded")
        return spec.open_in(self._loaded[0].obj)

    def routes(self) -> RoutesMap:
        return RoutesMap(self.map(ROUTES_SPEC))

    def counters(self) -> Counters:
        return Counters(self.map(COUNTERS_SPEC))

    def close(self) -> None:
        for entry in self._loaded:
            entry.obj.close()
        self._loaded.clear()
        self._prog_owner.clear()

"""One node's dataplane: loads the BPF objects on its pin root and drives every manager.

``apply(state)`` is called by the agent's worker thread, which lives in the node's network
namespace. Order matters (Felix's sequencer, simplified): the tunnel device exists before
programs attach to it and before kernel routes point at it; BPF routes exist before the
programs that read them see traffic for a new endpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass

from tabby import preflight
from tabby.bpf.objects import DatapathConfig, DatapathObjects
from tabby.calc import names
from tabby.calc.nodestate import NodeState
from tabby.dataplane.attach import AttachManager, Attachment
from tabby.dataplane.routes import KernelRouteManager, RouteMapManager
from tabby.dataplane.tunnel import TunnelManager
from tabby.netlink import links

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyResult:
    errors: list[str]
    warnings: list[str]


class NodeDataplane:
    def __init__(self, pin_root: str, data_iface: str, state: NodeState) -> None:
        self.pin_root = pin_root
        self.data_iface = data_iface
        self.loaded_for = _load_key(state)
        self.objects = _load(pin_root, state)
        self.routes = RouteMapManager(self.objects.routes())
        self.counters = self.objects.counters()
        self.attach = AttachManager(pin_root)
        self.tunnel = TunnelManager(data_iface)
        self.kernel_routes = KernelRouteManager()
        self.bpf_enabled: bool | None = None
        self.tcx_supported = preflight.kernel_version() >= preflight.TCX_KERNEL
        for knob in ("net/ipv4/ip_forward", f"net/ipv4/conf/{data_iface}/rp_filter"):
            links.write_sysctl(knob, "1" if knob.endswith("ip_forward") else "0")

    def _reload_if_needed(self, state: NodeState) -> None:
        """Load-time constants (node IP, VNI, log level) changed: load and swap in new programs."""
        if _load_key(state) == self.loaded_for:
            return
        old = self.objects
        self.objects = _load(self.pin_root, state)
        self.loaded_for = _load_key(state)
        self.attach.programmed.clear()
        old.close()

    def apply(self, state: NodeState) -> ApplyResult:
        warnings = list(state.warnings)
        self._reload_if_needed(state)
        errors = self.tunnel.apply(state.needs_vxlan, state.vni, state.vxlan_port, state.tunnel_ip)
        errors += self.routes.apply(state.routes)
        if state.bpf_enabled != self.bpf_enabled and state.bpf_enabled is False:
            warnings.append("bpfEnabled is false: tabby's programs are detached (disruptive)")
        self.bpf_enabled = state.bpf_enabled
        attach_type = state.attach_type
        if attach_type == "TCX" and not self.tcx_supported:
            attach_type = "TC"
            warnings.append("bpfAttachType TCX needs kernel >= 6.6: using TC (clsact) instead")
        errors += self.attach.apply(self._attachments(state), self.objects.prog_fds(), attach_type)
        errors += self.kernel_routes.apply(state.kernel_routes, state.tunnel_ip)
        return ApplyResult(errors, warnings)

    @staticmethod
    def _attachments(state: NodeState) -> list[Attachment]:
        if not state.bpf_enabled:
            return []
        out = []
        for ifname in state.endpoints:
            out.append(Attachment(ifname, "in", "tby_from_wl"))
            out.append(Attachment(ifname, "eg", "tby_to_wl"))
        if state.needs_vxlan:
            out.append(Attachment(names.TUNNEL_DEVICE, "eg", "tby_tun_egress"))
            out.append(Attachment(names.TUNNEL_DEVICE, "in", "tby_tun_ingress"))
        return out

    def close(self) -> None:
        self.objects.close()


LOG_LEVELS = {"Off": 0, "Info": 1, "Debug": 2}


def _load_key(state: NodeState) -> tuple[str | None, int, str]:
    return state.node_ip, state.vni, state.log_level


def _load(pin_root: str, state: NodeState) -> DatapathObjects:
    config = DatapathConfig.build(
        vni=state.vni, host_ip=state.node_ip or "0.0.0.0", log_level=LOG_LEVELS[state.log_level]
    )
    return DatapathObjects(pin_root, config).load()


def remove_pins(pin_root: str) -> None:
    """Detach everything and drop the maps of one node (lab down, tests): rm of the pins does it."""
    if os.path.isdir(pin_root):
        shutil.rmtree(pin_root)

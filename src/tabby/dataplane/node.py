"""One node's dataplane: loads the BPF objects on its pin root and drives every manager.

``apply(state)`` is called by the agent's worker thread, which lives in the node's network
namespace. Order matters (Felix's sequencer, simplified): the tunnel device exists before
programs attach to it and before kernel routes point at it; BPF routes exist before the
programs that read them see traffic for a new endpoint.

Incremental: each manager's inputs (the parts of the state it reads, plus the kernel facts it
depends on: interface indexes, the data interface's MTU, the loaded objects) are remembered
after it applied them without error, and a manager whose inputs are equal is skipped; NAT is
handed the services that changed. So one endpoint change costs the NAT writes of one service,
not a re-check of links, routes and hooks. A manager that left errors runs again on the next
apply; ``full=True`` (the agent's periodic resync) runs them all.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from tabby import preflight
from tabby.bpf import mapsizes
from tabby.bpf.maps.counters import COUNTERS_SPEC, Counters
from tabby.bpf.maps.maglev import MAGLEV_SPEC
from tabby.bpf.maps.nat import (
    BACKENDS6_SPEC,
    BACKENDS_SPEC,
    FRONTENDS6_SPEC,
    FRONTENDS_SPEC,
    SOURCE_RANGES_SPEC,
)
from tabby.bpf.maps.policy import PolicyMaps
from tabby.bpf.maps.routes import ROUTES_SPEC, WL_DEVS_SPEC, RoutesMap
from tabby.bpf.maps.workloads6 import WORKLOADS6_SPEC
from tabby.bpf.objects import DatapathConfig, DatapathObjects
from tabby.calc import names
from tabby.calc.bird import BirdConfig
from tabby.calc.nodestate import RT_REMOTE_WL, NodeState, Route
from tabby.calc.services import ServiceNAT
from tabby.dataplane.attach import AttachManager, Attachment
from tabby.dataplane.bird import BirdError, BirdManager
from tabby.dataplane.conntrack import ConntrackGC, GcStats
from tabby.dataplane.ctlb import REAPER, CtlbManager
from tabby.dataplane.healthcheck import HealthServers
from tabby.dataplane.kubeproxy import cleanup as kube_proxy_cleanup
from tabby.dataplane.maglev import MaglevConfig
from tabby.dataplane.nat import NatApplyResult, NatManager
from tabby.dataplane.policy import PolicyApplyResult, PolicyManager
from tabby.dataplane.routes import KernelRouteManager, RouteMapManager
from tabby.dataplane.tunnel import TunnelManager
from tabby.dataplane.workloads6 import Workload6Manager
from tabby.netlink import links

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyResult:
    errors: list[str]
    warnings: list[str]


class NodeDataplane:
    # bpfMapSize* refused at the last load (too small for the entries held): not ready while any
    map_size_errors: tuple[str, ...] = ()

    def __init__(
        self,
        pin_root: str,
        data_iface: str,
        state: NodeState,
        cgroup: str | None = None,
        bird_dir: str | None = None,
    ) -> None:
        self.pin_root = pin_root
        self.data_iface = data_iface
        self.loaded_for = _load_key(state, data_iface)
        self.sizes = mapsizes.plan(pin_root, self.loaded_for.map_sizes)
        self.map_size_errors = tuple(self.sizes.refused)
        self.objects = _load(pin_root, self.loaded_for, self.sizes.sizes)
        self._open_maps()
        self.counters = Counters(COUNTERS_SPEC.open_pinned(pin_root))
        self.attach = AttachManager(pin_root)
        self.cgroup = cgroup  # the node's cgroup v2 group: connect-time LB hooks go there
        self.ctlb = CtlbManager(pin_root)
        self.tunnel = TunnelManager(data_iface)
        self.kernel_routes = KernelRouteManager(data_iface)
        # the BIRD backend: None when the agent runs without it (no BGP)
        self.bird = BirdManager(bird_dir) if bird_dir else None
        self.desired_routes: dict[str, Route] = {}  # the last state's, before learnt ones
        self.learned: dict[str, str] = {}  # BGP: prefix -> next hop, as last read from BIRD
        self.bird_config: BirdConfig | None = None
        self.last_nat = NatApplyResult()
        self.wl6_map = WORKLOADS6_SPEC.open_pinned(pin_root)
        self.workloads6 = Workload6Manager(self.wl6_map)
        self.ipv6_forwarding = False
        self.policy_maps = PolicyMaps.open_pinned(pin_root)
        self.policy = PolicyManager(self.policy_maps)
        self.last_policy = PolicyApplyResult()
        self.health = HealthServers()  # kube-proxy's health ports, bound in this netns
        self.bpf_enabled: bool | None = None
        self.kube_proxy_cleaned = False  # once per start (and again if the setting comes back)
        self.wireguard: tuple[bool, str] | None = None  # preflight.wireguard_support(), cached
        self.tcx_supported = preflight.kernel_version() >= preflight.TCX_KERNEL
        self.inputs: dict[str, Any] = {}  # manager -> the inputs it last applied without error
        for knob, value in _node_sysctls(data_iface).items():
            links.write_sysctl(knob, value)

    def _open_maps(self) -> None:
        """Own fds on the pinned maps the managers write (they outlive a reload of the
        objects); opened again after a resize (bpfMapSize*) recreated some: the managers adopt
        what is pinned, the entries carried over."""
        pin_root = self.pin_root
        self.routes = RouteMapManager(
            RoutesMap(ROUTES_SPEC.open_pinned(pin_root)), WL_DEVS_SPEC.open_pinned(pin_root)
        )
        fe, be, src, mg = (
            s.open_pinned(pin_root)
            for s in (FRONTENDS_SPEC, BACKENDS_SPEC, SOURCE_RANGES_SPEC, MAGLEV_SPEC)
        )
        self.nat_maps = [fe, be, src, mg]
        self.nat = NatManager(fe, be, src, mg)
        self.nat6_maps = [s.open_pinned(pin_root) for s in (FRONTENDS6_SPEC, BACKENDS6_SPEC)]
        # IPv6 ClusterIPs (served at connect() only)
        self.nat6 = NatManager(self.nat6_maps[0], self.nat6_maps[1], None, family=6)

    def _close_maps(self) -> None:
        devs = [self.routes.devs] if self.routes.devs is not None else []
        for m in [*self.nat_maps, *self.nat6_maps, self.routes.map.map, *devs]:
            m.close()

    def _reload_if_needed(self, state: NodeState) -> None:
        """Load-time constants (node IP, VNI, log level, external service mode, the data
        interface's index and MTU, the map sizes) changed: load and swap in new programs. Flows
        keep the path they started on: the ext tunnel's mode is on their conntrack entries.
        A map size refused (fewer than its entries) is planned again at every apply."""
        key = _load_key(state, self.data_iface)
        if key == self.loaded_for and not self.map_size_errors:
            return
        sizes = mapsizes.plan(self.pin_root, key.map_sizes)
        self.map_size_errors = tuple(sizes.refused)
        if key == self.loaded_for and sizes.sizes == self.sizes.sizes:
            return
        old = self.objects
        self.objects = _load(self.pin_root, key, sizes.sizes)
        resized = sizes.sizes != self.sizes.sizes
        self.loaded_for, self.sizes = key, sizes
        self.attach.programmed.clear()
        self.inputs.clear()  # new programs: every hook is attached again
        old.close()
        if resized:
            self._close_maps()
            self._open_maps()

    def _run(self, manager: str, inputs: Hashable | object, full: bool) -> bool:
        """Is ``manager`` to run: its inputs differ from the last ones it applied cleanly?"""
        if full or self.inputs.get(manager, _NEVER) != inputs:
            self.inputs.pop(manager, None)
            return True
        return False

    def _ran(self, manager: str, inputs: object, errors: list[str]) -> list[str]:
        if not errors:
            self.inputs[manager] = inputs
        return errors

    def apply(self, state: NodeState, full: bool = False) -> ApplyResult:
        """Everything ``state`` asks for; managers whose inputs did not change are skipped
        unless ``full``."""
        warnings = list(state.warnings)
        self._reload_if_needed(state)
        errors: list[str] = list(self.map_size_errors)
        load = self.loaded_for
        vxlan = (state.needs_vxlan, state.vni, state.vxlan_port, state.tunnel_ip, state.vxlan_mtu)
        tunnel = (vxlan, load.data_mtu, load.data_ifindex)
        tunnel_ran = self._run("tunnel", tunnel, full)
        if tunnel_ran:
            errors += self._ran("tunnel", tunnel, self.tunnel.apply(*vxlan))
        if state.wireguard:
            warnings.append(self._wireguard_refusal())
        if self.bird is not None:
            self.bird_config = state.bird
            errors += self.bird.apply(state.bird)
        self.desired_routes = state.routes
        errors += self.sync_learned_routes(full)
        # services before the programs that read them are attached to new interfaces
        hint = None if full else state.services_changed
        self.last_nat = self.nat.apply(state.services, hint, _maglev_config(state))
        errors += self.last_nat.errors
        warnings += self.last_nat.warnings
        errors += self._apply_nat6(state.services, hint)
        # policies before the programs see a new endpoint (Felix's order)
        if self._run("policy", state.policies, full):
            self.last_policy = self.policy.apply(state.policies)
            errors += self._ran("policy", state.policies, self.last_policy.errors)
        else:
            self.last_policy = PolicyApplyResult()
        # IPv6: the pods' own addresses before the programs judge their packets
        wl6 = {ep.ip6: ifname for ifname, ep in state.endpoints.items() if ep.ip6}
        if self._run("workloads6", wl6, full):
            errors += self._ran("workloads6", wl6, self.workloads6.apply(wl6))
        if state.node_ip6 and not self.ipv6_forwarding:  # as Felix with IPv6 support
            links.write_sysctl("net/ipv6/conf/all/forwarding", "1")
            self.ipv6_forwarding = True
        if state.bpf_enabled != self.bpf_enabled and state.bpf_enabled is False:
            warnings.append("bpfEnabled is false: tabby's programs are detached (disruptive)")
        self.bpf_enabled = state.bpf_enabled
        attach_type = state.attach_type
        if attach_type == "TCX" and not self.tcx_supported:
            attach_type = "TC"
            warnings.append("bpfAttachType TCX needs kernel >= 6.6: using TC (clsact) instead")
        wanted = self._attachments(state)
        # interface indexes: a pod's veth made again under the same name needs its programs
        hooks = (tuple(wanted), attach_type, tuple(_ifindex(a.ifname) for a in wanted))
        if self._run("attach", hooks, full):
            found = self.attach.apply(wanted, self.objects.prog_fds(), attach_type)
            errors += self._ran("attach", hooks, found)
        # the tunnel device made again takes its routes with it
        kroutes = (state.kernel_routes, state.tunnel_ip, state.ipip_mtu, load.data_mtu)
        if self._run("kernel_routes", kroutes, full or tunnel_ran):
            found = self.kernel_routes.apply(state.kernel_routes, state.tunnel_ip, state.ipip_mtu)
            errors += self._ran("kernel_routes", kroutes, found)
        errors += self._apply_ctlb(state, warnings, full)
        if not errors:  # tabby serves every service now: kube-proxy's leftovers can go
            warnings += self._clean_kube_proxy(state)
        # Last, so /healthz says whether everything above is programmed. A port we cannot bind
        # is a warning, as kube-proxy's event: it must not keep the node not ready.
        warnings += self.health.apply(
            state.kube_proxy_healthz_port, state.health_checks, ready=not errors
        )
        return ApplyResult(errors, warnings)

    def _clean_kube_proxy(self, state: NodeState) -> list[str]:
        """kube-proxy's chains and nft tables removed once per agent start while
        bpfKubeProxyIptablesCleanupEnabled (and BPF) is on; a failure is a warning, retried at
        the next apply: tabby's NAT runs before netfilter, so leftovers do not break services."""
        if not (state.kube_proxy_cleanup and state.bpf_enabled):
            self.kube_proxy_cleaned = False  # turned back on later: clean again then
            return []
        if self.kube_proxy_cleaned:
            return []
        result = kube_proxy_cleanup()
        if result.missing_tools:  # once per start: a node image without them cleans nothing
            log.warning(
                "kube-proxy cleanup: %s not installed: kube-proxy rules of those not looked at",
                ", ".join(result.missing_tools),
            )
        if result.removed_anything:
            log.info(
                "kube-proxy leftovers removed: %d chains, %d jumps, nft tables %s",
                result.chains, result.jumps, result.nft_tables or "none",
            )  # fmt: skip
        if result.errors:
            return [f"kube-proxy cleanup: {e}" for e in result.errors]
        self.kube_proxy_cleaned = True
        return []

    def sync_learned_routes(self, full: bool = False) -> list[str]:
        """The route map: the state's routes plus what BGP learnt (called after each apply and
        periodically, as BGP changes without a datastore event)."""
        routes = dict(self.desired_routes)
        errors: list[str] = []
        if self.bird is not None:
            if not self.bird.running():  # it died: start it again (graceful restart)
                errors += self.bird.apply(self.bird_config)
            try:
                learned = self.bird.learned()
            except BirdError as e:
                learned = None
                errors.append(f"BGP: {e}")
            if learned is not None:
                self.learned = learned
            for cidr, next_hop in self.learned.items():
                if cidr not in routes:
                    routes[cidr] = Route(cidr, RT_REMOTE_WL, next_hop=next_hop)
        # a local workload's entry carries its veth's index: a veth made again changes it
        inputs = (routes, tuple(_ifindex(r.ifname) for r in routes.values() if r.ifname))
        if self._run("routes", inputs, full):
            errors += self._ran("routes", inputs, self.routes.apply(routes))
        return errors

    def _apply_nat6(
        self, services: Mapping[str, ServiceNAT], hint: frozenset[str] | None
    ) -> list[str]:
        """IPv6 ClusterIPs: looked at only when a changed service has (or had) an IPv6 part, so
        an IPv4-only change stays O(changed)."""
        nat6 = self.nat6
        if (
            hint is not None
            and not nat6.needs_rescan
            and not any(k in nat6.services or getattr(services.get(k), "ipv6", None) for k in hint)
        ):
            return []
        services6 = {k: svc.ipv6 for k, svc in services.items() if svc.ipv6 is not None}
        return nat6.apply(services6, hint).errors

    def _wireguard_refusal(self) -> str:
        """One line for /readyz: wireguardEnabled is not honoured (probed once, for real)."""
        if self.wireguard is None:
            self.wireguard = preflight.wireguard_support()
        ok, detail = self.wireguard
        if ok:
            why = "tabby does not implement WireGuard encryption yet"
        else:
            why = f"WireGuard is not available on this node ({detail})"
        return f"wireguardEnabled: {why}: pod traffic is NOT encrypted"

    def _apply_ctlb(self, state: NodeState, warnings: list[str], full: bool) -> list[str]:
        """Connect-time LB hooks per bpfConnectTimeLoadBalancing, then (the NAT maps being
        programmed by now) destroy connected UDP sockets whose backend left."""
        mode = state.ctlb_mode if state.bpf_enabled else "Disabled"
        if self.cgroup is None and mode != "Disabled":
            warnings.append("no --cgroup given: connect-time load balancing is off")
        errors: list[str] = []
        hooks = (self.cgroup, mode)  # a reload of the objects clears every input
        if self._run("ctlb", hooks, full):
            errors += self._ran(
                "ctlb", hooks, self.ctlb.apply(self.cgroup, mode, self.objects.prog_fds())
            )
        errors += self.ctlb.reap_stale_udp(
            self.cgroup, self.objects.prog_fd(REAPER), self.last_nat.udp_backends_removed
        )
        return errors

    def sweep_conntrack(self) -> GcStats:
        """One BPF sweep of tby_ct (expired pairs, stale UDP). Call it from the thread that
        applies, never during an apply: the stale-UDP check reads the backend sets."""
        return ConntrackGC.of(self.objects).sweep()  # fds of the current objects (reloads)

    def _attachments(self, state: NodeState) -> list[Attachment]:
        if not state.bpf_enabled:
            return []
        out = [
            Attachment(self.data_iface, "in", "tby_from_host"),
            Attachment(self.data_iface, "eg", "tby_to_host"),
        ]
        for ifname in state.endpoints:
            out.append(Attachment(ifname, "in", "tby_from_wl"))
            out.append(Attachment(ifname, "eg", "tby_to_wl"))
        if state.needs_vxlan:
            out.append(Attachment(names.TUNNEL_DEVICE, "eg", "tby_tun_egress"))
            out.append(Attachment(names.TUNNEL_DEVICE, "in", "tby_tun_ingress"))
        return out

    def close(self) -> None:
        self.health.close()
        self.policy_maps.close()
        self._close_maps()
        self.wl6_map.close()
        self.counters.map.close()
        self.objects.close()


LOG_LEVELS = {"Off": 0, "Info": 1, "Debug": 2}
_NEVER = object()  # no input applied yet


def _ifindex(ifname: str) -> int:
    """The interface's index in this thread's netns (one syscall, no netlink dump); 0: absent."""
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        return 0


def _node_sysctls(data_iface: str) -> dict[str, str]:
    """The node's IP settings the datapath relies on.

    accept_local: a reverse-translated reply carries the node's own address as its source
    (NodePort replies, node-IP frontends) while the kernel still has to forward it; without it
    the kernel drops it as a martian. Pods cannot abuse it: from-workload drops spoofed sources
    before any translation.
    """
    return {
        "net/ipv4/ip_forward": "1",
        f"net/ipv4/conf/{data_iface}/rp_filter": "0",
        "net/ipv4/conf/all/accept_local": "1",
    }


@dataclass(frozen=True)
class _LoadKey:
    """Everything the objects' .rodata is built from: a change means loading them again."""

    node_ip: str | None
    vni: int
    log_level: str
    ctlb_udp: bool
    ext_mode: str
    data_ifindex: int
    data_mtu: int
    vxlan_port: int
    maglev_m: int
    redirect: bool
    map_sizes: tuple[tuple[str, int], ...] = ()  # the bpfMapSize* fields set


def _maglev_config(state: NodeState) -> MaglevConfig:
    return MaglevConfig(state.maglev_max_services, state.maglev_max_endpoints)


def _load_key(state: NodeState, data_iface: str) -> _LoadKey:
    # on every apply: two ioctl-sized calls, not a netlink dump of every link
    index = _ifindex(data_iface)
    mtu = (links.mtu_of(data_iface) if index else None) or 1500
    return _LoadKey(
        state.node_ip,
        state.vni,
        state.log_level,
        state.ctlb_mode == "Enabled",
        state.ext_mode,
        index,
        mtu,
        state.vxlan_port,
        _maglev_config(state).m,
        state.redirect,
        state.map_sizes,
    )


def _load(pin_root: str, key: _LoadKey, sizes: Mapping[str, int]) -> DatapathObjects:
    config = DatapathConfig.build(
        vni=key.vni,
        host_ip=key.node_ip or "0.0.0.0",
        log_level=LOG_LEVELS[key.log_level],
        ctlb_udp=key.ctlb_udp,
        host_netns=links.netns_cookie(),
        ext_mode=key.ext_mode,
        data_ifindex=key.data_ifindex,
        data_mtu=key.data_mtu,
        vxlan_port=key.vxlan_port,
        maglev_m=key.maglev_m,
        redirect=key.redirect,
    )
    return DatapathObjects(pin_root, config, map_sizes=sizes).load()


def remove_pins(pin_root: str) -> None:
    """Detach everything and drop the maps of one node (lab down, tests): rm of the pins does it."""
    if os.path.isdir(pin_root):
        shutil.rmtree(pin_root)

"""PolicyManager: the node's isolated endpoints -> tby_pol_ep / tby_pol_peer / tby_pol_port.

Invariant: a packet never sees half of an endpoint's policy. A changed endpoint is written under
a fresh policy-set id (peers and ports first), then its tby_pol_ep entry is switched to that id
in one write, then the old id's entries are deleted. Endpoints whose compiled entries did not
change are not touched. After a restart the pinned sets are adopted: every endpoint is written
once under a new id and the adopted ids' entries are swept (keys carry the id).
A dual-stack pod's IPv6 address gets the same endpoint value as its IPv4 address (tby_pol_ep6),
switched right after it; its set holds IPv4 and IPv6 peer prefixes in their own tries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tabby.bpf.maps.policy import (
    DIR_IN,
    DIR_OUT,
    EndpointValue,
    Peer6Key,
    PeerKey,
    PolicyFlags,
    PolicyMaps,
    PortKey,
    is_ipv6,
    peer_key,
)
from tabby.calc.policy import CompiledDirection, EndpointPolicy, compile_direction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Programmed:
    set_id: int
    ingress: CompiledDirection
    egress: CompiledDirection
    flags: int
    ip6: str = ""  # the pod's IPv6 address, keyed in tby_pol_ep6 with the same value


@dataclass
class PolicyApplyResult:
    errors: list[str] = field(default_factory=list)
    changed: int = 0  # endpoints (re)written
    removed: int = 0
    writes: int = 0  # map writes and deletes


class PolicyManager:
    def __init__(self, maps: PolicyMaps) -> None:
        self.maps = maps
        self.programmed: dict[str, _Programmed] = {}  # by pod address
        self.next_id = 1
        self.adopted: set[int] | None = None  # set ids found pinned, swept after the first apply
        self.sets: dict[str, int] = {}  # pod address -> set id, for dumps
        self.adopted6: set[str] = set()  # IPv6 endpoints found pinned, kept if still desired

    def _adopt(self) -> None:
        found = self.maps.endpoint_items()
        self.adopted = {v.set for v in found.values()}
        self.next_id = max(self.adopted, default=0) + 1
        # the old entries stay in force until each endpoint is rewritten below
        for addr, v in found.items():
            if is_ipv6(addr):  # known only through its pod's IPv4 address in calc
                self.adopted6.add(addr)
                continue
            self.programmed[addr] = _Programmed(v.set, CompiledDirection(), CompiledDirection(), -1)

    def apply(self, desired: dict[str, EndpointPolicy]) -> PolicyApplyResult:
        res = PolicyApplyResult()
        if self.adopted is None:
            self._adopt()
        for addr, ep in sorted(desired.items()):
            if ep.errors:
                res.errors += [f"policy of {ep.namespace}/{ep.name}: {e}" for e in ep.errors]
                continue  # what is programmed stays
            ingress, egress = compile_direction(ep.ingress), compile_direction(ep.egress)
            flags = (PolicyFlags.ISO_IN if ep.ingress.isolated else 0) | (
                PolicyFlags.ISO_OUT if ep.egress.isolated else 0
            )
            old = self.programmed.get(addr)
            if old and (old.ingress, old.egress, old.flags, old.ip6) == (
                ingress,
                egress,
                int(flags),
                ep.ip6,
            ):
                continue
            new = _Programmed(self._new_id(), ingress, egress, int(flags), ep.ip6)
            try:
                res.writes += self._write_set(new)
                value = EndpointValue(
                    set=new.set_id,
                    flags=new.flags,
                    any_in=ingress.any_proto,
                    any_out=egress.any_proto,
                )
                self.maps.set_endpoint(addr, value)
                res.writes += 1
                if ep.ip6:
                    self.maps.set_endpoint(ep.ip6, value)
                    res.writes += 1
                if old and old.ip6 and old.ip6 != ep.ip6:
                    self._delete_endpoint(old.ip6)
                    res.writes += 1
            except OSError as e:
                res.errors.append(f"policy of {ep.namespace}/{ep.name}: {e}")
                res.writes += self._delete_set(new)
                continue
            self.programmed[addr] = new
            self.sets[addr] = new.set_id
            res.changed += 1
            if old:
                res.writes += self._delete_set(old)
        for addr in sorted(set(self.programmed) - set(desired)):
            old = self.programmed.pop(addr)
            self.sets.pop(addr, None)
            try:
                self.maps.delete_endpoint(addr)
                if old.ip6:
                    self._delete_endpoint(old.ip6)
                res.writes += 1 + self._delete_set(old)
            except OSError as e:
                res.errors.append(f"policy of {addr}: {e}")
            res.removed += 1
        if self.adopted6:
            # IPv6 addresses in use: dual-stack pods' ip6, IPv6-only pods' own keys
            live6 = {p.ip6 for p in self.programmed.values()} | set(self.programmed)
            for addr in sorted(self.adopted6 - live6):
                self._delete_endpoint(addr)
                res.writes += 1
            self.adopted6 = set()
        if self.adopted:
            res.writes += self._sweep_adopted()
        self.adopted = set()
        return res

    def _delete_endpoint(self, addr: str) -> None:
        self.maps.delete_endpoint(addr)  # absent: nothing to do

    def _new_id(self) -> int:
        set_id = self.next_id
        self.next_id += 1
        if self.next_id >= 1 << 31:  # set * 2 + direction must fit 32 bits
            self.next_id = 1
        return set_id

    def _write_set(self, p: _Programmed) -> int:
        peers: list[tuple[PeerKey | Peer6Key, int]] = []
        ports: list[tuple[PortKey, int]] = []
        for d, c in ((DIR_IN, p.ingress), (DIR_OUT, p.egress)):
            set_dir = p.set_id * 2 + d
            peers += [(peer_key(set_dir, cidr), bits) for cidr, bits in c.peers]
            ports += [
                (PortKey.make(set_dir, proto, port, plen), bits)
                for proto, port, plen, bits in c.ports
            ]
        return self.maps.write_batch(peers, ports)

    def _delete_set(self, p: _Programmed) -> int:
        if p.flags == -1:  # adopted: its keys are only known by scanning
            return 0
        peers: list[PeerKey | Peer6Key] = []
        ports: list[PortKey] = []
        for d, c in ((DIR_IN, p.ingress), (DIR_OUT, p.egress)):
            set_dir = p.set_id * 2 + d
            peers += [peer_key(set_dir, cidr) for cidr, _ in c.peers]
            ports += [PortKey.make(set_dir, proto, port, plen) for proto, port, plen, _ in c.ports]
        return self.maps.delete_batch(peers, ports)

    def _sweep_adopted(self) -> int:
        """Entries of sets no endpoint uses any more (adopted from before a restart)."""
        live = {p.set_id for p in self.programmed.values()}
        peers = [k for k in self.maps.peer_keys() if k.set // 2 not in live]
        ports = [k for k in self.maps.port_keys() if k.set // 2 not in live]
        return self.maps.delete_batch(peers, ports)

"""Block IPAM, Calico style: each node claims /26 blocks of an IPPool and assigns from its own.

Two kinds of object, every write a compare-and-swap, so several CNI invocations (several
processes, several nodes) can assign at once:
- ``IPAMBlock`` (cidr, affinity ``host:<node>``, allocations ip -> handle): an address is handed
  out by a CAS on its block, so no address is ever given twice;
- ``IPAMHandle`` (handle -> address): created once per handle, it decides which address a handle
  holds when two assigns for the same handle race (the loser gives its address back). A handle
  is a container's id or a node's tunnel handle; assigning again returns the same address.

Dual-stack: a handle holds at most one address per IP family. Its IPv4 address is recorded in
the IPAMHandle named for the handle, its IPv6 address in the one named ``<handle>.ipv6``; blocks
of one family serve only that family (IPv6 blocks are Calico's /122 by default, and their
first address, the all-zeros one, is never handed out).
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Iterator
from typing import Any

from tabby.calc import names
from tabby.datastore.api import AlreadyExists, Conflict, Datastore, NotFound

Obj = dict[str, Any]
MAX_CAS_RETRIES = 50
API_VERSION = "tabby.dev/v1"


class IPAMError(Exception):
    pass


def handle_object_name(handle: str, family: int = 4) -> str:
    name = handle if family == 4 else f"{handle}.ipv6"
    return re.sub(r"[^a-z0-9.-]", "-", name.lower())[:253]


def _family(cidr_or_ip: str) -> int:
    return 6 if ":" in cidr_or_ip else 4


class BlockIPAM:
    def __init__(self, ds: Datastore) -> None:
        self.ds = ds

    def _blocks(self) -> list[Obj]:
        return self.ds.list("IPAMBlock")[0]

    def lookup(self, handle: str, family: int = 4) -> str | None:
        """The address of ``family`` (4 or 6) ``handle`` holds, or None."""
        obj = self.ds.get("IPAMHandle", handle_object_name(handle, family))
        return str(obj["spec"]["address"]) if obj else None

    def has_pool(self, family: int) -> bool:
        """Whether an enabled IPPool of ``family`` exists (the CNI then assigns from it)."""
        return any(
            _family(p["spec"]["cidr"]) == family and not p["spec"].get("disabled", False)
            for p in self.ds.list("IPPool")[0]
        )

    def assign(self, node: str, handle: str, family: int = 4) -> str:
        """An address of ``family`` for ``handle`` from a block of ``node``, claiming a new
        block if needed."""
        for _ in range(MAX_CAS_RETRIES):
            held = self.lookup(handle, family)
            if held:
                return held
            # an allocation without its handle object: an assign in flight, or one that died
            adopted = _holder(self._blocks(), handle, family)
            ip = adopted or self._allocate(node, handle, family)
            try:
                self.ds.create(_handle_object(handle, ip, node, family))
                return ip
            except AlreadyExists:
                # a concurrent assign of this handle won; unless it holds this very address,
                # give ours back (an allocation entry names the handle, not the process)
                winner = self.lookup(handle, family)
                if winner is not None and winner != ip:
                    self._free(ip, handle)
        raise IPAMError(f"could not assign an address for {handle} on {node}: too much contention")

    def release(self, handle: str) -> list[str]:
        """Free every address ``handle`` holds; returns them (empty when it held none)."""
        freed = _held_by(self._blocks(), handle)
        for ip in freed:
            self._free(ip, handle)
        for family in (4, 6):
            try:
                self.ds.delete("IPAMHandle", handle_object_name(handle, family))
            except NotFound:
                pass
        return freed

    def _allocate(self, node: str, handle: str, family: int) -> str:
        """Write ``handle`` on a free address of one of ``node``'s blocks of ``family`` (CAS);
        returns it."""
        for _ in range(MAX_CAS_RETRIES):
            for block in self._blocks():
                if block["spec"].get("affinity") != f"host:{node}":
                    continue
                if _family(block["spec"]["cidr"]) != family:
                    continue
                free = _first_free(block)
                if free is None:
                    continue
                block["spec"].setdefault("allocations", {})[free] = handle
                try:
                    self.ds.update(block)
                    return free
                except Conflict:
                    break  # somebody else wrote this block: re-read everything
            else:
                self._claim_block(node, family)
        raise IPAMError(f"could not allocate for {handle} on {node}: too much contention")

    def _free(self, ip: str, handle: str) -> None:
        for _ in range(MAX_CAS_RETRIES):
            for block in self._blocks():
                allocs = block["spec"].get("allocations") or {}
                if allocs.get(ip) != handle:
                    continue
                del allocs[ip]
                block["spec"]["allocations"] = allocs
                try:
                    self.ds.update(block)
                    return
                except Conflict:
                    break
            else:
                return  # not (or no longer) held by this handle
        raise IPAMError(f"could not free {ip} of {handle}: too much contention")

    def _claim_block(self, node: str, family: int) -> None:
        taken = {b["spec"]["cidr"] for b in self._blocks()}
        for cidr in self._candidate_blocks(family):
            if cidr in taken:
                continue
            block = {
                "apiVersion": API_VERSION,
                "kind": "IPAMBlock",
                "metadata": {"name": names.block_name(cidr)},
                "spec": {"cidr": cidr, "affinity": f"host:{node}", "allocations": {}},
            }
            try:
                self.ds.create(block)
                return
            except AlreadyExists:
                continue  # another node claimed it first
        raise IPAMError(f"no free block left in any enabled IPv{family} IPPool")

    def _candidate_blocks(self, family: int) -> Iterator[str]:
        pools = [p for p in self.ds.list("IPPool")[0] if not p["spec"].get("disabled", False)]
        if not pools:
            raise IPAMError("no IPPool exists: apply one (tabbyctl apply -f pool.yaml)")
        for pool in pools:
            net = ipaddress.ip_network(pool["spec"]["cidr"], strict=False)
            if net.version != family:
                continue
            size = int(pool["spec"].get("blockSize", 26))
            for block in net.subnets(new_prefix=size):
                yield str(block)


def _handle_object(handle: str, ip: str, node: str, family: int) -> Obj:
    return {
        "apiVersion": API_VERSION,
        "kind": "IPAMHandle",
        "metadata": {"name": handle_object_name(handle, family)},
        "spec": {"handle": handle, "address": ip, "node": node},
    }


def _held_by(blocks: list[Obj], handle: str) -> list[str]:
    return [
        str(ip)
        for block in blocks
        for ip, owner in (block["spec"].get("allocations") or {}).items()
        if owner == handle
    ]


def _holder(blocks: list[Obj], handle: str, family: int) -> str | None:
    held = [ip for ip in _held_by(blocks, handle) if _family(ip) == family]
    return held[0] if held else None


def _first_free(block: Obj) -> str | None:
    net = ipaddress.ip_network(block["spec"]["cidr"], strict=False)
    used = set((block["spec"].get("allocations") or {}).keys())
    # IPv6: skip the all-zeros address (a /64's subnet-router anycast when the block starts one)
    for ip in itertools.islice(net, 0 if net.version == 4 else 1, None):
        if str(ip) not in used:
            return str(ip)
    return None

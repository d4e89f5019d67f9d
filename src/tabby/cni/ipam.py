"""Block IPAM, Calico style: each node claims /26 blocks of an IPPool and assigns from its own.

A block is an ``IPAMBlock`` object (cidr, affinity ``host:<node>``, allocations ip -> handle).
Every change is a compare-and-swap on the block's resourceVersion, so several CNI invocations
(several processes) can assign at once without handing out one address twice. A handle (the
container id, or a node's tunnel handle) owns at most one address: assigning again returns it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

from tabby.calc import names
from tabby.datastore.api import AlreadyExists, Conflict, Datastore

Obj = dict[str, Any]
MAX_CAS_RETRIES = 50


class IPAMError(Exception):
    pass


class BlockIPAM:
    def __init__(self, ds: Datastore) -> None:
        self.ds = ds

    def _blocks(self) -> list[Obj]:
        return self.ds.list("IPAMBlock")[0]

    def lookup(self, handle: str) -> str | None:
        return _holder(self._blocks(), handle)

    def assign(self, node: str, handle: str) -> str:
        """An address for ``handle`` from a block of ``node``, claiming a new block if needed.

        The handle check and the write use one snapshot of the blocks, and the write is a CAS on
        the block: a concurrent assign that got there first fails our CAS, and the retry finds it.
        """
        for _ in range(MAX_CAS_RETRIES):
            blocks = self._blocks()
            existing = _holder(blocks, handle)
            if existing:
                return existing
            for block in blocks:
                if block["spec"].get("affinity") != f"host:{node}":
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
                self._claim_block(node)
        raise IPAMError(f"could not assign an address for {handle} on {node}: too much contention")

    def release(self, handle: str) -> list[str]:
        """Free every address ``handle`` holds; returns them (empty when it held none)."""
        for _ in range(MAX_CAS_RETRIES):
            freed: list[str] = []
            try:
                for block in self._blocks():
                    allocs = block["spec"].get("allocations") or {}
                    mine = [ip for ip, owner in allocs.items() if owner == handle]
                    if not mine:
                        continue
                    for ip in mine:
                        del allocs[ip]
                    block["spec"]["allocations"] = allocs
                    self.ds.update(block)
                    freed.extend(mine)
                return freed
            except Conflict:
                continue
        raise IPAMError(f"could not release {handle}: too much contention")

    def _claim_block(self, node: str) -> None:
        taken = {b["spec"]["cidr"] for b in self._blocks()}
        for cidr in self._candidate_blocks():
            if cidr in taken:
                continue
            block = {
                "apiVersion": "tabby.dev/v1",
                "kind": "IPAMBlock",
                "metadata": {"name": names.block_name(cidr)},
                "spec": {"cidr": cidr, "affinity": f"host:{node}", "allocations": {}},
            }
            try:
                self.ds.create(block)
                return
            except AlreadyExists:
                continue  # another node claimed it first
        raise IPAMError("no free block left in any enabled IPv4 IPPool")

    def _candidate_blocks(self) -> Iterator[str]:
        pools = [p for p in self.ds.list("IPPool")[0] if not p["spec"].get("disabled", False)]
        if not pools:
            raise IPAMError("no IPPool exists: apply one (tabbyctl apply -f pool.yaml)")
        for pool in pools:
            net = ipaddress.ip_network(pool["spec"]["cidr"], strict=False)
            if net.version != 4:
                continue
            size = int(pool["spec"].get("blockSize", 26))
            for block in net.subnets(new_prefix=size):
                yield str(block)


def _holder(blocks: list[Obj], handle: str) -> str | None:
    for block in blocks:
        for ip, owner in (block["spec"].get("allocations") or {}).items():
            if owner == handle:
                return str(ip)
    return None


def _first_free(block: Obj) -> str | None:
    net = ipaddress.ip_network(block["spec"]["cidr"], strict=False)
    used = set((block["spec"].get("allocations") or {}).keys())
    for ip in net:
        if str(ip) not in used:
            return str(ip)
    return None

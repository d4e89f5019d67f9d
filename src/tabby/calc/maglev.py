"""Maglev lookup tables (Eisenbud et al., NSDI 2016), pure: backends -> M slots.

Every node computes the same table for the same backends: the backends are taken in sorted order,
and each one's permutation (offset, skip) comes from a hash of its own "address:port" (blake2b,
never Python's per-process ``hash()``), never from the node, the order of events or the set id.

Properties (tests/unit/test_calc_maglev.py): every backend gets floor(M/N) or ceil(M/N) slots,
and removing one of N backends re-points its own slots and only a small share of the others.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

Backend = tuple[str, int]  # (address, port), as calc.services

DEFAULT_MAX_SERVICES = 100  # bpfMaglevMaxServices
DEFAULT_MAX_ENDPOINTS = 10  # bpfMaglevMaxEndpointsPerService
SLOTS_PER_ENDPOINT = 100  # M >= 100 N keeps the imbalance under about 1% (the paper's advice)
ANNOTATION = "lb.projectcalico.org/external-traffic-strategy"


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def table_size(max_endpoints: int = DEFAULT_MAX_ENDPOINTS) -> int:
    """M: the smallest prime >= 100 x bpfMaglevMaxEndpointsPerService (1009 by default)."""
    m = max(SLOTS_PER_ENDPOINT * max_endpoints, 3)
    while not is_prime(m):
        m += 1
    return m


def _permutation(backend: Backend, m: int) -> tuple[int, int]:
    digest = hashlib.blake2b(f"{backend[0]}:{backend[1]}".encode(), digest_size=16).digest()
    offset = int.from_bytes(digest[:8], "little") % m
    skip = int.from_bytes(digest[8:], "little") % (m - 1) + 1
    return offset, skip


def table(backends: Sequence[Backend], m: int) -> tuple[int, ...]:
    """Slot -> index into sorted(set(backends)); () without backends. ``m`` must be a prime
    larger than the number of backends (each permutation then visits every slot)."""
    if not is_prime(m):
        raise ValueError(f"Maglev table size {m} is not a prime")
    ordered = sorted(set(backends))
    n = len(ordered)
    if not n:
        return ()
    if n > m:
        raise ValueError(f"{n} backends do not fit a Maglev table of {m} slots")
    perms = [_permutation(b, m) for b in ordered]
    nexts = [0] * n
    slots = [-1] * m
    filled = 0
    while True:
        for i in range(n):
            offset, skip = perms[i]
            slot = (offset + nexts[i] * skip) % m
            while slots[slot] >= 0:
                nexts[i] += 1
                slot = (offset + nexts[i] * skip) % m
            slots[slot] = i
            nexts[i] += 1
            filled += 1
            if filled == m:
                return tuple(slots)


def backend_table(backends: Sequence[Backend], m: int) -> tuple[Backend, ...]:
    """Slot -> backend (what tby_maglev holds)."""
    ordered = sorted(set(backends))
    return tuple(ordered[i] for i in table(ordered, m))

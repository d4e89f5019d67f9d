"""Block IPAM over the embedded datastore: blocks per node, idempotent handles, no address twice
even with several processes assigning at once (compare-and-swap on the block)."""

from __future__ import annotations

import ipaddress
import multiprocessing as mp
from pathlib import Path

import pytest

from tabby.calc import names
from tabby.cni.ipam import BlockIPAM, IPAMError
from tabby.datastore import open_datastore

POOL = {
    "apiVersion": "projectcalico.org/v3",
    "kind": "IPPool",
    "metadata": {"name": "p"},
    "spec": {"cidr": "100.96.0.0/24", "blockSize": 26},
}


@pytest.fixture
def url(tmp_path: Path) -> str:
    u = f"sqlite:///{tmp_path}/store.db"
    open_datastore(u).apply([POOL])
    return u


def test_each_node_gets_its_own_block_and_handles_are_idempotent(url: str) -> None:
    ipam = BlockIPAM(open_datastore(url))
    a = ipam.assign("n1", "h-a")
    b = ipam.assign("n2", "h-b")
    assert ipam.assign("n1", "h-a") == a
    blocks = {
        blk["spec"]["cidr"]: blk["spec"]["affinity"]
        for blk in open_datastore(url).list("IPAMBlock")[0]
    }
    assert len(blocks) == 2 and set(blocks.values()) == {"host:n1", "host:n2"}
    for ip, node in ((a, "n1"), (b, "n2")):
        owner = [
            c for c, aff in blocks.items() if ipaddress.ip_address(ip) in ipaddress.ip_network(c)
        ]
        assert blocks[owner[0]] == f"host:{node}"
    assert ipam.release("h-a") == [a] and ipam.lookup("h-a") is None
    assert ipam.release("h-a") == []


def test_a_full_block_spills_into_a_new_one_and_the_pool_can_run_out(url: str) -> None:
    ipam = BlockIPAM(open_datastore(url))
    ips = [ipam.assign("n1", f"h{i}") for i in range(64 * 4)]
    assert len(set(ips)) == 256
    with pytest.raises(IPAMError, match="no free block"):
        ipam.assign("n1", "one-too-many")


def _assign_many(url: str, node: str, start: int, count: int, out: mp.Queue) -> None:
    ipam = BlockIPAM(open_datastore(url))
    out.put((node, [ipam.assign(node, f"{node}-{i}") for i in range(start, start + count)]))


def test_concurrent_processes_never_get_the_same_address(url: str) -> None:
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()
    procs = [
        ctx.Process(target=_assign_many, args=(url, node, 0, 20, out))
        for node in ("n1", "n1", "n2", "n2")
    ]
    # two processes per node share handles 0..19: same handle -> same address, never two
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    by_handle: dict[str, set[str]] = {}
    for node, ips in results:
        for i, ip in enumerate(ips):
            by_handle.setdefault(f"{node}-{i}", set()).add(ip)
    assert all(len(v) == 1 for v in by_handle.values()), "one handle got two addresses"
    all_ips = [next(iter(v)) for v in by_handle.values()]
    assert len(set(all_ips)) == 40, "an address was handed out twice"
    ipam = BlockIPAM(open_datastore(url))
    assert all(ipam.lookup(h) == next(iter(v)) for h, v in by_handle.items())
    allocated = [
        ip for blk in open_datastore(url).list("IPAMBlock")[0] for ip in blk["spec"]["allocations"]
    ]
    assert sorted(allocated) == sorted(all_ips), "a losing assign left its address allocated"


def test_tunnel_handle_naming_is_stable() -> None:
    assert names.tunnel_handle("node1") == "vxlan-tunnel-addr-node1"


def test_dual_stack_handles_hold_one_address_per_family(url: str) -> None:
    ds = open_datastore(url)
    ds.apply([{**POOL, "metadata": {"name": "p6"}, "spec": {"cidr": "fd00:10:96::/120"}}])
    ipam = BlockIPAM(ds)
    assert ipam.has_pool(4) and ipam.has_pool(6)
    a4, a6 = ipam.assign("n1", "h-a"), ipam.assign("n1", "h-a", 6)
    assert ipaddress.ip_address(a4).version == 4
    assert a6 == "fd00:10:96::1", "a /122 block of the IPv6 pool; its all-zeros address skipped"
    assert ipam.assign("n1", "h-a", 6) == a6 and ipam.lookup("h-a", 6) == a6
    assert ipam.lookup("h-a") == a4
    b6 = ipam.assign("n2", "h-b", 6)
    assert b6 == "fd00:10:96::41", "n2 claims the next /122"
    blocks = {b["spec"]["cidr"]: b["spec"]["affinity"] for b in ds.list("IPAMBlock")[0]}
    assert blocks["fd00:10:96::/122"] == "host:n1" and blocks["fd00:10:96::40/122"] == "host:n2"
    assert sorted(ipam.release("h-a")) == sorted([a4, a6])
    assert ipam.lookup("h-a") is None and ipam.lookup("h-a", 6) is None
    # 63 usable addresses per /122 (the all-zeros one is never handed out), 4 blocks per /120
    ips = [ipam.assign("n3", f"x{i}", 6) for i in range(63 * 2)]
    assert len(set(ips)) == len(ips) and b6 not in ips


def test_an_ipv4_only_cluster_has_no_ipv6_pool(url: str) -> None:
    assert not BlockIPAM(open_datastore(url)).has_pool(6)

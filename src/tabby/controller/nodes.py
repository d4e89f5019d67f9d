"""calico-kube-controllers' node controller, for the lab: what a deleted Node held is released.

When a Node object goes (deleted, or the machine came back under a new name: the old name is
deleted, the new one registers), nothing of it may linger: its IPAM blocks would stay taken and
be routed nowhere (every agent warns "block belongs to unknown node"), its IPAMHandles would pin
addresses, and its pods would stay in EndpointSlices. So, for every node name that is held by
something but has no Node object for ``grace_s`` (a node being registered is not raced):

1. its pods are deleted (kube-controller-manager's pod GC of orphaned pods: the lab has no
   kube-controller-manager, this controller plays its part; Kubernetes waits 40 s, we
   ``grace_s``); the EndpointSlice controller then drops them from the slices;
2. its IPAMHandles are deleted;
3. its IPAM blocks (affinity ``host:<node>``) are deleted, with every allocation in them: the
   CIDR is free for the next node that claims one, and with the block gone every agent drops
   the route to it. tabby's IPAM assigns a node's addresses only from that node's own blocks,
   so this frees every address the node held (an address of a handle found in another node's
   block, which tabby never writes, is left and logged, not guessed at).

``stale_names`` is pure. ``sync`` reads the state once and releases what is stale; ``run``
watches Nodes and IPAM blocks and syncs ``grace_s`` after a Node deletion (and every
``resync_s`` regardless, which also covers a deletion that happened while the controller was
down), so a deleted node's blocks are free well within a minute.

BGP peers: tabby has no BGP yet; when it has, a node's peers go with its Node object the same way.
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from tabby.datastore.api import Compacted, Datastore, DatastoreError, Event, NotFound, Obj

log = logging.getLogger(__name__)

GRACE_S = 5.0
RESYNC_S = 30.0
STOP_CHECK_S = 0.5


def _block_owner(block: Obj) -> str:
    return str(block.get("spec", {}).get("affinity", "")).removeprefix("host:")


def holders(blocks: Iterable[Obj], handles: Iterable[Obj], pods: Iterable[Obj]) -> set[str]:
    """Every node name something is held under."""
    out = {_block_owner(b) for b in blocks}
    out |= {str(h.get("spec", {}).get("node", "")) for h in handles}
    out |= {str(p.get("spec", {}).get("nodeName") or "") for p in pods}
    out.discard("")
    return out


def stale_names(
    nodes: Iterable[Obj], blocks: Iterable[Obj], handles: Iterable[Obj], pods: Iterable[Obj]
) -> set[str]:
    """Node names holding blocks, handles or pods without a Node object."""
    present = {n["metadata"]["name"] for n in nodes}
    return holders(blocks, handles, pods) - present


@dataclass
class Released:
    pods: list[str] = field(default_factory=list)  # "ns/name"
    addresses: list[str] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)  # CIDRs

    def __bool__(self) -> bool:
        return bool(self.pods or self.addresses or self.blocks)


class NodeController:
    """The release logic with its memory of when each name was first seen stale."""

    def __init__(self, ds: Datastore, grace_s: float = GRACE_S) -> None:
        self.ds = ds
        self.grace_s = grace_s
        self.missing_since: dict[str, float] = {}

    def sync(self, now: float | None = None) -> Released:
        """Release what every name stale for at least ``grace_s`` held; returns what went."""
        now = time.monotonic() if now is None else now
        nodes, _ = self.ds.list("Node")
        blocks, _ = self.ds.list("IPAMBlock")
        handles, _ = self.ds.list("IPAMHandle")
        pods, _ = self.ds.list("Pod")
        stale = stale_names(nodes, blocks, handles, pods)
        self.missing_since = {n: self.missing_since.get(n, now) for n in stale}
        due = {n for n, since in self.missing_since.items() if now - since >= self.grace_s}
        out = Released()
        if not due:
            return out
        for pod in pods:
            if pod.get("spec", {}).get("nodeName") in due:
                meta = pod["metadata"]
                try:
                    self.ds.delete("Pod", meta["name"], meta.get("namespace"))
                except NotFound:
                    pass
                out.pods.append(f"{meta.get('namespace')}/{meta['name']}")
        doomed = [b for b in blocks if _block_owner(b) in due]
        nets = [ipaddress.ip_network(b["spec"]["cidr"], strict=False) for b in doomed]
        for handle in handles:
            spec = handle.get("spec", {})
            if spec.get("node") not in due:
                continue
            try:
                self.ds.delete("IPAMHandle", handle["metadata"]["name"])
            except NotFound:
                pass
            address = ipaddress.ip_address(spec["address"])
            if any(address in net for net in nets):
                out.addresses.append(str(address))
            else:
                log.warning(
                    "handle %s of gone node %s: %s outside its blocks, left allocated",
                    spec.get("handle"),
                    spec.get("node"),
                    address,
                )
        for block in doomed:
            try:
                self.ds.delete("IPAMBlock", block["metadata"]["name"])
            except NotFound:
                pass
            out.blocks.append(str(block["spec"]["cidr"]))
        for name in due:
            self.missing_since.pop(name, None)
        log.info(
            "nodes %s are gone: released blocks %s, addresses %s, pods %s",
            sorted(due), out.blocks, out.addresses, out.pods,
        )  # fmt: skip
        return out

    def next_due(self) -> float | None:
        """time.monotonic() at which a name now stale becomes due, if any."""
        if not self.missing_since:
            return None
        return min(self.missing_since.values()) + self.grace_s


def _relevant(ev: Event) -> bool:
    return (ev.kind == "Node" and ev.type == "DELETED") or (
        ev.kind == "IPAMBlock" and ev.type == "ADDED"
    )


def run(
    ds: Datastore, stop: threading.Event, grace_s: float = GRACE_S, resync_s: float = RESYNC_S
) -> None:
    """Sync at start, ``grace_s`` after a Node deletion (or a block appearing) and every
    ``resync_s``, until ``stop``. Datastore errors are logged and retried at the next sync."""
    ctl = NodeController(ds, grace_s)
    events: queue.Queue[Event | BaseException] = queue.Queue()

    def pump() -> None:
        wait_s = 0.5
        while not stop.is_set():
            try:
                revision = ds.revision()
                wait_s = 0.5
                for ev in ds.watch(revision, stop):
                    if _relevant(ev):
                        events.put(ev)
            except Compacted:
                continue
            except BaseException as e:  # noqa: BLE001 - handed to the loop, which retries
                events.put(e)
                stop.wait(wait_s)
                wait_s = min(wait_s * 2, 10.0)

    threading.Thread(target=pump, name="node-controller-watch", daemon=True).start()
    next_sync = time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        if now >= next_sync:
            try:
                ctl.sync(now)
            except DatastoreError as e:
                log.warning("node controller: %s (retrying)", e)
            due = ctl.next_due()
            next_sync = min(time.monotonic() + resync_s, due if due is not None else float("inf"))
        try:
            # at most STOP_CHECK_S: ``stop`` is noticed without an event
            item = events.get(timeout=min(STOP_CHECK_S, max(0.0, next_sync - time.monotonic())))
        except queue.Empty:
            continue
        if isinstance(item, BaseException):
            log.warning("node controller watch: %s (rewatching)", item)
            continue
        # A deletion: look now (the name starts its grace) and again when the grace is over.
        next_sync = time.monotonic()

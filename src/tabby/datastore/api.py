"""The datastore contract every backend (embedded sqlite, etcd, Kubernetes API) implements.

Objects are plain dicts in Kubernetes shape (apiVersion, kind, metadata, spec, status).
Every write bumps one global revision; ``metadata.resourceVersion`` is the revision (as a string)
of the object's last write. ``watch`` yields every change with a revision above the one given,
in revision order, and blocks (without sleep-polling) until the next change or ``stop`` is set.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

Obj = dict[str, Any]
EventType = Literal["ADDED", "MODIFIED", "DELETED"]
Outcome = Literal["created", "configured", "unchanged"]


class DatastoreError(Exception):
    """Base of every error a datastore raises; its message is one line a user can act on."""


class NotFound(DatastoreError):
    pass


class AlreadyExists(DatastoreError):
    pass


class Conflict(DatastoreError):
    """An update carried a resourceVersion that is no longer current."""


class Compacted(DatastoreError):
    """A watch asked for history that has been compacted away: relist, then watch again."""


class Unavailable(DatastoreError):
    """The datastore cannot be reached."""


@dataclass(frozen=True)
class Event:
    type: EventType
    kind: str
    obj: Obj  # for DELETED: the object's last state
    revision: int


class Datastore(Protocol):
    def revision(self) -> int: ...

    def list(self, kind: str, namespace: str | None = None) -> tuple[list[Obj], int]:
        """All objects of ``kind`` (in ``namespace`` if given), and the revision read at."""
        ...

    def get(self, kind: str, name: str, namespace: str | None = None) -> Obj | None: ...

    def apply(self, objs: Sequence[Obj]) -> int:
        """Create or replace every object, all or nothing; returns the new revision."""
        ...

    def apply_with_outcomes(self, objs: Sequence[Obj]) -> tuple[int, builtins.list[Outcome]]:
        """As apply, also saying per object whether it was created, configured or unchanged.

        An object equal to the stored one (apart from server-managed metadata) is not written.
        Objects are validated (model.validate) before anything is written.
        """
        ...

    def create(self, obj: Obj) -> Obj:
        """Create; raises AlreadyExists. Returns the stored object."""
        ...

    def update(self, obj: Obj) -> Obj:
        """Replace if ``metadata.resourceVersion`` is current; raises Conflict or NotFound."""
        ...

    def delete(self, kind: str, name: str, namespace: str | None = None) -> int: ...

    def patch(self, kind: str, name: str, namespace: str | None, patch: Obj) -> Obj:
        """JSON merge patch (RFC 7386), validated like apply; returns the stored object."""
        ...

    def watch(
        self, since_revision: int, stop: threading.Event | None = None
    ) -> Iterator[Event]: ...

    def close(self) -> None: ...


@runtime_checkable
class StreamingList(Protocol):
    """A datastore that hands a kind's objects over one at a time, decoded as they are read: a
    reader that keeps a compact form of each (the agent's service index) never holds the whole
    decoded list (20,000 Services and slices decoded at once are ~150 MB)."""

    def iter_list(self, kind: str) -> Iterator[Obj]:
        """Every object of ``kind`` in one consistent read, in list() order."""
        ...


@runtime_checkable
class WatchHealth(Protocol):
    """A datastore whose watch retries a lost connection by itself (etcd, Kubernetes API) says
    while it does: the agent reports not-ready then, long before the watch gives up."""

    def watch_problem(self) -> str | None:
        """Why a watch stream of this datastore is down and retrying now; None while all are up."""
        ...

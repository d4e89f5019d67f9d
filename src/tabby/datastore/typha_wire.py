"""The fan-out wire protocol (``tabby-typha``), shared by the server (fanout/) and the client.

Framing: every message is one JSON object preceded by its length (4 bytes, big-endian), at most
MAX_FRAME_BYTES. Each message names its type in ``"t"``. Version 1:

  client -> server  hello     {"protocol": "tabby-typha", "versions": [1], "name", "kinds"}
  server -> client  welcome   {"version", "server", "kinds", "heartbeat_s"}
                    refused   {"reason"}                       then the server closes
                    snapshot  {"rev", "objs": [obj, ...]}      zero or more chunks, then
                    synced    {"rev"}                          the snapshot is complete at rev
                    events    {"events": [{"type", "kind", "rev", "obj"}, ...]}  revision order
                    bookmark  {"rev"}                          heartbeat; the datastore revision
                    bye       {"reason"}                       then the server closes

After its hello the client sends nothing. A receiver ignores fields it does not know; a new
message type or a changed meaning is a new version. The server picks the newest version both
sides speak and refuses, with a reason naming both sides' versions, when there is none.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

from tabby.datastore.api import DatastoreError

PROTOCOL = "tabby-typha"
VERSIONS = (1,)  # what this code speaks, oldest first
MAX_FRAME_BYTES = 64 << 20
HANDSHAKE_TIMEOUT_S = 10.0
DEAD_AFTER_HEARTBEATS = 3  # silence for this many heartbeats: the peer is gone
DEFAULT_PORT = 5473  # Typha's

Msg = dict[str, Any]
_LEN = struct.Struct(">I")


class ProtocolError(DatastoreError):
    """The peer broke the protocol: a bad frame or an unexpected message."""


class Refused(DatastoreError):
    """The server refused this client (protocol version, kinds); the message says why."""


def frame(msg: Msg) -> bytes:
    """``msg`` encoded as one frame."""
    return raw_frame(json.dumps(msg, separators=(",", ":")).encode())


def raw_frame(body: bytes) -> bytes:
    """A frame around an already-encoded JSON object."""
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _LEN.pack(len(body)) + body


async def read_body(reader: asyncio.StreamReader) -> bytes:
    """The next frame's body, undecoded (a reader that decodes it its own way). Raises
    IncompleteReadError at end of stream and ProtocolError on an oversized frame."""
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(
            f"frame of {size} bytes announced (at most {MAX_FRAME_BYTES}): not a {PROTOCOL} peer?"
        )
    return await reader.readexactly(size)


async def read_frame(reader: asyncio.StreamReader) -> tuple[Msg, int]:
    """The next message and its size on the wire. Raises IncompleteReadError at end of stream
    and ProtocolError on a frame that is not a JSON object with a ``"t"``."""
    body = await read_body(reader)
    size = len(body)
    try:
        msg = json.loads(body)
    except ValueError:
        raise ProtocolError(f"a frame is not JSON: not a {PROTOCOL} peer?") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise ProtocolError(f"a frame has no message type: not a {PROTOCOL} peer?")
    return msg, _LEN.size + size


def hello(name: str, kinds: tuple[str, ...], versions: tuple[int, ...] = VERSIONS) -> Msg:
    return {
        "t": "hello",
        "protocol": PROTOCOL,
        "versions": list(versions),
        "name": name,
        "kinds": list(kinds),
    }


def negotiate(msg: Msg, served: tuple[str, ...]) -> tuple[int | None, str]:
    """The version to speak with the client whose first message is ``msg``, or None and the
    reason to refuse it (one line a user can act on)."""
    if msg.get("t") != "hello" or msg.get("protocol") != PROTOCOL:
        return None, f"expected a {PROTOCOL} hello, got {str(msg.get('t'))[:40]!r}"
    offered = msg.get("versions")
    if not isinstance(offered, list) or not all(isinstance(v, int) for v in offered):
        return None, "hello: versions must be a list of integers"
    common = set(offered) & set(VERSIONS)
    if not common:
        theirs = ", ".join(map(str, offered)) or "none"
        ours = ", ".join(map(str, VERSIONS))
        return None, (
            f"protocol version {theirs} not supported: this server speaks {ours} "
            "(run the same tabby release on agents and typha)"
        )
    kinds = msg.get("kinds", [])
    missing = sorted(set(kinds) - set(served)) if isinstance(kinds, list) else ["?"]
    if missing:
        ours = ", ".join(served)
        return None, f"kinds not served: {', '.join(map(str, missing))} (this server serves {ours})"
    return max(common), ""

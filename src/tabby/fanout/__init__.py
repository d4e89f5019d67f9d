"""The fan-out for large clusters (Typha's role): ``tabby typha`` holds one list + watch on the
datastore and serves every agent over the tabby-typha protocol (datastore/typha_wire.py).

A datastore-side service: it imports datastore and model only. The client agents use lives in
datastore/typha.py (``typha://`` URLs), so that ``open_datastore`` can return it without
importing upward. docs/design/fanout.md has the protocol, back-pressure and resync rules.
"""

from tabby.fanout.server import DEFAULT_KINDS, FanoutServer, Stats, serve

__all__ = ["DEFAULT_KINDS", "FanoutServer", "Stats", "serve"]

"""The one asyncio event loop behind the async datastore clients (etcd, Kubernetes).

The Datastore protocol is synchronous; etcd3aio and lightkube are async-only. Each process runs
one loop in a daemon thread, shared by every datastore instance, because the lab and the CLI
open stores freely without closing them (one thread per store would pile up).
"""

from __future__ import annotations

import asyncio
import os
import threading

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_pid = 0


def shared_loop() -> asyncio.AbstractEventLoop:
    """The process's datastore loop, started on first use."""
    global _loop, _pid
    with _lock:
        if _loop is None or _pid != os.getpid():  # a forked child needs its own
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="tabby-datastore", daemon=True).start()
            _loop, _pid = loop, os.getpid()
        return _loop

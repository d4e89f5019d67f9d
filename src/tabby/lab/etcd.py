"""A private etcd (Debian's etcd-server) for a lab or a test: loopback only, own data dir.

Never 2379/2380 (a system etcd's ports): ports are picked free on 127.0.0.1. The lab also
serves clients on a unix socket in its state dir, because tabby-cni runs inside a node's
network namespace, where 127.0.0.1 is the node's own loopback; a socket path reaches etcd from
every namespace of the host. Whoever starts it stops it by PID (lab: processes.stop).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable

from tabby.datastore import DatastoreError, open_datastore

ETCD = "etcd"
SYSTEM_PORTS = (2379, 2380)
SOCKET_NAME = "etcd.sock:0"  # etcd wants "host:port" in a unix URL; the file gets this name
# One apply is one etcd transaction: let big applies (thousands of objects) through.
MAX_TXN_OPS = 100_000
MAX_REQUEST_BYTES = 64 * 1024 * 1024
HISTORY_REVISIONS = 100_000  # as the embedded store's keep_events


class EtcdError(Exception):
    pass


def binary() -> str | None:
    return shutil.which(ETCD)


def free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in SYSTEM_PORTS:
            return port


def argv(data_dir: str, client_port: int, peer_port: int, unix_socket: bool = False) -> list[str]:
    """etcd's command line; with ``unix_socket`` it also listens on ``<cwd>/etcd.sock:0``
    (start it with the data dir's parent as its working directory)."""
    exe = binary()
    if exe is None:
        raise EtcdError("etcd is not installed (apt-get install etcd-server)")
    client = f"http://127.0.0.1:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    listen = f"{client},unix://{SOCKET_NAME}" if unix_socket else client
    return [
        exe,
        "--name=tabby",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={listen}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=tabby={peer}",
        "--initial-cluster-state=new",
        f"--max-txn-ops={MAX_TXN_OPS}",
        f"--max-request-bytes={MAX_REQUEST_BYTES}",
        "--auto-compaction-mode=revision",
        f"--auto-compaction-retention={HISTORY_REVISIONS}",
        "--log-level=warn",
        "--logger=zap",
    ]


def wait_ready(url: str, timeout_s: float = 20.0, alive: Callable[[], bool] | None = None) -> None:
    """Block until the etcd at ``url`` answers a read."""
    deadline = time.monotonic() + timeout_s
    last = "not started"
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise EtcdError(f"etcd at {url} exited during start-up")
        try:
            ds = open_datastore(url)
            try:
                ds.revision()
                return
            finally:
                ds.close()
        except DatastoreError as e:
            last = str(e)
        time.sleep(0.1)
    raise EtcdError(f"etcd at {url} not ready after {timeout_s:.0f} s: {last}")


def socket_path(work_dir: str) -> str:
    return os.path.join(work_dir, SOCKET_NAME)

"""A real etcd (Debian's etcd-server) for tests: one process on 127.0.0.1, free ports (never
2379/2380), its data in the test's directory; stopped by its PID, restartable on the same ports
and data (an etcd restart as the agents see it)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from tabby.lab import etcd as etcd_proc


class EtcdServer:
    """One etcd process on loopback; restartable on the same ports and data dir."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.client_port, self.peer_port = etcd_proc.free_port(), etcd_proc.free_port()
        self.url = f"etcd://127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = etcd_proc.argv(str(self.work / "data"), self.client_port, self.peer_port)
        with open(self.work / "etcd.log", "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=self.work, stdout=log, stderr=log)
        proc = self.proc
        etcd_proc.wait_ready(self.url, alive=lambda: proc.poll() is None)

    def stop(self) -> None:
        """SIGTERM by PID (then SIGKILL), and reap."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

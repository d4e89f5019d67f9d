"""The agent's long-running process, without the command line around it.

`tabby agent` parses and checks its options with typer, then replaces itself (same PID, so
whatever supervises it sees no change) with ``python -m tabby.agent_process '<options, JSON>'``.
The process that then runs for days holds neither typer, click and rich nor the pydantic that
typer's option parsing imports: about 8 MiB of the 150 MB an agent may use at 20,000 services
(bench/agent_scale.py, bench/datastore_memory.py).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from typing import Any


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def exit_on_sigterm(stop: threading.Event) -> None:
    """SIGTERM: the loops see ``stop``, the process exits 0."""

    def handler(*_: object) -> None:
        stop.set()
        sys.exit(0)

    signal.signal(signal.SIGTERM, handler)


def run(opts: dict[str, Any]) -> int:
    """Run the agent with the options `tabby agent` resolved; the exit status."""
    from tabby.agent import Agent
    from tabby.preflight import PreflightError

    setup_logging(opts["log_level"])
    agent = Agent(
        opts["node"],
        opts["datastore"],
        opts["netns"],
        opts["pin_root"],
        opts["data_iface"],
        opts["health_port"],
        opts["cgroup"],
        bird_dir=opts["bird_dir"],
    )
    exit_on_sigterm(agent.stop)
    try:
        agent.run()
    except PreflightError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run(json.loads(sys.argv[1])))

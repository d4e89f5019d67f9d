"""`tabby agent` (one per node, like calico-node/Felix) and `tabby controller` (the lab's
kube-controller-manager stand-in)."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import typer

from tabby.cli.common import DatastoreOpt

app = typer.Typer(add_completion=False, help="tabby node processes")


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _exit(stop: threading.Event) -> None:
    stop.set()
    sys.exit(0)


@app.command()
def agent(
    node: str = typer.Option(..., help="this node's name (its Node object)"),
    datastore: str = DatastoreOpt,
    netns: str = typer.Option(None, help="node network namespace (lab); default: this one"),
    pin_root: str = typer.Option(None, help="pin directory; default /sys/fs/bpf/tabby/<node>"),
    data_iface: str = typer.Option(None, help="data interface; default: the default route's"),
    health_port: int = typer.Option(9099, help="port of /healthz, /readyz, /metrics (loopback)"),
    log_level: str = typer.Option("info"),
    cgroup: str = typer.Option(
        None, help="the node's cgroup v2 group for connect-time LB hooks; none: CTLB off"
    ),
) -> None:
    """Program this node's dataplane from the datastore, and keep it programmed."""
    from tabby.agent import Agent
    from tabby.bpf.objects import node_pin_root
    from tabby.preflight import PreflightError

    _logging(log_level)
    pins = pin_root or node_pin_root(node)
    a = Agent(node, datastore, netns, pins, data_iface, health_port, cgroup)
    signal.signal(signal.SIGTERM, lambda *_: _exit(a.stop))
    try:
        a.run()
    except PreflightError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(1) from e


@app.command()
def controller(datastore: str = DatastoreOpt, log_level: str = typer.Option("info")) -> None:
    """Keep EndpointSlices in step with Services and Pods (kube-controller-manager's part)."""
    from tabby.controller import endpointslices
    from tabby.datastore import open_datastore

    _logging(log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: _exit(stop))
    endpointslices.run(open_datastore(datastore), stop)

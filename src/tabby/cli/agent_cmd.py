"""`tabby agent` (one per node, like calico-node/Felix), `tabby controller` (the lab's
kube-controller-manager stand-in) and `tabby typha` (the fan-out for large clusters)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

import typer

from tabby import agent_process
from tabby.agent_process import exit_on_sigterm, setup_logging
from tabby.cli.common import DatastoreOpt

app = typer.Typer(add_completion=False, help="tabby node processes")


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
    typha: str = typer.Option(
        None,
        envvar="TABBY_TYPHA",
        help="HOST:PORT of a `tabby typha` fan-out to read through (writes go to --datastore)",
    ),
    networking_backend: str = typer.Option(
        "vxlan",
        envvar="CALICO_NETWORKING_BACKEND",
        help="bird: run BIRD (BGP) as Calico's BIRD backend; vxlan or none: no BGP",
    ),
    bird_dir: str = typer.Option(
        None, help="BIRD's config, socket, pid and log; default /run/tabby/bird/<node>"
    ),
) -> None:
    """Program this node's dataplane from the datastore, and keep it programmed."""
    from tabby.bpf.objects import node_pin_root
    from tabby.cli.common import fail
    from tabby.datastore.typha import typha_url

    if networking_backend not in ("bird", "vxlan", "none"):
        fail(f"--networking-backend {networking_backend!r}: use bird, vxlan or none")
    bird = None
    if networking_backend == "bird":
        bird = bird_dir or f"/run/tabby/bird/{node}"
    opts = {
        "node": node,
        "datastore": typha_url(typha, datastore) if typha else datastore,
        "netns": netns,
        "pin_root": pin_root or node_pin_root(node),
        "data_iface": data_iface,
        "health_port": health_port,
        "cgroup": cgroup,
        "bird_dir": bird,
        "log_level": log_level,
    }
    # the long-running process without the CLI's modules (agent_process.py); same PID
    argv = [sys.executable, "-m", "tabby.agent_process", json.dumps(opts)]
    try:
        os.execv(sys.executable, argv)
    except OSError as e:  # no exec: run here, CLI and all
        typer.secho(f"exec {sys.executable}: {e}; the agent runs in this process", err=True)
    raise typer.Exit(agent_process.run(opts))


@app.command()
def controller(datastore: str = DatastoreOpt, log_level: str = typer.Option("info")) -> None:
    """Keep EndpointSlices in step with Services and Pods (kube-controller-manager's part) and
    release what a deleted Node held: pods, IPAM blocks and addresses (calico-kube-controllers')."""
    from tabby.controller import endpointslices, nodes
    from tabby.datastore import open_datastore

    setup_logging(log_level)
    stop = threading.Event()
    exit_on_sigterm(stop)
    node_ds = open_datastore(datastore)  # its own client: the two loops run in two threads
    threading.Thread(
        target=nodes.run, args=(node_ds, stop), name="node-controller", daemon=True
    ).start()
    endpointslices.run(open_datastore(datastore), stop)


@app.command()
def typha(
    datastore: str = DatastoreOpt,
    listen: str = typer.Option(
        "127.0.0.1:5473", help="HOST:PORT to serve agents on (Typha's port by default)"
    ),
    heartbeat_s: float = typer.Option(5.0, help="seconds between bookmarks (client liveness)"),
    max_queue_frames: int = typer.Option(
        1000, help="frames a client may fall behind before it is dropped (it then resyncs)"
    ),
    log_level: str = typer.Option("info"),
) -> None:
    """Hold one watch on the datastore and serve it to every agent (Typha's role)."""
    import asyncio

    from tabby.cli.common import fail
    from tabby.datastore import DatastoreError, open_datastore
    from tabby.fanout import FanoutServer, serve

    setup_logging(log_level)
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        fail(f"--listen {listen!r}: needs HOST:PORT, as in 127.0.0.1:5473")
    if datastore.startswith("typha://"):
        fail("--datastore: typha serves a real datastore, not another typha")
    try:
        ds = open_datastore(datastore)
    except DatastoreError as e:
        fail(str(e))
    server = FanoutServer(ds, heartbeat_s=heartbeat_s, max_queue_frames=max_queue_frames)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(server, host.strip("[]"), int(port), stop)

    asyncio.run(main())
    ds.close()

"""`tabbyctl node status`: a node's BGP sessions, as `calicoctl node status` shows them.

Asks the node's BIRD through birdc (run in the node's network namespace for a lab node):
one row per BGP session with the peer's address, the peer type (node-to-node mesh, global,
node specific), BIRD's state, since when, the session info and the routes it imported/exported.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from tabby.cli.common import fail

app = typer.Typer(add_completion=False, no_args_is_help=True, help="this node's routing (BGP)")


@app.command()
def status(
    node: str = typer.Option(None, "--node", help="a lab node (with --name)"),
    lab: str = typer.Option("demo", "--name", help="the lab of --node"),
    socket: str = typer.Option(
        None, help="BIRD's control socket (a real node: /run/tabby/bird/<node>/bird.ctl)"
    ),
    output: str = typer.Option("table", "-o", "--output", help="table | json"),
) -> None:
    """Show the BGP sessions of a node's BIRD."""
    from tabby.dataplane.bird import BirdError, sessions
    from tabby.lab.cluster import Lab, LabError
    from tabby.lab.topology import TopologyError

    netns = None
    if socket is None:
        if node is None:
            fail("give --node (a lab node, with --name) or --socket")
        try:
            cluster = Lab(lab)
            socket = cluster.bird_socket(node)
            netns = cluster.plan.fabric_netns if node == "fabric" else cluster.plan.node(node).netns
        except (LabError, TopologyError) as e:
            fail(str(e))
        if cluster.backend != "bird":
            fail(f"lab {lab} runs the {cluster.backend} backend: no BGP (lab up --backend bird)")
    try:
        rows = sessions(socket, netns=netns)
    except BirdError as e:
        fail(str(e))
    if output == "json":
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return
    console = Console(highlight=False, width=max(120, Console().width))
    pid = _pid(os.path.join(os.path.dirname(socket), "bird.pid"))
    console.print(f"BIRD is running{f' (pid {pid})' if pid else ''}.\n")
    for family, of_family in (
        ("IPv4", [r for r in rows if ":" not in r.peer]),
        ("IPv6", [r for r in rows if ":" in r.peer]),
    ):
        console.print(f"{family} BGP status")  # calicoctl's two tables
        if not of_family:
            console.print(f"No {family} peers found.\n")
            continue
        table = Table(box=box.ASCII)
        for col in ("PEER ADDRESS", "PEER TYPE", "STATE", "SINCE", "INFO", "ROUTES IN/OUT"):
            table.add_column(col, no_wrap=True)
        for r in of_family:
            table.add_row(r.peer, r.type, r.state, r.since, r.info, f"{r.imported}/{r.exported}")
        console.print(table)


def _pid(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None

"""`tabbyctl lab ...`: build, inspect, use and remove the namespace lab cluster."""

from __future__ import annotations

import os
import sys
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="the namespace lab cluster")
pod_app = typer.Typer(add_completion=False, no_args_is_help=True, help="lab pods")
app.add_typer(pod_app, name="pod")
console = Console(width=None if sys.stdout.isatty() else 140)
LabelOpt = typer.Option([], help="KEY=VALUE, repeatable")
NameOpt = typer.Option("demo", "--name", help="lab name (prefixes its namespaces, pins, cgroups)")


def _fail(msg: str) -> None:
    typer.secho(msg, fg="red", err=True)
    raise typer.Exit(1)


def _lab(name: str) -> Any:
    from tabby.lab import state
    from tabby.lab.cluster import Lab

    if not state.exists(name):
        _fail(f"lab {name!r} is not up (tabbyctl lab up --name {name})")
    return Lab(name)


@app.command()
def up(
    name: str = NameOpt,
    nodes: int = typer.Option(3, help="number of nodes (without --cluster-spec)"),
    cluster_spec: str | None = typer.Option(
        None,
        "--cluster-spec",
        help="kOps cluster manifest: subnets, node count, pool and encapsulation from it",
    ),
    fabric_mtu: int = typer.Option(1500, help="MTU of the fabric links (9001: AWS jumbo frames)"),
    datastore: str = typer.Option(
        "sqlite",
        help="sqlite (embedded store) | etcd (a private etcd on loopback, stopped by down)",
    ),
    backend: str | None = typer.Option(
        None,
        help="bird: BGP (BIRD on every node and the fabric router) | vxlan: no BGP; "
        "default: the spec's (bird for encapsulationMode ipip), else vxlan",
    ),
) -> None:
    """Build the lab: fabric, nodes, external client, one agent per node."""
    from tabby.cli import cluster as cluster_cli
    from tabby.lab.cluster import Lab, LabError
    from tabby.lab.topology import TopologyError
    from tabby.preflight import PreflightError

    spec = None
    if cluster_spec is not None and nodes != 3:
        console.print("[yellow]warning:[/] --nodes is ignored: the spec's InstanceGroups decide")
    if cluster_spec is not None:
        result = cluster_cli.load(cluster_spec)
        cluster_cli.report(result)  # warnings; errors end here, before anything is built
        spec = result.cluster
    try:
        with console.status(f"bringing lab {name} up") as status:

            def report(message: str) -> None:
                status.update(message)
                console.log(message)

            Lab.up(
                name,
                nodes,
                progress=report,
                cluster=spec,
                fabric_mtu=fabric_mtu,
                datastore=datastore,
                backend=backend,
            )
    except (LabError, TopologyError, PreflightError) as e:
        _fail(str(e))
    console.print(f"lab [bold]{name}[/] is up: `tabbyctl lab status --name {name}`")


@app.command()
def down(name: str = NameOpt) -> None:
    """Remove everything the lab created (namespaces, links, pins, cgroups, processes)."""
    from tabby.lab.cluster import Lab

    Lab.down(name, progress=console.print)


@app.command()
def status(name: str = NameOpt) -> None:
    """Nodes, agents and pods of the lab."""
    from tabby.lab import processes, state

    lab = _lab(name)
    saved = state.read(name)
    nodes = Table(title=f"lab {name}: nodes")
    for col in ("node", "netns", "address", "agent pid", "agent", "revision"):
        nodes.add_column(col)
    for node in lab.plan.nodes:
        try:
            rec = lab.agent_proc(node.name)
            pid, alive = str(rec["pid"]), processes.alive(rec)
        except Exception:  # noqa: BLE001 - shown as missing
            pid, alive = "-", False
        r = lab.readyz(node) if alive else {}
        health = (
            "[green]ready[/]"
            if r.get("ready")
            else ("[red]down[/]" if not alive else "[yellow]not ready[/]")
        )
        nodes.add_row(
            node.name,
            node.netns,
            f"{node.ip}/{node.prefixlen}",
            pid,
            health,
            str(r.get("revision", "-")),
        )
    console.print(nodes)
    pods = Table(title=f"lab {name}: pods")
    for col in ("pod", "node", "ip", "image", "netns", "running"):
        pods.add_column(col)
    for key, rec in sorted(saved.get("pods", {}).items()):
        running = all(processes.alive(p) for p in rec.get("procs", []))
        pods.add_row(
            key,
            rec["node"],
            rec.get("ip", "-"),
            rec.get("image", "-"),
            rec["netns"],
            "yes" if running else "[red]no[/]",
        )
    console.print(pods)
    kubelet = next((p for p in saved.get("procs", []) if p["role"] == "kubelet"), None)
    if kubelet is not None:
        up = "running" if processes.alive(kubelet) else "[red]not running[/]"
        console.print(f"kubelet (Deployments -> pods): pid {kubelet['pid']} {up}")
    console.print(f"datastore: {lab.url}  (export TABBY_DATASTORE to point tabbyctl elsewhere)")
    if lab.backend == "bird":
        console.print(
            f"BGP (BIRD backend): `tabbyctl node status --name {lab.name} --node <node|fabric>`"
        )
    if lab.etcd_url:
        console.print(f"etcd: {lab.etcd_url}  (tabbyctl --datastore {lab.etcd_url} ...)")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec(
    ctx: typer.Context, pod: str = typer.Argument(..., help="[NAMESPACE/]POD"), name: str = NameOpt
) -> None:
    """Run a command inside a pod: its network namespace and its cgroup (`-- CMD ARGS`)."""
    from tabby.lab.processes import enter

    # click consumes the `--` separator itself: any `--` left in ctx.args belongs to the command.
    argv = list(ctx.args)
    if not argv:
        _fail("give a command: tabbyctl lab exec POD -- CMD [ARGS...]")
    lab = _lab(name)
    try:
        netns, cgroup = lab.exec_argv(pod, argv)
    except Exception as e:  # noqa: BLE001
        _fail(str(e))
    enter(f"/run/netns/{netns}", cgroup)
    try:
        os.execvp(argv[0], argv)
    except FileNotFoundError:
        _fail(f"{argv[0]}: command not found")


@pod_app.command("add")
def pod_add(
    pod: str = typer.Argument(..., help="[NAMESPACE/]POD"),
    node: str = typer.Option(..., help="node to run it on"),
    image: str = typer.Option("netexec", help="netexec | nginx | pause"),
    label: list[str] = LabelOpt,
    name: str = NameOpt,
) -> None:
    """Create a pod on a node (through tabby-cni, as kubelet would)."""
    from tabby.datastore.api import DatastoreError
    from tabby.lab.pods import PodError
    from tabby.lab.topology import TopologyError

    namespace, _, pod_name = pod.rpartition("/")
    labels = dict(item.split("=", 1) for item in label) or None
    lab = _lab(name)
    try:
        ip = lab.add_pod(pod_name, node, namespace or "default", image, labels)
    except (PodError, DatastoreError, TopologyError) as e:
        _fail(str(e))
    console.print(f"pod {namespace or 'default'}/{pod_name} on {node}: {ip}")


@pod_app.command("del")
def pod_del(pod: str = typer.Argument(..., help="[NAMESPACE/]POD"), name: str = NameOpt) -> None:
    """Delete a pod (CNI DEL, namespace, cgroup, processes, object)."""
    from tabby.lab.pods import PodError

    namespace, _, pod_name = pod.rpartition("/")
    try:
        _lab(name).del_pod(pod_name, namespace or "default")
    except PodError as e:
        _fail(str(e))
    console.print(f"pod {namespace or 'default'}/{pod_name} deleted")


@app.command()
def kubelet(name: str = NameOpt, log_level: str = typer.Option("info")) -> None:
    """The lab's kubelet + deployment controller (started by `lab up`): each Deployment's
    replicas become lab pods; runs until SIGTERM."""
    import logging
    import signal
    import threading

    from tabby.lab.deployments import Reconciler

    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    lab = _lab(name)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    Reconciler(lab.plan, lab.datastore()).run(stop)


@app.command()
def demo(name: str = NameOpt) -> None:
    """Bring the lab up (if needed), start pods on every node and show them talking."""
    from tabby.lab import demo as demo_mod

    sys.exit(demo_mod.run(name, console))


OnlyOpt = typer.Option([], "--only", help="run only this case id (repeatable)")


@app.command("netpol-matrix")
def netpol_matrix(
    cases: str = typer.Option(..., "--cases", help="cases file (tabby-accept-netpol/1, JSON)"),
    via: str = typer.Option(
        "both", "--via", help="service, pod, both, or pod6 (IPv6 pod addresses, dual-stack lab)"
    ),
    name: str = typer.Option("demo", "--name", help="lab name (must be up)"),
    only: list[str] = OnlyOpt,
    keep: bool = typer.Option(False, "--keep", help="leave the x/y/z model in the lab"),
    matrices: bool = typer.Option(
        False, "--matrices", help="print every probe's matrices, not only those with a wrong cell"
    ),
) -> None:
    """NetworkPolicy reachability matrices (upstream e2e's model) for every case of FILE:
    expected vs observed 9x9 matrices, a summary line; exit 1 on any failed cell."""
    from tabby.lab import netpol

    if via not in ("service", "pod", "both", "pod6"):
        _fail(f"--via must be service, pod, both or pod6, not {via!r}")
    lab = _lab(name)
    try:
        results = netpol.run_file(
            lab,
            cases,
            via,  # type: ignore[arg-type]
            only or None,
            keep_model=keep,
            full=matrices,
        )
    except (netpol.CaseError, OSError) as e:
        _fail(str(e))
        return
    typer.echo(netpol.summary(results))
    if not results or any(r.status == "failed" for r in results):
        raise typer.Exit(1)

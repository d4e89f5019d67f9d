"""tabbyctl: the user's CLI (calicoctl/kubectl shapes). One module per command group."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from tabby.cli import bench, bpf, cluster, kubeproxy, lab, node, resources

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="tabby: an eBPF dataplane for Kubernetes"
)
resources.register(app)
app.add_typer(lab.app, name="lab")
app.add_typer(bpf.app, name="bpf")
app.add_typer(cluster.app, name="cluster")
app.add_typer(kubeproxy.app, name="kube-proxy")
app.command(name="bench")(bench.bench)
app.add_typer(node.app, name="node")


@app.command()
def preflight(mount: bool = typer.Option(True, help="mount bpffs if it is missing")) -> None:
    """Check (and fix what is safe to fix) what this host needs before tabby can run."""
    from tabby.preflight import run_checks

    checks = run_checks(mount=mount)
    table = Table(title="tabby pre-flight")
    for col in ("check", "status", "detail"):
        table.add_column(col)
    for c in checks:
        status = "[green]ok[/]" if c.ok else ("[red]MISSING[/]" if c.required else "[yellow]no[/]")
        table.add_row(c.name, status, c.detail)
    Console().print(table)
    missing = [c.name for c in checks if c.required and not c.ok]
    if missing:
        typer.secho(f"missing: {', '.join(missing)}", fg="red", err=True)
        raise typer.Exit(1)


if __name__ == "__main__":
    app()

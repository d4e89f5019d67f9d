"""`tabbyctl cluster ...`: kOps cluster specs (kops.k8s.io/v1alpha2) validated and rendered.

``validate`` prints one line per error and per warning (warnings never fail); ``render`` prints
the FelixConfiguration and IPPool the spec means as YAML for ``tabbyctl apply -f -``, with the
agent settings (backend, CIDRs, node count...) as a comment header that apply ignores.
"""

from __future__ import annotations

import json

import typer
import yaml

from tabby.cli.common import err_console, fail, warn
from tabby.cli.manifests import ManifestError, load_manifests
from tabby.model import kops

app = typer.Typer(add_completion=False, no_args_is_help=True, help="kOps cluster specs")
FileOpt = typer.Option(
    ..., "-f", "--filename", help="kOps manifest (Cluster + InstanceGroups; - for stdin)"
)


def load(source: str) -> kops.Validation:
    """Read and validate a kOps manifest; a file that cannot be read is one line and exit 1."""
    try:
        docs = load_manifests(source)
    except ManifestError as err:
        fail(str(err))
    return kops.parse(docs)


def report(result: kops.Validation) -> None:
    """Warnings (yellow) then errors (red) on stderr; exit 1 when there are errors."""
    for w in result.warnings:
        warn(str(w))
    for e in result.errors:
        err_console.print(f"error: {e}", style="red", markup=False)
    if result.errors:
        raise typer.Exit(1)


@app.command()
def validate(filename: str = FileOpt) -> None:
    """Check a kOps cluster spec against the rules of kOps' Calico networking."""
    result = load(filename)
    report(result)
    c = result.cluster
    assert c is not None
    mode = kops.agent_settings(c)["mode"]
    print(
        f"{filename}: valid: Cluster {c.name}, {len(c.instance_groups)} InstanceGroups, "
        f"{c.nodes} nodes, {c.calico.encapsulation} {mode}, "
        f"{len(result.warnings)} warning(s)"
    )


@app.command()
def render(
    filename: str = FileOpt,
    output: str = typer.Option("yaml", "-o", "--output", help="yaml | json"),
) -> None:
    """Print the FelixConfiguration and IPPool(s) the spec means, for `tabbyctl apply -f -`."""
    if output not in ("yaml", "json"):
        fail(f"--output {output!r}: use yaml or json")
    result = load(filename)
    report(result)
    assert result.cluster is not None
    objs = kops.render(result.cluster)
    settings = kops.agent_settings(result.cluster)  # JSON: the resources only (a List)
    if output == "json":
        print(json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}, indent=2))
        return
    header = yaml.safe_dump(settings, sort_keys=False).splitlines()
    print(f"# rendered from {filename} by tabbyctl cluster render")
    print("# agent settings:")
    for line in header:
        print(f"#   {line}")
    print(yaml.safe_dump_all(objs, sort_keys=False), end="")

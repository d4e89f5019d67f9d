"""tabbyctl kube-proxy off|on|status: the kube-proxy hand-over, as Calico's eBPF docs do it.

``off`` patches the kube-proxy DaemonSet's pod template with the nodeSelector
``non-calico: "true"``, a label no node carries, so the DaemonSet controller removes kube-proxy
from every node (seed 001: ``kubectl patch ds -n kube-system kube-proxy -p
'{"spec":{"template":{"spec":{"nodeSelector":{"non-calico": "true"}}}}}'``); ``on`` removes that
key again (a merge patch setting it to null), and nothing else of the DaemonSet changes. Each
tabby agent then removes what kube-proxy left on its node while FelixConfiguration
``bpfKubeProxyIptablesCleanupEnabled`` is true (dataplane/kubeproxy.py).

Kubernetes datastore only: kube-proxy is a DaemonSet in the API server; the embedded and etcd
stores have none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from tabby.cli.common import DatastoreOpt, fail, one_line_errors, open_store, warn
from tabby.datastore import Datastore

if TYPE_CHECKING:  # lightkube is imported only by the commands that need it
    from tabby.datastore.kubernetes import KubernetesDatastore

SELECTOR_KEY, SELECTOR_VALUE = "non-calico", "true"

app = typer.Typer(
    no_args_is_help=True,
    help="kube-proxy hand-over on the Kubernetes datastore: off moves kube-proxy's DaemonSet off "
    "every node (tabby replaces it), on brings it back",
)
NamespaceOpt = typer.Option("kube-system", "--namespace", "-n", help="kube-proxy's namespace")
NameOpt = typer.Option("kube-proxy", "--name", help="kube-proxy's DaemonSet")


def _kubernetes(url: str) -> KubernetesDatastore:
    from tabby.datastore.kubernetes import KubernetesDatastore

    ds: Datastore = open_store(url)
    if not isinstance(ds, KubernetesDatastore):
        ds.close()
        fail(
            f"datastore {url!r}: the kube-proxy hand-over needs the Kubernetes datastore "
            "(--datastore kubernetes): kube-proxy is a DaemonSet in the API server"
        )
    return ds


def _selector(ds: KubernetesDatastore, namespace: str, name: str) -> dict[str, Any]:
    obj = ds.get_daemonset(namespace, name)
    if obj is None:
        fail(f"daemonset {namespace}/{name} not found (is kube-proxy installed as a DaemonSet?)")
    spec = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    return dict(spec.get("nodeSelector") or {})


def _patch(ds: KubernetesDatastore, namespace: str, name: str, value: str | None) -> None:
    patch = {"spec": {"template": {"spec": {"nodeSelector": {SELECTOR_KEY: value}}}}}
    ds.merge_patch_daemonset(namespace, name, patch)


@app.command()
def off(datastore: str = DatastoreOpt, namespace: str = NamespaceOpt, name: str = NameOpt) -> None:
    """Take kube-proxy off every node (nodeSelector non-calico=true); tabby serves services."""
    ds = _kubernetes(datastore)
    try:
        with one_line_errors():
            if _selector(ds, namespace, name).get(SELECTOR_KEY) == SELECTOR_VALUE:
                typer.echo(f"daemonset.apps/{name} unchanged (kube-proxy is already off)")
                return
            felix = ds.get("FelixConfiguration", "default") or {}
            if (felix.get("spec") or {}).get("bpfEnabled") is False:
                warn("FelixConfiguration default has bpfEnabled false: no node proxies services")
            _patch(ds, namespace, name, SELECTOR_VALUE)
        typer.echo(
            f"daemonset.apps/{name} patched: nodeSelector {SELECTOR_KEY}={SELECTOR_VALUE}; "
            "kube-proxy leaves every node and tabby's agents remove its rules"
        )
    finally:
        ds.close()


@app.command()
def on(datastore: str = DatastoreOpt, namespace: str = NamespaceOpt, name: str = NameOpt) -> None:
    """Bring kube-proxy back on every node (removes the non-calico nodeSelector)."""
    ds = _kubernetes(datastore)
    try:
        with one_line_errors():
            if SELECTOR_KEY not in _selector(ds, namespace, name):
                typer.echo(f"daemonset.apps/{name} unchanged (kube-proxy is already on)")
                return
            _patch(ds, namespace, name, None)
        typer.echo(
            f"daemonset.apps/{name} patched: nodeSelector {SELECTOR_KEY} removed; set "
            "bpfKubeProxyIptablesCleanupEnabled false, or tabby agents that restart remove "
            "kube-proxy's rules again"
        )
    finally:
        ds.close()


@app.command()
def status(
    datastore: str = DatastoreOpt, namespace: str = NamespaceOpt, name: str = NameOpt
) -> None:
    """Say whether kube-proxy's DaemonSet is off (handed over to tabby) or on."""
    ds = _kubernetes(datastore)
    try:
        with one_line_errors():
            selector = _selector(ds, namespace, name)
        state = "off" if selector.get(SELECTOR_KEY) == SELECTOR_VALUE else "on"
        typer.echo(f"kube-proxy is {state} (daemonset {namespace}/{name}, nodeSelector {selector})")
    finally:
        ds.close()

"""`make demo`: a lab with pods on every node, talking across nodes and subnets, left running.

The probes are real connections from the client pod's namespace; the table shows the source
address each server saw, so "no SNAT between pods" is visible, not claimed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from tabby.lab import demo_source_ip, state, traffic
from tabby.lab.cluster import Lab, LabError
from tabby.lab.topology import EXTERNAL_CLIENT_IP


def _cell(ok: bool, text: str) -> str:
    return f"[green]{text}[/]" if ok else f"[red]{text}[/]"


def _probe(fn: Callable[..., str], *args: object) -> str:
    ok, text = traffic.reachable(lambda: fn(*args))
    return _cell(ok, text)


def _bring_up(name: str, console: Console) -> Lab:
    if state.exists(name):
        console.print(f"lab {name} is already up: reusing it")
        return Lab(name)
    with console.status(f"bringing lab {name} up") as status:

        def report(message: str) -> None:
            status.update(message)
            console.log(message)

        return Lab.up(name, 3, progress=report)


def run(name: str, console: Console) -> int:
    try:
        lab = _bring_up(name, console)
    except LabError as e:
        console.print(f"[red]{e}[/]")
        return 1
    existing = state.read(name).get("pods", {})
    wanted = [(f"web-{i}", node.name, "netexec") for i, node in enumerate(lab.plan.nodes, 1)]
    wanted += [
        ("nginx-pod", lab.plan.nodes[-1].name, "nginx"),
        ("client", lab.plan.nodes[0].name, "netexec"),
    ]
    for pod, node, image in wanted:
        if f"default/{pod}" not in existing:
            labels = {"app": "web" if pod.startswith("web-") else pod, "pod": pod}
            ip = lab.add_pod(pod, node, image=image, labels=labels, wait=False)
            console.log(f"pod {pod} ({image}) on {node}: {ip}")
    lab.wait_ready()
    client = lab.pod("client")
    table = Table(title=f"from pod client ({client['ip']} on {client['node']})")
    for col in ("to", "path", "TCP: server says", "TCP: source the server saw", "UDP"):
        table.add_column(col)
    ok_all = True
    for pod_name, _, image in wanted[:-1]:
        target = lab.pod(pod_name)
        here, there = lab.plan.node(client["node"]), lab.plan.node(target["node"])
        path = (
            "same node"
            if here == there
            else (
                "VXLAN, same subnet" if here.subnet == there.subnet else "VXLAN, across the router"
            )
        )
        netns, ip = client["netns"], target["ip"]
        if image == "nginx":
            cells = [_probe(traffic.http_get, netns, ip, 80, "/")]
            cells += ["(nginx access log: see below)", "-"]
        else:
            cells = [
                _probe(traffic.http_get, netns, ip, 8080, "/hostname"),
                _probe(traffic.http_get, netns, ip, 8080, "/clientip"),
                _probe(traffic.udp_request, netns, ip, 8081, b"hostname"),
            ]
        ok_all &= "[red]" not in "".join(cells)
        table.add_row(f"{pod_name} {target['ip']} ({target['node']})", path, *cells)
    console.print(table)
    access_log = f"{state.lab_dir(name)}/nginx-{lab.pod('nginx-pod')['netns']}.access.log"
    console.print(f"nginx's own access log ({access_log}), last line:")
    with open(access_log) as f:
        lines = f.read().splitlines()
    console.print("  " + (lines[-1] if lines else "(empty)"))
    ok_all &= _services(lab, console)
    ok_all &= _source_ip(lab, console)
    web2 = lab.pod("web-2")["ip"]
    console.print(
        "\nThe lab is running. Explore it:\n"
        "  .venv/bin/tabbyctl lab status                  nodes, agents, pods\n"
        "  .venv/bin/tabbyctl get pods -o wide            the datastore\n"
        f"  .venv/bin/tabbyctl lab exec client -- curl -s http://{web2}:8080/clientip\n"
        "  .venv/bin/tabbyctl lab pod add web-4 --node node2\n"
        "  .venv/bin/tabbyctl bpf nat dump --node node1    services as node1's BPF maps hold them\n"
        "  .venv/bin/tabbyctl bpf conntrack dump --node node1\n"
        "  .venv/bin/tabbyctl patch felixconfiguration default "
        '--patch=\'{"spec": {"bpfExternalServiceMode": "DSR"}}\'\n'
        f"  .venv/bin/tabbyctl lab exec client -- curl -s http://{lab.plan.nodes[0].ip}:30604/\n"
        "  .venv/bin/tabbyctl bpf conntrack dump --node node2 --type EXT   forwarded flows\n"
        "Tear it down: make down   (or .venv/bin/tabbyctl lab down)"
    )
    return 0 if ok_all else 1


WEB_VIP, EMPTY_VIP, WEB_NODEPORT = "100.64.0.10", "100.64.0.11", 30080


def _service(name: str, vip: str, app: str, **spec: object) -> dict[str, object]:
    ports = [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
        {"name": "dns", "port": 53, "targetPort": "udp", "protocol": "UDP"},
    ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": vip, "selector": {"app": app}, "ports": ports, **spec},
    }


def _services(lab: Lab, console: Console) -> bool:
    """kube-proxy's job, done in BPF: a ClusterIP and NodePort service over the web pods."""
    web = _service("web", WEB_VIP, "web", type="NodePort")
    web["spec"]["ports"][0]["nodePort"] = WEB_NODEPORT  # type: ignore[index]
    lab.datastore().apply([web, _service("empty", EMPTY_VIP, "nothing")])
    lab.wait_ready()
    client = lab.pod("client")
    table = Table(title="services (no iptables, no IPVS: NAT in BPF on every node)")
    for col in ("from", "to", "answers (12 tries)", "source the server saw"):
        table.add_column(col)
    rows = [("pod client", client["netns"], WEB_VIP, 80)]
    rows += [
        (f"external {EXTERNAL_CLIENT_IP}", lab.plan.external_netns, n.ip, WEB_NODEPORT)
        for n in lab.plan.nodes
    ]
    ok = True
    for who, netns, ip, port in rows:
        answers = [
            traffic.reachable(functools.partial(traffic.http_get, netns, ip, port, "/hostname"))
            for _ in range(12)
        ]
        good = all(a[0] for a in answers)
        names = sorted({a[1] for a in answers}) if good else [answers[-1][1]]
        ok &= good
        source = _probe(traffic.http_get, netns, ip, port, "/clientip")
        table.add_row(who, f"{ip}:{port}", _cell(good, ", ".join(names)), source)
    refused = traffic.reachable(lambda: traffic.http_get(client["netns"], EMPTY_VIP, 80, "/"))
    table.add_row(
        "pod client",
        f"{EMPTY_VIP}:80 (no endpoints)",
        _cell(not refused[0] and "refused" in refused[1].lower(), refused[1]),
        "-",
    )
    console.print(table)
    return ok


def _source_ip(lab: Lab, console: Console) -> bool:
    """Seed 001: the client's address in nginx's access log, tabby (Tunnel, DSR) vs kube-proxy."""
    with console.status("seed 001: nginx Deployment + NodePort 30604, curled from outside"):
        rows = demo_source_ip.run(lab)
    table = Table(
        title=f"curl http://<node>:30604 from the external client {EXTERNAL_CLIENT_IP}: "
        "what nginx logged"
    )
    for col in ("datapath", "node curled", "nginx on", "client in nginx's access log"):
        table.add_column(col)
    for r in rows:
        seen = _cell(r.ok and r.real_ip, r.logged) if r.path.startswith("tabby") else r.logged
        table.add_row(r.path, r.node, r.nginx_on, seen)
    console.print(table)
    console.print(
        "tabby keeps the client's address on every node (Tunnel: replies return through the "
        "node curled; DSR: the nginx node answers directly); kube-proxy's NodePort masquerades "
        "it to the node's."
    )
    return all(r.ok for r in rows) and all(r.real_ip for r in rows if r.path.startswith("tabby"))

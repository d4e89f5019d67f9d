"""`make demo`: a lab with pods on every node, talking across nodes and subnets, left running."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from tabby.lab import state, traffic
from tabby.lab.cluster import Lab, LabError


def run(name: str, console: Console) -> int:
    if state.exists(name):
        console.print(f"lab {name} is already up: reusing it")
        lab = Lab(name)
    else:
        try:
            with console.status(f"bringing lab {name} up") as st:
                lab = Lab.up(name, 3, progress=lambda m: (st.update(m), console.log(m)))
        except LabError as e:
            console.print(f"[red]{e}[/]")
            return 1
    pods = state.read(name).get("pods", {})
    for i, node in enumerate(lab.plan.nodes, start=1):
        if f"default/web-{i}" not in pods:
            ip = lab.add_pod(f"web-{i}", node.name)
            console.log(f"pod web-{i} on {node.name}: {ip}")
    if "default/client" not in pods:
        lab.add_pod("client", lab.plan.nodes[0].name, image="netexec")
    client = lab.pod("client")
    table = Table(title=f"from pod client ({client['ip']}, {client['node']})")
    for col in ("to", "node", "path", "TCP /hostname", "TCP /clientip (seen source)", "UDP"):
        table.add_column(col)
    ok_all = True
    for i in range(1, len(lab.plan.nodes) + 1):
        pod = lab.pod(f"web-{i}")
        path = (
            "same node"
            if pod["node"] == client["node"]
            else "VXLAN, "
            + (
                "same subnet"
                if lab.plan.node(pod["node"]).subnet == lab.plan.node(client["node"]).subnet
                else "across the router"
            )
        )
        ok1, host = traffic.reachable(
            lambda p=pod: traffic.http_get(client["netns"], p["ip"], 8080, "/hostname")
        )
        ok2, seen = traffic.reachable(
            lambda p=pod: traffic.http_get(client["netns"], p["ip"], 8080, "/clientip")
        )
        ok3, udp = traffic.reachable(
            lambda p=pod: traffic.udp_request(client["netns"], p["ip"], 8081, b"hostname")
        )
        ok_all &= ok1 and ok2 and ok3
        mark = lambda ok, s: f"[green]{s}[/]" if ok else f"[red]{s}[/]"  # noqa: E731
        table.add_row(
            f"web-{i} {pod['ip']}",
            pod["node"],
            path,
            mark(ok1, host),
            mark(ok2, seen),
            mark(ok3, udp),
        )
    console.print(table)
    console.print(
        f"\nThe lab is running. Explore it:\n"
        f"  .venv/bin/tabbyctl lab status                 nodes, agents, pods\n"
        f"  .venv/bin/tabbyctl get pods -o wide           the datastore ({lab.url})\n"
        f"  .venv/bin/tabbyctl lab exec client -- curl -s http://{lab.pod('web-2')['ip']}:8080/hostname\n"
        f"  .venv/bin/tabbyctl lab pod add web-4 --node node2\n"
        f"  .venv/bin/tabbyctl patch felixconfiguration default --patch "
        f'\'{{"spec": {{"bpfEnabled": true}}}}\'\n'
        f"Tear it down: make down   (or .venv/bin/tabbyctl lab down)"
    )
    return 0 if ok_all else 1

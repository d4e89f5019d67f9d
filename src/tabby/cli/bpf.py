"""`tabbyctl bpf ...`: a node's pinned maps, like `calico-node -bpf nat|conntrack|counters|routes`.

Read-only: the commands open the pins, dump, and close; they never write a map, so they are safe
next to a running agent. A node is named by ``--lab``/``--node`` (the lab's pin directory
``/sys/fs/bpf/tabby/<lab>-<node>``) or by ``--pin-root`` (a real node:
``/sys/fs/bpf/tabby/<node>``).
Every command prints a rich table by default and ``-o json`` for scripts: a list of objects (a
mapping for counters) whose keys are stable.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from tabby.cli.common import fail

if TYPE_CHECKING:
    from tabby.bpf import libbpf
    from tabby.bpf.maps.conntrack import CtEntry
    from tabby.bpf.maps.spec import MapSpec

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="a node's BPF maps (calico-node -bpf)"
)
nat_app = typer.Typer(add_completion=False, no_args_is_help=True, help="service NAT maps")
conntrack_app = typer.Typer(add_completion=False, no_args_is_help=True, help="conntrack map")
app.add_typer(nat_app, name="nat")
app.add_typer(conntrack_app, name="conntrack")

LabOpt = typer.Option("demo", "--lab", help="lab name (pins at /sys/fs/bpf/tabby/<lab>-<node>)")
NodeOpt = typer.Option("node1", "--node", help="node of the lab")
PinRootOpt = typer.Option(
    None, "--pin-root", help="a node's pin directory instead of --lab/--node (/sys/fs/bpf/tabby/X)"
)
OutputOpt = typer.Option("table", "--output", "-o", help="table or json")

Row = dict[str, Any]


def _console() -> Console:
    # Piped output must not be cut at 80 columns.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 10_000)


def _check_output(output: str, allowed: tuple[str, ...] = ("table", "json")) -> None:
    if output not in allowed:
        fail(f"--output must be {' or '.join(allowed)}, not {output!r}")


def resolve_pin_root(lab: str, node: str, pin_root: str | None) -> str:
    """The pin directory to read, or a one-line error naming what is missing."""
    from tabby.bpf.objects import node_pin_root

    if pin_root is None:
        try:
            pin_root = node_pin_root(f"{lab}-{node}")
        except ValueError as e:
            fail(str(e))
        hint = f"is lab {lab!r} up with a node {node!r}? (tabbyctl lab status --name {lab})"
    else:
        hint = "is tabby's agent running on this node?"
    if not os.path.isdir(pin_root):
        fail(f"no tabby pins at {pin_root}: {hint}")
    return pin_root


@contextmanager
def _open(spec: MapSpec, pin_root: str) -> Iterator[libbpf.Map[Any, Any]]:
    path = os.path.join(pin_root, spec.name)
    if not os.path.exists(path):
        fail(
            f"map {spec.name} is not pinned in {pin_root} (agent not started, or an older datapath)"
        )
    try:
        bpf_map = spec.open_pinned(pin_root)
    except OSError as e:
        fail(f"cannot open {path}: {e.strerror or e} (reading BPF maps needs root)")
    try:
        yield bpf_map
    finally:
        bpf_map.close()


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


# --- nat ----------------------------------------------------------------------------------------


def flag_names(flags: int, affinity_s: int) -> list[str]:
    """NatFlags as lower-case words; affinity carries its timeout: ``affinity(10800s)``."""
    from tabby.bpf.maps.nat import NatFlags

    out = []
    for flag in NatFlags:
        if flags & flag:
            name = (flag.name or str(int(flag))).lower()
            out.append(f"{name}({affinity_s}s)" if flag is NatFlags.AFFINITY else name)
    unknown = flags & ~sum(NatFlags)
    if unknown:
        out.append(f"{unknown:#x}")
    return out


def read_nat(pin_root: str) -> list[Row]:
    """Frontends with their backends by ordinal, sorted by VIP, port, protocol; IPv4 first, then
    the IPv6 ones (tby_nat_fe6/be6; skipped on an older datapath that has none)."""
    from tabby.bpf.maps.nat import (
        BACKENDS6_SPEC,
        BACKENDS_SPEC,
        FRONTENDS6_SPEC,
        FRONTENDS_SPEC,
        PROTOCOL_NAMES,
    )

    def v4(value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.IPv4Address(value)

    def v6(value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.IPv6Address(bytes(value))

    rows: list[tuple[tuple[int, int, int, int], Row]] = []
    for fe_spec, be_spec, addr_of in (
        (FRONTENDS_SPEC, BACKENDS_SPEC, v4),
        (FRONTENDS6_SPEC, BACKENDS6_SPEC, v6),
    ):
        if fe_spec is FRONTENDS6_SPEC and not os.path.exists(os.path.join(pin_root, fe_spec.name)):
            continue
        with _open(fe_spec, pin_root) as fe_map, _open(be_spec, pin_root) as be_map:
            frontends = fe_map.lookup_batch()
            backends = {(k.id, k.ordinal): v for k, v in be_map.lookup_batch()}
        for key, val in frontends:
            addr = addr_of(key.addr)
            bes: list[Row] = []
            for ordinal in range(val.count):
                be = backends.get((val.id, ordinal))
                if be is None:  # a set being shrunk or grown right now, or a bug: show it
                    bes.append({"ordinal": ordinal, "addr": None, "port": None})
                else:
                    bes.append({"ordinal": ordinal, "addr": str(addr_of(be.addr)), "port": be.port})
            row: Row = {
                "frontend": key.describe(),
                "addr": str(addr),
                "port": key.port,
                "protocol": PROTOCOL_NAMES.get(key.proto, str(key.proto)),
                "id": val.id,
                "count": val.count,
                "flags": flag_names(val.flags, val.affinity_s),
                "affinity_s": val.affinity_s,
                "backends": bes,
            }
            sort_key = (addr.version, int(addr), int(key.port), int(key.proto))
            rows.append((sort_key, row))
    return [row for _, row in sorted(rows, key=lambda item: item[0])]


def _backend_str(be: Row) -> str:
    if be["addr"] is None:
        return "<missing>"
    return f"[{be['addr']}]:{be['port']}" if ":" in be["addr"] else f"{be['addr']}:{be['port']}"


def nat_text(rows: list[Row]) -> str:
    """calico-node -bpf nat dump's shape: one frontend line, then its backends indented."""
    lines = []
    for row in rows:
        flags = f" flags {','.join(row['flags'])}" if row["flags"] else ""
        lines.append(f"{row['frontend']} id {row['id']} count {row['count']}{flags}")
        for be in row["backends"]:
            lines.append(f"\t{row['id']}:{be['ordinal']}\t{_backend_str(be)}")
    return "\n".join(lines)


@nat_app.command("dump")
def nat_dump(
    lab: str = LabOpt,
    node: str = NodeOpt,
    pin_root: str | None = PinRootOpt,
    output: str = typer.Option("table", "--output", "-o", help="table, text or json"),
) -> None:
    """Service frontends (tby_nat_fe; IPv6: tby_nat_fe6) and the backends of each."""
    _check_output(output, ("table", "text", "json"))
    rows = read_nat(resolve_pin_root(lab, node, pin_root))
    if output == "json":
        _print_json(rows)
        return
    if output == "text":
        if rows:
            typer.echo(nat_text(rows))
        return
    table = Table(title=f"NAT frontends ({len(rows)})")
    for col in ("frontend", "id", "count", "flags", "backends"):
        table.add_column(col, justify="right" if col in ("id", "count") else "left")
    for row in rows:
        table.add_row(
            row["frontend"],
            str(row["id"]),
            str(row["count"]),
            ",".join(row["flags"]),
            "\n".join(_backend_str(be) for be in row["backends"]) or "-",
        )
    _console().print(table)


def read_maglev(pin_root: str, client: tuple[str, int] | None = None) -> list[Row]:
    """Maglev tables (tby_maglev) per backend set: the frontends using it, its size, each
    backend's slots and share; with ``client`` (address, port), the backend each frontend gives
    that client's TCP flow (the datapath's hash, mirrored)."""
    from collections import Counter

    from tabby.bpf.maps.maglev import MAGLEV_SPEC, flow_hash
    from tabby.bpf.maps.nat import FRONTENDS_SPEC, PROTOCOLS, NatFlags

    with _open(FRONTENDS_SPEC, pin_root) as fe_map, _open(MAGLEV_SPEC, pin_root) as mg_map:
        frontends = fe_map.lookup_batch()
        tables: dict[int, dict[int, str]] = {}
        for k, v in mg_map.lookup_batch():
            tables.setdefault(k.id, {})[k.slot] = f"{ipaddress.IPv4Address(v.addr)}:{v.port}"
    users: dict[int, list[Any]] = {}
    for key, val in frontends:
        if val.flags & NatFlags.MAGLEV:
            users.setdefault(val.id, []).append(key)
    rows = []
    for set_id in sorted(set(tables) | set(users)):
        slots = tables.get(set_id, {})
        size = max(slots, default=-1) + 1
        counts = Counter(slots.values())
        fes = sorted(users.get(set_id, []), key=lambda k: (int(k.addr), int(k.port)))
        row: Row = {
            "id": set_id,
            "frontends": [k.describe() for k in fes],
            "slots": size,
            "filled": len(slots),
            "backends": [
                {"backend": be, "slots": n, "share": round(n / size, 4) if size else 0.0}
                for be, n in sorted(counts.items())
            ],
        }
        if client is not None:
            picks = {}
            for k in fes:
                fe_addr = str(ipaddress.IPv4Address(k.addr))
                h = flow_hash(client[0], fe_addr, client[1], k.port, PROTOCOLS["TCP"])
                picks[k.describe()] = slots.get(h % size) if size else None
            row["client"] = f"{client[0]}:{client[1]}"
            row["picks"] = picks
        rows.append(row)
    return rows


@nat_app.command("maglev")
def nat_maglev(
    lab: str = LabOpt,
    node: str = NodeOpt,
    pin_root: str | None = PinRootOpt,
    output: str = OutputOpt,
    client: str | None = typer.Option(
        None, "--client", help="IP:PORT: the backend each frontend gives this client's TCP flow"
    ),
) -> None:
    """Maglev tables (lb.projectcalico.org/external-traffic-strategy: maglev): per backend set,
    its frontends, table size and each backend's slots."""
    _check_output(output)
    parsed = None
    if client is not None:
        addr, _, port = client.rpartition(":")
        try:
            parsed = (str(ipaddress.IPv4Address(addr)), int(port))
        except ValueError:
            fail(f"--client must be IPv4:PORT, not {client!r}")
        if not 0 < parsed[1] < 65536:
            fail(f"--client port must be 1-65535, not {parsed[1]}")
    rows = read_maglev(resolve_pin_root(lab, node, pin_root), parsed)
    if output == "json":
        _print_json(rows)
        return
    table = Table(title=f"Maglev tables ({len(rows)})")
    for col in ("id", "frontends", "slots", "backends (slots, share)"):
        table.add_column(col, justify="right" if col in ("id", "slots") else "left")
    if parsed is not None:
        table.add_column(f"{parsed[0]}:{parsed[1]} ->")
    for row in rows:
        size = f"{row['filled']}/{row['slots']}" if row["filled"] != row["slots"] else row["slots"]
        cells = [
            str(row["id"]),
            "\n".join(row["frontends"]) or "- (no frontend uses it)",
            str(size),
            "\n".join(f"{b['backend']} {b['slots']} {b['share']:.1%}" for b in row["backends"])
            or "-",
        ]
        if parsed is not None:
            cells.append("\n".join(str(v) for v in row["picks"].values()) or "-")
        table.add_row(*cells)
    _console().print(table)


# --- conntrack ----------------------------------------------------------------------------------

_CT_KEY = re.compile(
    r"^(?P<proto>\S+) (?P<src>[\d.]+):(?P<sport>\d+) -> (?P<dst>[\d.]+):(?P<dport>\d+)$"
)


def _addr_port(text: str) -> tuple[str | None, int | None]:
    if not text:
        return None, None
    addr, _, port = text.rpartition(":")
    return addr, int(port)


def ct_row(entry: CtEntry) -> Row:
    """A CtEntry (``tabby.bpf.maps.conntrack``) as a flat, JSON-able row."""
    m = _CT_KEY.match(entry.key)
    if m is None:
        raise ValueError(f"unexpected conntrack key: {entry.key!r}")
    nat_addr, nat_port = _addr_port(entry.nat)
    snat_addr, snat_port = _addr_port(entry.snat)
    return {
        "proto": m["proto"],
        "src": m["src"],
        "sport": int(m["sport"]),
        "dst": m["dst"],
        "dport": int(m["dport"]),
        "type": entry.type.removeprefix("NAT_"),
        "nat_addr": nat_addr,
        "nat_port": nat_port,
        "snat_addr": snat_addr,
        "snat_port": snat_port,
        "tcp_flags": entry.tcp.split("|") if entry.tcp else [],
        "age_s": round(entry.age_s, 3),
        "idle_s": round(entry.idle_s, 3),
        "path": entry.path,
        "policy": entry.policy.split("|") if entry.policy else [],
    }


def read_conntrack(
    pin_root: str,
    proto: str | None = None,
    ip: str | None = None,
    port: int | None = None,
    kind: str | None = None,
) -> list[Row]:
    """Conntrack halves as rows, sorted by key; filters as ``dataplane.conntrack.read_entries``."""
    from tabby.bpf.maps.conntrack import CONNTRACK_SPEC, CtType
    from tabby.dataplane.conntrack import read_entries

    ct_kind = None
    if kind is not None:
        ct_kind = (
            CtType.EXT
            if kind.upper() == "EXT"
            else CtType.PLAIN
            if kind.upper() == "PLAIN"
            else CtType[f"NAT_{kind.upper()}"]
        )
    with _open(CONNTRACK_SPEC, pin_root) as ct_map:
        entries = read_entries(ct_map, proto=proto, addr=ip, port=port, kind=ct_kind)
    return [ct_row(e) for e in entries]


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


@conntrack_app.command("dump")
def conntrack_dump(
    lab: str = LabOpt,
    node: str = NodeOpt,
    pin_root: str | None = PinRootOpt,
    output: str = OutputOpt,
    ip: str | None = typer.Option(
        None, "--ip", help="only entries with this address (source, destination, NAT or SNAT)"
    ),
    port: int | None = typer.Option(None, "--port", help="only entries with this port, likewise"),
    proto: str | None = typer.Option(None, "--proto", help="TCP or UDP"),
    kind: str | None = typer.Option(None, "--type", help="FWD, REV, EXT or PLAIN (policy only)"),
) -> None:
    """Conntrack (tby_ct): NAT pairs (FWD keyed by what the client sent, REV by the reply), EXT
    (a flow another node forwarded here; `path`: where it goes) and PLAIN flows of isolated pods;
    `policy` says which ends' NetworkPolicy admitted the flow."""
    _check_output(output)
    if ip is not None:
        try:
            ip = str(ipaddress.IPv4Address(ip))
        except ValueError:
            fail(f"--ip must be an IPv4 address, not {ip!r}")
    if proto is not None and proto.upper() not in ("TCP", "UDP"):
        fail(f"--proto must be TCP or UDP, not {proto!r}")
    if kind is not None and kind.upper() not in ("FWD", "REV", "EXT", "PLAIN"):
        fail(f"--type must be FWD, REV, EXT or PLAIN, not {kind!r}")
    if port is not None and not 0 < port < 65536:
        fail(f"--port must be 1-65535, not {port}")
    rows = read_conntrack(resolve_pin_root(lab, node, pin_root), proto, ip, port, kind)
    if output == "json":
        _print_json(rows)
        return
    table = Table(title=f"conntrack entries ({len(rows)})")
    cols = ["proto", "source", "destination", "type", "nat", "snat", "age", "idle", "tcp"]
    cols += ["policy", "path"]
    for col in cols:
        table.add_column(col, justify="right" if col in ("age", "idle") else "left")
    for r in rows:
        nat = f"{r['nat_addr']}:{r['nat_port']}" if r["nat_addr"] else ""
        snat = f"{r['snat_addr']}:{r['snat_port']}" if r["snat_addr"] else ""
        table.add_row(
            r["proto"],
            f"{r['src']}:{r['sport']}",
            f"{r['dst']}:{r['dport']}",
            r["type"],
            nat,
            snat,
            _age(r["age_s"]),
            _age(r["idle_s"]),
            ",".join(r["tcp_flags"]),
            ",".join(p.lower() for p in r["policy"]),
            r["path"],
        )
    _console().print(table)


# --- routes -------------------------------------------------------------------------------------


def read_routes(pin_root: str) -> list[Row]:
    """tby_routes in address order; a local pod's with what the fast path writes into its
    frames (tby_wl_devs: the pod's MAC, its gateway's, the MTU), where the agent wrote it."""
    from tabby.bpf.maps.routes import ROUTES_SPEC, WL_DEVS_SPEC, RouteFlags, RoutesMap

    with _open(ROUTES_SPEC, pin_root) as routes_map:
        routes = RoutesMap(routes_map).dump()
    with _open(WL_DEVS_SPEC, pin_root) as devs_map:
        devs = {int(k.value): v for k, v in devs_map.items()}
    rows = []
    for cidr, value in sorted(routes.items(), key=lambda kv: ipaddress.IPv4Network(kv[0])):
        flags = value.route_flags
        row: Row = {
            "cidr": cidr,
            "flags": [str(f.name).lower().replace("_", "-") for f in RouteFlags if f in flags],
            "ifindex": value.ifindex or None,
            "next_hop": value.next_hop_ip,
            "netnsid": value.netnsid if RouteFlags.NETNS in flags else None,
        }
        dev = devs.get(value.ifindex) if RouteFlags.LOCAL_WL in flags else None
        if dev is not None:
            row.update(pod_mac=dev.pod_mac, gateway_mac=dev.gateway_mac, mtu=int(dev.mtu))
        rows.append(row)
    return rows


DEV_KEYS = ("pod_mac", "gateway_mac", "mtu")  # a local pod's tby_wl_devs entry, in a row


@app.command()
def routes(
    lab: str = LabOpt,
    node: str = NodeOpt,
    pin_root: str | None = PinRootOpt,
    output: str = OutputOpt,
) -> None:
    """The route map (tby_routes) and, for this node's pods, what the fast path writes into their
    frames without asking the FIB (tby_wl_devs)."""
    _check_output(output)
    rows = read_routes(resolve_pin_root(lab, node, pin_root))
    if output == "json":
        _print_json(rows)
        return
    table = Table(title="BPF routes")
    for column in ("cidr", "flags", "dev", "via", "netnsid", "pod MAC", "gateway MAC", "MTU"):
        table.add_column(column)
    for r in rows:
        cells = (r["ifindex"], r["next_hop"], r["netnsid"], *(r.get(k) for k in DEV_KEYS))
        table.add_row(
            r["cidr"], ",".join(r["flags"]), *("" if c is None else str(c) for c in cells)
        )
    _console().print(table)


# --- counters -----------------------------------------------------------------------------------


def read_counters(pin_root: str) -> dict[str, int]:
    """{reason label: packets summed over CPUs}, in the C enum's order."""
    from tabby.bpf.maps.counters import COUNTERS_SPEC, Counters

    with _open(COUNTERS_SPEC, pin_root) as counters_map:
        return Counters(counters_map).read()


def _kind(reason: str) -> str:
    return (
        reason.split("_", 1)[0]
        if reason.startswith(("drop_", "nat_", "ctlb_", "maglev_"))
        else "pass"
    )


@app.command()
def counters(
    lab: str = LabOpt,
    node: str = NodeOpt,
    pin_root: str | None = PinRootOpt,
    output: str = OutputOpt,
    show_all: bool = typer.Option(False, "--all", help="show reasons that counted nothing too"),
) -> None:
    """Packets counted by the programs per reason (tby_counters, summed over CPUs)."""
    _check_output(output)
    counts = read_counters(resolve_pin_root(lab, node, pin_root))
    shown = {reason: n for reason, n in counts.items() if n or show_all}
    if output == "json":
        _print_json(shown)
        return
    table = Table(title="BPF counters")
    table.add_column("reason")
    table.add_column("kind")
    table.add_column("packets", justify="right")
    style: dict[str, Callable[[str], str]] = {"drop": lambda s: f"[red]{s}[/]"}
    for reason, n in shown.items():
        kind = _kind(reason)
        table.add_row(style.get(kind, str)(reason), kind, str(n))
    _console().print(table)


# --- policy -------------------------------------------------------------------------------------

policy_app = typer.Typer(add_completion=False, no_args_is_help=True, help="NetworkPolicy maps")
app.add_typer(policy_app, name="policy")


def read_policy(store_url: str, pod: str, lab: str, pin_root: str | None) -> Row:
    """The calc result for one pod (what its node should enforce, in words) and whether the
    node's maps hold exactly that (its tby_pol_ep entry and the set's prefixes)."""
    from tabby.bpf.maps.policy import DIR_IN, DIR_OUT, PolicyFlags, PolicyMaps
    from tabby.calc import policy as calc
    from tabby.cli.common import one_line_errors, open_store

    namespace, _, name = pod.rpartition("/")
    namespace = namespace or "default"
    store = open_store(store_url)
    with one_line_errors():
        obj = store.get("Pod", name, namespace)
        if obj is None:
            fail(f"pod {namespace}/{name} not found in {store_url}")
        resources: dict[str, dict[tuple[str, str], Any]] = {}
        for kind in ("Pod", "Namespace", "NetworkPolicy"):
            items, _ = store.list(kind)
            resources[kind] = {
                (o["metadata"].get("namespace", "") or "", o["metadata"]["name"]): o for o in items
            }
    node = obj.get("spec", {}).get("nodeName", "")
    ip = obj.get("status", {}).get("podIP", "")
    if not ip:
        fail(f"pod {namespace}/{name} has no address yet")
    eps = calc.compute(resources, node)
    ep = eps.get(ip)
    row = (
        calc.describe(ep, calc.pod_names(resources))
        if ep
        else calc.describe_unselected(namespace, name, ip)
    )
    row["node"] = node
    root = resolve_pin_root(lab, node, pin_root)
    maps = PolicyMaps.open_pinned(root)
    try:
        value = maps.endpoint(ip)
        if ep is None:
            row["programmed"] = value is None
            row["set"] = None
        else:
            row["set"] = value.set if value else None
            want_flags = (PolicyFlags.ISO_IN if ep.ingress.isolated else 0) | (
                PolicyFlags.ISO_OUT if ep.egress.isolated else 0
            )
            ok = value is not None and value.flags == int(want_flags)
            if ep.ip6:  # a dual-stack pod: its IPv6 address shares the set (tby_pol_ep6)
                value6 = maps.endpoint(ep.ip6)
                ok = ok and value6 is not None and value6.set == value.set  # type: ignore[union-attr]
            if value is not None and ok:
                have: dict[int, set[tuple[Any, ...]]] = {DIR_IN: set(), DIR_OUT: set()}
                for k in maps.peer_keys():
                    if k.set // 2 == value.set:
                        have[k.set % 2].add(("peer", k.cidr))
                for q in maps.port_keys():
                    if q.set // 2 == value.set:
                        have[q.set % 2].add(("port", q.proto, q.port, q.prefixlen - 48))
                for d, dp in ((DIR_IN, ep.ingress), (DIR_OUT, ep.egress)):
                    c = calc.compile_direction(dp)
                    want = {("peer", cidr) for cidr, _ in c.peers} | {
                        ("port", pr, port, plen) for pr, port, plen, _ in c.ports
                    }
                    ok = ok and want == have[d]
            row["programmed"] = ok
    finally:
        maps.close()
    return row


def policy_text(row: Row) -> str:
    state = "programmed" if row["programmed"] else "NOT (yet) programmed as computed"
    set_words = f", policy set {row['set']}" if row.get("set") else ""
    addrs = f"{row['ip']}, {row['ip6']}" if row.get("ip6") else row["ip"]
    lines = [f"pod {row['pod']} ({addrs}) on {row['node']}: {state}{set_words}"]
    for d, verb in (("ingress", "from"), ("egress", "to")):
        info = row[d]
        if not info["isolated"]:
            lines.append(f"{d}: not isolated: everything {info['otherwise'].split(' ', 1)[0]}")
            continue
        lines.append(f"{d}: isolated by {', '.join(info['policies'])}")
        for rule in info["allow"]:
            lines.append(f"  allow {verb} {'; '.join(rule['peers'])}")
            lines.append(f"        on {', '.join(rule['ports'])}")
            for src in rule["from_rules"]:
                lines.append(f"        <- {src}")
        lines.append(f"  everything else: {info['otherwise']}")
        lines += [f"  note: {n}" for n in info["notes"]]
    lines += [f"error: {e}" for e in row["errors"]]
    return "\n".join(lines)


@policy_app.command("dump")
def policy_dump(
    pod: str = typer.Argument(..., help="the pod, NAMESPACE/NAME (default namespace: default)"),
    datastore: str | None = typer.Option(
        None,
        "--datastore",
        envvar="TABBY_DATASTORE",
        help="datastore URL (default: the --lab's)",
    ),
    lab: str = LabOpt,
    pin_root: str | None = PinRootOpt,
    output: str = typer.Option("text", "--output", "-o", help="text or json"),
) -> None:
    """What the datapath allows for POD, in the words of its NetworkPolicies, and whether its
    node's maps (tby_pol_ep, tby_pol_peer, tby_pol_port) hold exactly that."""
    _check_output(output, ("text", "json"))
    if datastore is None:
        from tabby.lab import state

        datastore = state.datastore_url(lab)
    row = read_policy(datastore, pod, lab, pin_root)
    if output == "json":
        _print_json(row)
    else:
        typer.echo(policy_text(row))

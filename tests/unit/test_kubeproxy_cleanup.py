"""The kube-proxy hand-over's cleanup (tabby.dataplane.kubeproxy) on real iptables and nft.

A scratch namespace gets kube-proxy's real layouts (tabby.lab.kubeproxy_rules) in every backend
and family it writes to, plus rules and tables that are not kube-proxy's: kubelet's KUBE-FIREWALL
and canary, a user chain, user rules in the built-in chains (one whose comment mentions
"-j KUBE-SERVICES"), a MASQUERADE rule, and nft tables of other owners. The cleanup, run from a
thread inside the namespace as the agent's worker runs it, must leave no kube-proxy chain or jump
and leave the rest byte for byte as iptables-save / nft print it.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tabby.dataplane.kubeproxy import cleanup, is_kube_proxy_chain, parse_save, removal_script
from tabby.lab import traffic
from tabby.lab.kubeproxy_rules import (
    KubeServicePort,
    iptables_restore,
    nftables,
    synthetic_services,
)

OTHERS = """*filter
:KUBE-FIREWALL - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:MY-FW - [0:0]
-A INPUT -j KUBE-FIREWALL
-A INPUT -p tcp -m tcp --dport 2222 -j ACCEPT
-A INPUT -p udp -m udp --dport 9 -m comment --comment "not -j KUBE-SERVICES" -j ACCEPT
-A INPUT -j MY-FW
-A OUTPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet \
connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A MY-FW -s 10.9.0.0/16 -j DROP
-A MY-FW -j KUBE-SERVICES
COMMIT
*nat
-A POSTROUTING -s 10.99.0.0/16 -j MASQUERADE
COMMIT
"""
OTHERS_V6 = OTHERS.replace("127.0.0.0/8", "::1/128").replace("10.9.0.0/16", "fd09::/32")
OTHERS_V6 = OTHERS_V6.replace("10.99.0.0/16", "fd99::/32").replace(
    " -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT", ""
)
OTHER_NFT = """table inet mine {
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\ttcp dport 2223 accept
\t}
}
table ip kube-proxy-not {
\tchain c {
\t\tip daddr 10.96.0.1 counter drop
\t}
}
"""
V6 = [
    KubeServicePort("default", "web6", "fd00:96::10", 80, "TCP", "http", (("fd00::2", 8080),)),
    KubeServicePort("default", "idle6", "fd00:96::11", 53, "UDP", "dns", ()),
]
SAVES = ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save", "ip6tables-nft-save")


def _ns(netns: str, *argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", netns, *argv], input=stdin, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def _rules(save: str) -> list[str]:
    """Tables, chains (without their packet counters, which traffic moves) and rules."""
    return [
        line.rsplit(" [", 1)[0] if line.startswith(":") else line
        for line in save.splitlines()
        if line.startswith(("-A", ":", "*"))
    ]


def _kube_proxys(line: str) -> bool:
    """Does this saved line belong to kube-proxy (its chain, or a jump to one of its chains)?"""
    outside_comments = re.sub(r'"[^"]*"', '""', line)
    names = re.findall(r"KUBE-[A-Z0-9-]+", outside_comments)
    return any(is_kube_proxy_chain(n) for n in names)


def _load(netns: str) -> None:
    v4 = synthetic_services(20, 3, node_port_base=30000) + [
        KubeServicePort("default", "idle", "10.96.9.9", 53, "UDP", "dns", ())
    ]
    for backend in ("legacy", "nft"):
        _ns(netns, f"iptables-{backend}-restore", "--noflush", stdin=iptables_restore(v4))
        _ns(netns, f"iptables-{backend}-restore", "--noflush", stdin=OTHERS)
        _ns(
            netns,
            f"ip6tables-{backend}-restore",
            "--noflush",
            stdin=iptables_restore(V6, cluster_cidr="fd00::/48"),
        )
        _ns(netns, f"ip6tables-{backend}-restore", "--noflush", stdin=OTHERS_V6)
    _ns(netns, "nft", "-f", "-", stdin=OTHER_NFT)
    _ns(netns, "nft", "-f", "-", stdin=nftables(v4))
    _ns(
        netns,
        "nft",
        "-f",
        "-",
        stdin=nftables(V6, family="ip6", cluster_cidr="fd00::/48", service_cidr="fd00:96::/112"),
    )


def test_removal_script_keeps_what_is_not_kube_proxys():
    save = "\n".join(
        [
            "*filter",
            ":INPUT ACCEPT [0:0]",
            ":KUBE-FIREWALL - [0:0]",
            ":KUBE-FORWARD - [0:0]",
            "-A INPUT -j KUBE-FIREWALL",
            '-A FORWARD -m comment --comment "x -j KUBE-FORWARD" -j ACCEPT',
            "-A FORWARD -g KUBE-FORWARD",
            "-A KUBE-FORWARD -j ACCEPT",
            "COMMIT",
        ]
    )
    (table,) = parse_save(save)
    script = removal_script(table)
    assert script is not None
    text, chains, jumps = script
    assert (chains, jumps) == (1, 1)
    assert text.splitlines() == [
        "*filter",
        "-D FORWARD -g KUBE-FORWARD",
        "-F KUBE-FORWARD",
        "-X KUBE-FORWARD",
        "COMMIT",
    ]
    assert removal_script(parse_save("*nat\n:KUBE-FIREWALL - [0:0]\nCOMMIT\n")[0]) is None


@pytest.mark.root
def test_cleanup_removes_kube_proxy_and_nothing_else(scratch_netns):
    _load(scratch_netns)
    before = {s: _ns(scratch_netns, s) for s in SAVES}
    for s, text in before.items():  # the load really is there, in every backend and family
        assert "-j KUBE-SVC-" in text and "KUBE-FIREWALL" in text, s
    nft_before = _ns(scratch_netns, "nft", "list", "tables")
    assert "table ip kube-proxy\n" in nft_before and "table ip6 kube-proxy\n" in nft_before
    others_before = {
        t: _ns(scratch_netns, "nft", "list", "table", *t.split())
        for t in ("inet mine", "ip kube-proxy-not")
    }

    result = traffic.in_netns(scratch_netns, cleanup)
    assert result.errors == []
    assert result.nft_tables == ["ip kube-proxy", "ip6 kube-proxy"]

    for s, text in before.items():
        after = _ns(scratch_netns, s)
        assert not any(_kube_proxys(line) for line in after.splitlines()), s
        expected = [line for line in _rules(text) if not _kube_proxys(line)]
        assert _rules(after) == expected, s
        assert "--dport 2222" in after and "not -j KUBE-SERVICES" in after
        assert "-A INPUT -j KUBE-FIREWALL" in after and ":KUBE-KUBELET-CANARY" in after
        assert "-A MY-FW -j KUBE-SERVICES" not in after and "MASQUERADE" in after
    tables = _ns(scratch_netns, "nft", "list", "tables")
    assert "kube-proxy\n" not in tables.replace("kube-proxy-not", "")
    for t, text in others_before.items():
        assert _ns(scratch_netns, "nft", "list", "table", *t.split()) == text

    again = traffic.in_netns(scratch_netns, cleanup)  # idempotent: nothing left to remove
    assert not again.removed_anything and again.errors == []


@pytest.mark.root
def test_a_namespace_without_legacy_tables_gets_none(scratch_netns):
    result = traffic.in_netns(scratch_netns, cleanup)
    assert not result.removed_anything and result.errors == []
    assert _ns(scratch_netns, "cat", "/proc/net/ip_tables_names").strip() == ""


def test_missing_tools_are_reported_not_errors(monkeypatch):
    from tabby.dataplane import kubeproxy

    monkeypatch.setattr(kubeproxy, "_tool", lambda name: None)
    result = cleanup()
    assert result.errors == [] and not result.removed_anything
    assert result.missing_tools == [
        "iptables-legacy", "ip6tables-legacy", "iptables-nft", "ip6tables-nft", "nft"
    ]  # fmt: skip

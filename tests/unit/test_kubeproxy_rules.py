"""kube-proxy's rule layouts (tabby.lab.kubeproxy_rules) load into real iptables and nft and DNAT.

The generator's output is fed to the real tools in a scratch namespace: iptables-restore of both
backends and nft -f. A connection to a service VIP from inside the namespace then reaches an
endpoint through kube-proxy's own chains, so the layout is one that does what kube-proxy's does.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tabby.lab.kubeproxy_rules import (
    KubeServicePort,
    iptables_restore,
    nft_endpoint_chain,
    nft_service_chain,
    nftables,
    sep_chain,
    svc_chain,
    synthetic_services,
)

# Inside the namespace: listen on every endpoint port, connect to the VIP, report which local
# address accepted it (the DNAT target).
PROBE = """
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 8080)); srv.listen(64); srv.settimeout(3)
seen = set()
for _ in range(int(sys.argv[2])):
    c = socket.create_connection((sys.argv[1], 80), timeout=3)
    a, _peer = srv.accept(); seen.add(a.getsockname()[0]); a.close(); c.close()
print(" ".join(sorted(seen)))
"""


def _ns(netns: str, *cmd: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", netns, *cmd], input=stdin, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{cmd}: {done.stderr}"
    return done.stdout


def _node(netns: str) -> None:
    """Endpoint addresses local on a veth (no dummy module here), the service range routed to it;
    both ends stay in the namespace."""
    _ns(netns, "ip", "link", "add", "pods", "type", "veth", "peer", "name", "pods-peer")
    _ns(netns, "ip", "link", "set", "pods-peer", "up")
    _ns(netns, "ip", "addr", "add", "10.244.0.1/16", "dev", "pods")
    for i in (2, 3):
        _ns(netns, "ip", "addr", "add", f"10.244.0.{i}/16", "dev", "pods")
    _ns(netns, "ip", "link", "set", "pods", "up")
    _ns(netns, "ip", "route", "add", "10.96.0.0/16", "dev", "pods")


def _two_endpoint_service() -> list[KubeServicePort]:
    return [
        KubeServicePort(
            "default",
            "web",
            "10.96.0.10",
            80,
            "TCP",
            "http",
            (("10.244.0.2", 8080), ("10.244.0.3", 8080)),
            node_port=30080,
        ),
        KubeServicePort("default", "idle", "10.96.0.11", 53, "UDP", "dns", ()),
    ]


def test_chain_names_are_kube_proxys():
    # The kubernetes service's chain name is the one every cluster shows.
    api = KubeServicePort("default", "kubernetes", "10.96.0.1", 443, "TCP", "https", ())
    assert svc_chain(api) == "KUBE-SVC-NPX46M4PTMTKRN6Y"
    sp = _two_endpoint_service()[0]
    assert re.fullmatch(r"KUBE-SEP-[A-Z2-7]{16}", sep_chain(sp, "10.244.0.2", 8080))
    assert nft_service_chain(sp).endswith("-default/web/tcp/http")
    assert nft_endpoint_chain(sp, "10.244.0.2", 8080).endswith(
        "-default/web/tcp/http__10.244.0.2/8080"
    )


def test_iptables_layout_probabilities_and_comments():
    text = iptables_restore(synthetic_services(2, 4))
    svc = svc_chain(synthetic_services(1, 4)[0])
    probs = re.findall(rf"-A {svc} .*?--probability (\S+) -j KUBE-SEP", text)
    assert probs == ["0.2500000000", "0.3333333333", "0.5000000000"]
    # the last endpoint is unconditional, each SEP masquerades hairpin and DNATs
    assert len(re.findall(rf"-A {svc} -m comment --comment \"\S+ -> \S+\" -j KUBE-SEP", text)) == 1
    assert text.count("-j DNAT --to-destination") == 8
    assert "NOTE: this must be the last rule in this chain" in text
    assert text.count("COMMIT") == 3


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="protocol"):
        KubeServicePort("default", "x", "10.96.0.1", 80, "ICMP")
    with pytest.raises(ValueError, match="port"):
        KubeServicePort("default", "x", "10.96.0.1", 0)
    with pytest.raises(ValueError, match="endpoints"):
        KubeServicePort("default", "x", "10.96.0.1", 80, endpoints=(("10.0.0.1", 70000),))
    with pytest.raises(ValueError, match="family"):
        nftables([], family="inet")


@pytest.mark.root
@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_iptables_restore_loads_and_dnats(scratch_netns, backend):
    _node(scratch_netns)
    rules = iptables_restore(
        _two_endpoint_service() + synthetic_services(50, 3, vip_base="10.96.1.0")
    )
    _ns(scratch_netns, f"iptables-{backend}-restore", "--noflush", stdin=rules)
    # a resync (rules without the built-in chain jumps, as kube-proxy's later syncs) replaces the
    # KUBE-* chains rather than doubling them
    resync = iptables_restore(
        _two_endpoint_service() + synthetic_services(50, 3, vip_base="10.96.1.0"), jumps=False
    )
    _ns(scratch_netns, f"iptables-{backend}-restore", "--noflush", stdin=resync)
    saved = _ns(scratch_netns, f"iptables-{backend}-save", "-t", "nat")
    assert saved.count("-j DNAT") == 2 + 150
    assert saved.count("-A PREROUTING") == 1
    filt = _ns(scratch_netns, f"iptables-{backend}-save", "-t", "filter")
    assert "default/idle:dns has no endpoints" in filt
    seen = _ns(scratch_netns, sys.executable, "-c", PROBE, "10.96.0.10", "40").split()
    assert seen == ["10.244.0.2", "10.244.0.3"]


@pytest.mark.root
def test_nft_loads_and_dnats(scratch_netns):
    _node(scratch_netns)
    ruleset = nftables(_two_endpoint_service() + synthetic_services(50, 3, vip_base="10.96.1.0"))
    _ns(scratch_netns, "nft", "-f", "-", stdin=ruleset)
    _ns(scratch_netns, "nft", "-f", "-", stdin=ruleset)  # a full resync is idempotent
    listed = _ns(scratch_netns, "nft", "list", "table", "ip", "kube-proxy")
    assert listed.count(" dnat to ") == 2 + 150
    assert "numgen random mod 2 vmap" in listed
    seen = _ns(scratch_netns, sys.executable, "-c", PROBE, "10.96.0.10", "40").split()
    assert seen == ["10.244.0.2", "10.244.0.3"]
    v6 = [
        KubeServicePort("default", "web6", "fd00:96::10", 80, "TCP", "http", (("fd00::2", 8080),))
    ]
    _ns(
        scratch_netns,
        "nft",
        "-f",
        "-",
        stdin=nftables(v6, family="ip6", cluster_cidr="fd00::/48", service_cidr="fd00:96::/112"),
    )
    assert "dnat to [fd00::2]:8080" in _ns(
        scratch_netns, "nft", "list", "table", "ip6", "kube-proxy"
    )

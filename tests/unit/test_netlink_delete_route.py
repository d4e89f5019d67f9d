"""links.delete_route removes a scope-link route (the VXLAN routes' kind) as well as a gatewayed
one: pyroute2's default scope in a delete used to match neither, and the route stayed."""

from __future__ import annotations

import subprocess

import pytest

from tabby.lab import traffic
from tabby.netlink import links

pytestmark = pytest.mark.root


def test_delete_route_matches_any_scope(scratch_netns):
    ns = ["ip", "-n", scratch_netns]
    subprocess.run(
        [*ns, "link", "add", "name", "va", "type", "veth", "peer", "name", "vb"], check=True
    )
    subprocess.run([*ns, "addr", "add", "10.1.0.1/24", "dev", "va"], check=True)
    for dev in ("va", "vb"):
        subprocess.run([*ns, "link", "set", dev, "up"], check=True)
    subprocess.run(
        [*ns, "route", "add", "100.96.0.0/26", "dev", "va", "proto", "88", "scope", "link"],
        check=True,
    )
    subprocess.run(
        [*ns, "route", "add", "100.96.1.0/26", "via", "10.1.0.2", "proto", "88"], check=True
    )

    def delete() -> None:
        with links.rtnl() as ipr:
            for cidr in ("100.96.0.0/26", "100.96.1.0/26", "100.96.2.0/26"):  # the last: absent
                links.delete_route(ipr, dst=cidr, proto=88)

    traffic.in_netns(scratch_netns, delete)
    left = subprocess.run([*ns, "route", "show", "proto", "88"], capture_output=True, text=True)
    assert left.stdout == ""

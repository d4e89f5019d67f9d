"""The lab's address plan."""

from __future__ import annotations

import ipaddress

import pytest

from tabby.lab.topology import TopologyError, plan


def test_nodes_alternate_subnets_and_addresses_fit():
    p = plan("demo", 3)
    assert [n.name for n in p.nodes] == ["node1", "node2", "node3"]
    assert p.nodes[0].subnet != p.nodes[1].subnet and p.nodes[0].subnet == p.nodes[2].subnet
    for n in p.nodes:
        assert ipaddress.ip_address(n.ip) in ipaddress.ip_network(n.subnet)
        assert n.netns.startswith("demo-")
    assert p.pod_netns("default", "web").startswith("demo-")


@pytest.mark.parametrize(
    "name,nodes", [("Demo", 3), ("a" * 13, 3), ("ok", 0), ("ok", 99), ("1abc", 2), ("a-b", 2)]
)
def test_bad_names_and_sizes_are_refused(name, nodes):
    with pytest.raises(TopologyError):
        plan(name, nodes)

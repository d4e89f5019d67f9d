"""The seed demo's comparison (lab/demo_source_ip.py), as `make demo` prints it: the seed's own
nginx Deployment + NodePort 30604 YAML, curled by the external client through every node; nginx's
access log shows the client's address in Tunnel and in DSR mode, and a kube-proxy node's address
for the same request through kube-proxy's iptables rules."""

from __future__ import annotations

import pytest

from tabby.lab import demo_source_ip, kubeproxy_node
from tabby.lab.cluster import Lab
from tabby.lab.topology import EXTERNAL_CLIENT_IP
from tabby.netlink.netns import netns_exists

pytestmark = [pytest.mark.root, pytest.mark.lab]


def test_nginx_logs_the_real_client_through_tabby_and_the_node_through_kube_proxy(lab: Lab):
    rows = demo_source_ip.run(lab)
    tabby = [r for r in rows if r.path.startswith("tabby")]
    assert {(r.path, r.node) for r in tabby} == {
        (f"tabby {mode}", n.name) for mode in ("Tunnel", "DSR") for n in lab.plan.nodes
    }
    assert all(r.ok and r.logged == EXTERNAL_CLIENT_IP for r in tabby), tabby
    (kp,) = [r for r in rows if r.path.startswith("kube-proxy")]
    via = lab.plan.node(kp.nginx_on)
    assert kp.ok and kp.logged == kubeproxy_node.plan_of(lab.plan, via).ip, kp
    kubeproxy_node.down(lab.plan)
    assert not netns_exists(f"{lab.name}-{kubeproxy_node.NAME}")

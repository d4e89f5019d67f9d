"""RouteKey / RouteValue constructors and describe(): pure Python, no root needed."""

from __future__ import annotations

import pytest

from tabby.bpf.maps.routes import RouteFlags, RouteKey, RouteValue


def test_key_for_cidr_is_network_order() -> None:
    key = RouteKey.for_cidr("100.96.0.64/26")
    assert (key.prefixlen, key.cidr) == (26, "100.96.0.64/26")
    assert bytes(key) == bytes([26, 0, 0, 0, 100, 96, 0, 64])


def test_bare_address_is_a_host_route() -> None:
    assert RouteKey.for_cidr("10.1.2.3").cidr == "10.1.2.3/32"


def test_host_bits_are_refused() -> None:
    with pytest.raises(ValueError):
        RouteKey.for_cidr("100.96.0.65/26")


NODE = "172.20.64.12"


@pytest.mark.parametrize(
    ("value", "line"),
    [
        (RouteValue.remote_workload(NODE), f"remote-workload via {NODE} vxlan"),
        (RouteValue.local_workload(7), "local-workload dev #7"),
        (RouteValue.remote_workload(NODE, encap=None), f"remote-workload via {NODE}"),
        (RouteValue.tunnel_addr(NODE, encap="ipip"), f"tunnel-addr via {NODE} ipip"),
        (RouteValue.local_host(), "local-host"),
        (RouteValue(flags=1 << 12), "flags+0x1000"),
    ],
)
def test_describe(value: RouteValue, line: str) -> None:
    assert value.describe("100.96.0.64/26") == f"100.96.0.64/26 {line}"


def test_value_layout_is_network_order_where_c_says_be32() -> None:
    value = RouteValue.make(RouteFlags.REMOTE_WL, ifindex=2, next_hop="1.2.3.4")
    assert bytes(value) == bytes([2, 0, 0, 0, 2, 0, 0, 0, 1, 2, 3, 4, 0, 0, 0, 0])


def test_unknown_encap_is_refused() -> None:
    with pytest.raises(ValueError, match="encapsulation"):
        RouteValue.remote_workload("1.2.3.4", encap="gre")

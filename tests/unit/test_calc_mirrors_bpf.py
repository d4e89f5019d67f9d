"""calc may not import the BPF layer, so it keeps its own copy of the route flags: equal."""

from __future__ import annotations

from tabby.bpf.maps.routes import RouteFlags
from tabby.calc import nodestate


def test_route_flags_match_the_bpf_mirror():
    for flag in RouteFlags:
        assert getattr(nodestate, f"RT_{flag.name}") == flag.value, flag.name


def test_nat_flags_match_the_bpf_mirror():
    from tabby.bpf.maps.nat import NatFlags
    from tabby.calc import services

    for flag in NatFlags:
        assert getattr(services, f"NAT_{flag.name}") == flag.value, flag.name

"""BGPConfiguration / BGPPeer validation (errors name the field) and Calico selector syntax."""

from __future__ import annotations

import pytest

from tabby.model import ValidationError, validate
from tabby.model import calico_selectors as sel
from tabby.model.calico import duration_s


def obj(kind, **spec):
    return {
        "apiVersion": "projectcalico.org/v3",
        "kind": kind,
        "metadata": {"name": "x"},
        "spec": spec,
    }


def test_bgp_configuration_defaults_are_calicos():
    out = validate(obj("BGPConfiguration"))
    assert out["spec"] == {"nodeToNodeMeshEnabled": True, "asNumber": 64512, "listenPort": 179}
    # Calico's CRD group is accepted and rewritten to the canonical apiVersion
    crd = {
        **obj("BGPPeer", peerIP="10.0.0.1", asNumber=65000),
        "apiVersion": "crd.projectcalico.org/v1",
    }
    assert validate(crd)["apiVersion"] == "projectcalico.org/v3"


@pytest.mark.parametrize(
    "kind,spec,field",
    [
        ("BGPConfiguration", {"asNumber": 0}, "spec.asNumber"),
        ("BGPConfiguration", {"nodeToNodeMeshEnabled": "no"}, "spec.nodeToNodeMeshEnabled"),
        ("BGPConfiguration", {"nodeMeshMaxRestartTime": "30"}, "spec.nodeMeshMaxRestartTime"),
        ("BGPConfiguration", {"holdTime": "9s"}, "spec.holdTime"),
        ("BGPPeer", {"peerIP": "10.0.0.1"}, "spec.asNumber"),
        ("BGPPeer", {"asNumber": 65000}, "spec.peerIP"),
        ("BGPPeer", {"peerIP": "10.0.0.1", "peerSelector": "all()", "asNumber": 1}, "spec.peerIP"),
        ("BGPPeer", {"peerIP": "10.0.0.300", "asNumber": 1}, "spec.peerIP"),
        ("BGPPeer", {"peerIP": "10.0.0.1:0", "asNumber": 1}, "spec.peerIP"),
        ("BGPPeer", {"peerSelector": "rr == "}, "spec.peerSelector"),
        (
            "BGPPeer",
            {"peerSelector": "all()", "node": "a", "nodeSelector": "all()"},
            "spec.nodeSelector",
        ),
        ("BGPPeer", {"peerSelector": "all()", "keepaliveTime": "soon"}, "spec.keepaliveTime"),
    ],
)
def test_bad_bgp_fields_name_the_field(kind, spec, field):
    with pytest.raises(ValidationError) as err:
        validate(obj(kind, **spec))
    assert err.value.path == field, str(err.value)


def test_peer_ip_forms():
    for text in ("10.0.0.1", "10.0.0.1:1179", "fd00::1", "[fd00::1]:179"):
        assert validate(obj("BGPPeer", peerIP=text, asNumber=65000))["spec"]["peerIP"] == text


@pytest.mark.parametrize(
    "expr,labels,want",
    [
        ("all()", {}, True),
        ("", {"a": "b"}, False),
        ("route-reflector == 'true'", {"route-reflector": "true"}, True),
        ("route-reflector == 'true'", {}, False),
        ("rack != 'a'", {}, True),
        ("has(rack) && rack != 'a'", {"rack": "b"}, True),
        ("!has(rack)", {"rack": "b"}, False),
        ("zone in {'a', \"b\"} || x == 'y'", {"zone": "b"}, True),
        ("zone not in {'a','b'}", {"zone": "c"}, True),
        ("(a == '1' || b == '2') && c == '3'", {"b": "2", "c": "3"}, True),
        ("(a == '1' || b == '2') && c == '3'", {"b": "2"}, False),
    ],
)
def test_calico_selectors(expr, labels, want):
    assert sel.matches(expr, labels) is want


@pytest.mark.parametrize("bad", ["a ==", "a = 'b'", "has(", "a in {'b'", "all() extra", "a == b"])
def test_bad_selectors_are_refused(bad):
    with pytest.raises(ValueError):
        sel.parse(bad)


def test_durations():
    assert duration_s("1m30s") == 90 and duration_s("500ms") == 0.5 and duration_s("2h") == 7200

"""tabby-cni input handling: every bad input gets the spec's error JSON, before any effect."""

from __future__ import annotations

import json

import pytest

from tabby.cni.plugin import (
    E_DECODE,
    E_INCOMPATIBLE_VERSION,
    E_INVALID_CONFIG,
    E_INVALID_ENV,
    parse_args,
    run,
)

CONF = {
    "cniVersion": "1.0.0",
    "name": "k8s-pod-network",
    "type": "tabby-cni",
    "nodename": "node1",
    "datastore": "sqlite:////proc/version/x.db",
}
ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "c1",
    "CNI_NETNS": "/run/netns/x",
    "CNI_IFNAME": "eth0",
    "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p",
}


def error_of(env, conf):
    code, out = run(env, conf if isinstance(conf, str) else json.dumps(conf))
    assert code == 1
    body = json.loads(out)
    assert set(body) >= {"cniVersion", "code", "msg"}
    return body


def test_version_lists_supported_versions():
    code, out = run({"CNI_COMMAND": "VERSION"}, "")
    assert code == 0 and "1.0.0" in json.loads(out)["supportedVersions"]


@pytest.mark.parametrize(
    "env_change,conf,code,msg",
    [
        ({"CNI_NETNS": ""}, CONF, E_INVALID_ENV, "CNI_NETNS is required for ADD"),
        ({"CNI_COMMAND": "BOGUS"}, CONF, E_INVALID_ENV, "CNI_COMMAND"),
        ({"CNI_ARGS": "nonsense"}, CONF, E_INVALID_ENV, "CNI_ARGS"),
        ({"CNI_ARGS": "K8S_POD_NAME=p"}, CONF, E_INVALID_ENV, "K8S_POD_NAMESPACE"),
        ({}, "{not json", E_DECODE, "not valid JSON"),
        ({}, {**CONF, "cniVersion": "9.9.9"}, E_INCOMPATIBLE_VERSION, "not supported"),
        ({}, {**CONF, "nodename": ""}, E_INVALID_CONFIG, "nodename is required"),
        ({}, {**CONF, "mtu": 100}, E_INVALID_CONFIG, "mtu"),
    ],
)
def test_bad_input_is_a_spec_error(env_change, conf, code, msg):
    body = error_of({**ENV, **env_change}, conf)
    assert body["code"] == code and msg in body["msg"]


def test_del_does_not_need_a_netns_but_add_does():
    body = error_of({**ENV, "CNI_NETNS": ""}, CONF)
    assert body["code"] == E_INVALID_ENV
    # DEL passes validation without CNI_NETNS and only then meets the (absent) datastore
    body = error_of({**ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}, CONF)
    assert "CNI_NETNS" not in body["msg"]


def test_cni_args_parse():
    assert parse_args("A=1;B=x=y;") == {"A": "1", "B": "x=y"}

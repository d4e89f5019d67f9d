"""apps/v1 Deployment: the seed's manifest validates; broken variants name the field."""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import pytest
import yaml

from tabby.model import ValidationError, lookup, validate

SEED = pathlib.Path(__file__).parents[2] / "examples" / "seed-001-nginx.yaml"


def seed_deployment() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(SEED.read_text()) if d]
    return next(d for d in docs if d["kind"] == "Deployment")


def test_seed_manifest_validates_with_defaults():
    docs = [validate(d) for d in yaml.safe_load_all(SEED.read_text()) if d]
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["apiVersion"] == "apps/v1"
    assert dep["metadata"]["namespace"] == "default"
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"},
    }
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx"
    svc = next(d for d in docs if d["kind"] == "Service")
    assert svc["spec"]["ports"][0]["nodePort"] == 30604


def test_replicas_default_and_explicit():
    dep = seed_deployment()
    del dep["spec"]["replicas"]
    assert validate(dep)["spec"]["replicas"] == 1
    dep["spec"]["replicas"] = 0
    assert validate(dep)["spec"]["replicas"] == 0


def test_kind_aliases():
    assert lookup("deploy").name == "Deployment"
    assert lookup("Deployments").api_version == "apps/v1"


def _broken(path: list[Any], value: Any) -> dict[str, Any]:
    dep = seed_deployment()
    node = dep
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = copy.deepcopy(value)
    return dep


_DELETE = object()


@pytest.mark.parametrize(
    "path, value, field, message",
    [
        (["spec", "selector"], _DELETE, "spec.selector", "required"),
        (["spec", "selector"], {}, "spec.selector", "empty selector"),
        (
            ["spec", "selector", "matchLabels"],
            {"app": "web"},
            "spec.selector",
            "does not match template `labels`",
        ),
        (
            ["spec", "template", "metadata", "labels"],
            {"app": "other"},
            "spec.selector",
            "does not match",
        ),
        (["spec", "template"], _DELETE, "spec.template", "required"),
        (["spec", "template", "spec", "containers"], _DELETE, "containers", "required"),
        (["spec", "replicas"], -1, "spec.replicas", "integer >= 0"),
        (["spec", "replicas"], "2", "spec.replicas", "integer"),
        (["spec", "replicaz"], 2, "spec.replicaz", "unknown field"),
        (
            ["spec", "template", "spec", "containers", 0, "imagee"],
            "nginx",
            "spec.template.spec.containers[0].imagee",
            "unknown field",
        ),
        (["spec", "strategy"], {"type": "Blue"}, "spec.strategy.type", "RollingUpdate|Recreate"),
        (
            ["spec", "strategy"],
            {"type": "Recreate", "rollingUpdate": {"maxSurge": 1}},
            "spec.strategy.rollingUpdate",
            "Recreate",
        ),
        (
            ["spec", "strategy"],
            {"rollingUpdate": {"maxSurge": "lots"}},
            "spec.strategy.rollingUpdate.maxSurge",
            "percentage",
        ),
        (["spec"], _DELETE, "spec", "required"),
    ],
)
def test_broken_variants_name_the_field(path, value, field, message):
    with pytest.raises(ValidationError) as err:
        validate(_broken(path, value))
    assert err.value.path is not None and err.value.path.endswith(field)
    assert field in str(err.value) and message in str(err.value)
    assert str(err.value).startswith("Deployment default/nginx: ")


def test_strategy_recreate_and_match_expressions_accepted():
    dep = seed_deployment()
    dep["spec"]["strategy"] = {"type": "Recreate"}
    dep["spec"]["selector"] = {
        "matchExpressions": [{"key": "app", "operator": "In", "values": ["nginx"]}]
    }
    out = validate(dep)
    assert out["spec"]["strategy"] == {"type": "Recreate"}

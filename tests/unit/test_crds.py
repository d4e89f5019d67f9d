"""deploy/crds agree with the model: every spec field of FelixConfiguration, IPPool,
BGPConfiguration, BGPPeer, IPAMBlock and IPAMHandle (src/tabby/model/calico.py) is in its CRD's
schema and nothing else is; groups and names are the ones the Kubernetes datastore uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tabby.datastore.kubernetes import wire_version
from tabby.model import calico, lookup

CRDS = Path(__file__).resolve().parents[2] / "deploy" / "crds"
SPECS = {
    "FelixConfiguration": calico._felix_spec,
    "IPPool": calico._pool_spec,
    "BGPConfiguration": calico._bgp_configuration_spec,
    "BGPPeer": calico._bgp_peer_spec,
    "IPAMBlock": calico._block_spec,
    "IPAMHandle": calico._handle_spec,
}


def crds() -> dict[str, dict]:
    out = {}
    for path in sorted(CRDS.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        assert path.name == f"{doc['metadata']['name']}.yaml"
        out[doc["spec"]["names"]["kind"]] = doc
    return out


def test_one_crd_per_kind():
    assert sorted(crds()) == sorted(SPECS)


@pytest.mark.parametrize("kind_name", sorted(SPECS))
def test_crd_matches_model(kind_name):
    crd = crds()[kind_name]
    kind = lookup(kind_name)
    spec = crd["spec"]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"{kind.plural}.{spec['group']}"
    assert f"{spec['group']}/v1" == wire_version(kind)
    assert spec["scope"] == ("Namespaced" if kind.namespaced else "Cluster")
    assert spec["names"]["plural"] == kind.plural
    (version,) = spec["versions"]
    assert version["served"] and version["storage"]
    schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    model = SPECS[kind_name]
    assert sorted(schema["properties"]) == sorted(model.fields)
    assert sorted(schema.get("required", [])) == sorted(model.required)
    for name, prop in schema["properties"].items():
        assert prop.get("type") in ("string", "integer", "boolean", "array", "object"), name
        assert prop.get("description"), name

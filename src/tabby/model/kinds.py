"""The registry of resource kinds: canonical name, accepted apiVersions, scope and CLI aliases.

The first apiVersion of a kind is canonical: validate() rewrites an accepted alternative to it.
Lookup is case-insensitive over the canonical name and every alias (kubectl-like).
"""

from __future__ import annotations

from dataclasses import dataclass

from tabby.model.errors import UnknownKind


@dataclass(frozen=True)
class Kind:
    name: str
    api_versions: tuple[str, ...]
    namespaced: bool
    aliases: tuple[str, ...]  # lower case: singular, plural, short names
    # Watched by tabby's own components (agent, typha, the Kubernetes datastore's informers).
    # False: a kind only the lab's controllers read (Deployment: on a real cluster
    # kube-controller-manager owns it; tabby needs no watch or RBAC for it).
    watched: bool = True

    @property
    def api_version(self) -> str:
        return self.api_versions[0]

    @property
    def plural(self) -> str:
        return self.aliases[1]


_CALICO = ("projectcalico.org/v3", "crd.projectcalico.org/v1")

KINDS: tuple[Kind, ...] = (
    Kind("Namespace", ("v1",), False, ("namespace", "namespaces", "ns")),
    Kind("Node", ("v1",), False, ("node", "nodes", "no")),
    Kind("Pod", ("v1",), True, ("pod", "pods", "po")),
    Kind("Service", ("v1",), True, ("service", "services", "svc")),
    Kind("Deployment", ("apps/v1",), True, ("deployment", "deployments", "deploy"), watched=False),
    Kind("EndpointSlice", ("discovery.k8s.io/v1",), True, ("endpointslice", "endpointslices")),
    Kind(
        "NetworkPolicy",
        ("networking.k8s.io/v1",),
        True,
        ("networkpolicy", "networkpolicies", "netpol"),
    ),
    Kind("FelixConfiguration", _CALICO, False, ("felixconfiguration", "felixconfigurations")),
    Kind("IPPool", _CALICO, False, ("ippool", "ippools")),
    Kind("BGPConfiguration", _CALICO, False, ("bgpconfiguration", "bgpconfigurations")),
    Kind("BGPPeer", _CALICO, False, ("bgppeer", "bgppeers")),
    Kind("IPAMBlock", ("tabby.dev/v1",), False, ("ipamblock", "ipamblocks")),
    Kind("IPAMHandle", ("tabby.dev/v1",), False, ("ipamhandle", "ipamhandles")),
)

_BY_NAME: dict[str, Kind] = {
    alias: kind for kind in KINDS for alias in (kind.name.lower(), *kind.aliases)
}


def lookup(name: str) -> Kind:
    """The Kind called ``name`` (any alias, any case); raises UnknownKind."""
    kind = _BY_NAME.get(str(name).lower())
    if kind is None:
        known = ", ".join(k.aliases[0] for k in KINDS)
        raise UnknownKind(f'unknown kind "{name}" (known kinds: {known})')
    return kind

"""tabby-cni: the CNI 1.0 entry point (ADD, DEL, CHECK, VERSION).

Input is the CNI_* environment and the network configuration JSON on stdin; output is the spec's
result JSON, or its error JSON with a non-zero exit. It runs in the node's network namespace
(kubelet runs it there; so does the lab) and reaches the datastore named in the config.
Example config:
  {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "tabby-cni", "nodename": "node1",
   "datastore": "sqlite:///run/tabby/demo/store.db", "mtu": 0, "ipam": {"type": "tabby-ipam"}}
``mtu: 0`` (or absent) means: as Calico, the data interface's MTU minus the overhead of the
encapsulations the cluster enables (VXLAN 50, IP-in-IP 20, WireGuard 60), or their configured
``vxlanMTU``/``ipipMTU``/``wireguardMTU`` (calc/mtu.py).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any

SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]

# Error codes of the CNI spec.
E_INCOMPATIBLE_VERSION = 1
E_UNSUPPORTED_FIELD = 2
E_UNKNOWN_CONTAINER = 3
E_INVALID_ENV = 4
E_IO = 5
E_DECODE = 6
E_INVALID_CONFIG = 7
E_TRY_AGAIN = 11


class CNIError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


@dataclass(frozen=True)
class Request:
    command: str
    container_id: str
    netns: str
    ifname: str
    pod_namespace: str
    pod_name: str
    config: dict[str, Any]

    @property
    def handle(self) -> str:
        return f"{self.config.get('name', 'k8s-pod-network')}.{self.container_id}"


def parse_args(cni_args: str) -> dict[str, str]:
    out = {}
    for part in filter(None, cni_args.split(";")):
        key, sep, value = part.partition("=")
        if not sep:
            raise CNIError(E_INVALID_ENV, f"CNI_ARGS: malformed entry {part!r} (want KEY=VALUE)")
        out[key] = value
    return out


def parse_request(env: dict[str, str], stdin: str) -> Request:
    """Validate the environment and config; raise CNIError naming what is wrong."""
    command = env.get("CNI_COMMAND", "")
    if command not in ("ADD", "DEL", "CHECK", "VERSION"):
        raise CNIError(
            E_INVALID_ENV, f"CNI_COMMAND must be ADD, DEL, CHECK or VERSION, not {command!r}"
        )
    try:
        config = json.loads(stdin) if stdin.strip() else {}
    except json.JSONDecodeError as e:
        raise CNIError(E_DECODE, f"network configuration is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CNIError(E_DECODE, "network configuration must be a JSON object")
    if command == "VERSION":
        return Request(command, "", "", "", "", "", config)
    version = config.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(
            E_INCOMPATIBLE_VERSION,
            f"cniVersion {version!r} is not supported",
            f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    for field in ("name", "type", "nodename", "datastore"):
        if not isinstance(config.get(field), str) or not config[field]:
            raise CNIError(E_INVALID_CONFIG, f"network configuration: {field} is required")
    mtu = config.get("mtu", 0)
    if not isinstance(mtu, int) or mtu < 0 or (0 < mtu < 576):
        raise CNIError(
            E_INVALID_CONFIG, f"network configuration: mtu {mtu!r} must be 0 (auto) or >= 576"
        )
    required = ["CNI_CONTAINERID", "CNI_IFNAME"] + (
        ["CNI_NETNS"] if command in ("ADD", "CHECK") else []
    )
    for var in required:
        if not env.get(var):
            raise CNIError(E_INVALID_ENV, f"{var} is required for {command}")
    args = parse_args(env.get("CNI_ARGS", ""))
    pod_ns = args.get("K8S_POD_NAMESPACE", "")
    pod_name = args.get("K8S_POD_NAME", "")
    if not pod_ns or not pod_name:
        raise CNIError(E_INVALID_ENV, "CNI_ARGS must carry K8S_POD_NAMESPACE and K8S_POD_NAME")
    return Request(
        command,
        env["CNI_CONTAINERID"],
        env.get("CNI_NETNS", ""),
        env["CNI_IFNAME"],
        pod_ns,
        pod_name,
        config,
    )


def error_json(version: str, err: CNIError) -> str:
    body: dict[str, Any] = {"cniVersion": version, "code": err.code, "msg": err.msg}
    if err.details:
        body["details"] = err.details
    return json.dumps(body)


def run(env: dict[str, str], stdin: str) -> tuple[int, str]:
    """The whole plugin as a function: returns (exit code, stdout text)."""
    version = "1.0.0"
    try:
        req = parse_request(env, stdin)
        version = req.config.get("cniVersion", version)
        if req.command == "VERSION":
            return 0, json.dumps({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS})
        from tabby.cni import wiring  # netlink and datastore: only once the input is valid

        if req.command == "ADD":
            return 0, json.dumps(wiring.add(req))
        if req.command == "DEL":
            wiring.delete(req)
            return 0, ""
        wiring.check(req)
        return 0, ""
    except CNIError as e:
        return 1, error_json(version, e)
    except Exception as e:  # noqa: BLE001 - the runtime must always get the spec's error JSON
        return 1, error_json(version, CNIError(E_IO, f"{type(e).__name__}: {e}"))


def main() -> None:
    code, out = run(dict(os.environ), sys.stdin.read())
    if out:
        print(out)
    sys.exit(code)

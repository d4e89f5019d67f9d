"""A lab cluster: bring it up, wait on its agents, tear it down (also after a crash).

``up`` refuses a lab whose name is taken. ``down`` trusts nothing but names: it stops the processes
recorded in the lab's state (by pid + start time), removes every ``<lab>-*`` namespace, the pin
directories ``/sys/fs/bpf/tabby/<lab>-*``, the cgroup subtree and the state directory.
"""

from __future__ import annotations

import glob
import ipaddress
import json
import os
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from tabby import preflight
from tabby.bpf.objects import PIN_BASE, node_pin_root
from tabby.dataplane.node import remove_pins
from tabby.datastore import open_datastore
from tabby.datastore.api import Datastore
from tabby.datastore.services import DEFAULT_SERVICE_CIDR
from tabby.lab import bgp, cgroups, etcd, fabric, pods, processes, state, topology
from tabby.lab.topology import LabPlan, NodePlan
from tabby.model import kops
from tabby.netlink.netns import enter_netns

HEALTH_PORT = 9099
DATASTORES = ("sqlite", "etcd")
BACKENDS = ("vxlan", "bird")  # Calico's calico_backend: bird runs BGP (lab/bgp.py)
Progress = Callable[[str], None]


class LabError(Exception):
    pass


def base_resources(
    plan: LabPlan, config: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """What a fresh lab cluster holds: config, the pool (VXLAN Always), nodes, the default ns.

    ``config``: the FelixConfiguration and IPPool(s) to use instead of the lab's (a cluster spec's
    rendering, see ``spec_resources``)."""
    objs: list[dict[str, Any]] = (
        list(config)
        if config is not None
        else [
            {
                "apiVersion": "projectcalico.org/v3",
                "kind": "FelixConfiguration",
                "metadata": {"name": "default"},
                "spec": {"bpfEnabled": True, "bpfExternalServiceMode": "Tunnel", "vxlanVNI": 4096},
            },
            {
                "apiVersion": "projectcalico.org/v3",
                "kind": "IPPool",
                "metadata": {"name": "default-ipv4-ippool"},
                "spec": {
                    "cidr": topology.POOL_CIDR,
                    "blockSize": 26,
                    "vxlanMode": "Always",
                    "ipipMode": "Never",
                    "natOutgoing": True,
                },
            },
        ]
    )
    for ns in ("default", "kube-system"):
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}},
            }
        )
    for node in plan.nodes:
        annotations = {"projectcalico.org/IPv4Address": f"{node.ip}/{node.prefixlen}"}
        addresses = [{"type": "InternalIP", "address": node.ip}]
        if node.ip6:  # dual-stack, as kubelet reports it: IPv4 first
            annotations["projectcalico.org/IPv6Address"] = f"{node.ip6}/64"
            addresses.append({"type": "InternalIP", "address": node.ip6})
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": node.name,
                    "labels": {"kubernetes.io/hostname": node.name},
                    "annotations": annotations,
                },
                "status": {"addresses": [*addresses, {"type": "Hostname", "address": node.name}]},
            }
        )
    return objs


def spec_resources(cluster: kops.KopsCluster) -> tuple[list[dict[str, Any]], list[str]]:
    """The rendered FelixConfiguration + IPPool a lab from ``cluster`` applies, and warnings.

    The pool keeps its encapsulation (IP-in-IP is done by the data interface's programs). An
    IPv6 spec's lab is dual-stack (topology.py): its IPv6 pool (the spec's podCIDR, else
    POOL6_CIDR) comes with the lab's IPv4 pool, both without encapsulation (routed over BGP)."""
    objs, warnings = kops.render(cluster, default_pod_cidr=topology.POOL6_CIDR), []
    if cluster.ipv6:
        objs.append(
            {
                "apiVersion": "projectcalico.org/v3",
                "kind": "IPPool",
                "metadata": {"name": kops.POOL_NAME[4]},
                "spec": {
                    "cidr": topology.POOL_CIDR,
                    "blockSize": 26,
                    "ipipMode": "Never",
                    "vxlanMode": "Never",
                    "natOutgoing": True,
                },
            }
        )
    for obj in objs:
        spec = obj["spec"]
        if obj["kind"] == "IPPool":
            pool = ipaddress.ip_network(spec["cidr"])
            for other in (topology.HOST_NET, topology.EXTERNAL_CIDR, topology.LOADBALANCER_CIDR):
                if pool.overlaps(ipaddress.ip_network(other)):
                    raise LabError(f"pod CIDR {pool} overlaps {other}, which the lab uses")
    svc = cluster.service_cidr
    if svc and ":" not in svc and svc != DEFAULT_SERVICE_CIDR:  # IPv6: see service_cidrs
        warnings.append(
            f"serviceClusterIPRange {svc}: the lab's datastore allocates ClusterIPs from "
            f"{DEFAULT_SERVICE_CIDR}"
        )
    return objs, warnings


def service_cidrs(plan: LabPlan, cluster: kops.KopsCluster | None) -> str:
    """The lab datastore's service CIDR(s): IPv4, and in an IPv6 lab the spec's IPv6
    serviceClusterIPRange (else SERVICE6_CIDR) too (kube-apiserver's dual-stack form)."""
    if not plan.ipv6:
        return DEFAULT_SERVICE_CIDR
    spec = cluster.service_cidr if cluster is not None else None
    v6 = spec if spec and ":" in spec else topology.SERVICE6_CIDR
    return f"{DEFAULT_SERVICE_CIDR},{v6}"


def _rmdir_if_empty(path: str) -> None:
    """Shared parents (tabby's cgroup, pin and run dirs) go with the last lab using them."""
    try:
        os.rmdir(path)
    except OSError:
        pass  # not empty (another lab) or already gone


def pin_root(lab: str, node: str) -> str:
    return node_pin_root(f"{lab}-{node}")


def tabby_bin() -> str:
    return os.path.join(os.path.dirname(sys.executable), "tabby")


def tabbyctl_bin() -> str:
    return os.path.join(os.path.dirname(sys.executable), "tabbyctl")


class Lab:
    def __init__(self, name: str = "demo") -> None:
        saved = state.read(name)
        self.name = name
        self.plan = topology.plan(
            name,
            int(saved.get("nodes", 3)),
            subnets=saved.get("subnets"),
            placement=saved.get("placement"),
            fabric_mtu=int(saved.get("fabric_mtu", 1500)),
            ipv6=bool(saved.get("ipv6", False)),
        )
        self.backend = str(saved.get("backend", "vxlan"))
        self.service_cidrs = service_cidrs(self.plan, None)

    @property
    def url(self) -> str:
        return state.datastore_url(self.name)

    def datastore(self) -> Datastore:
        return open_datastore(self.url)

    @property
    def etcd_url(self) -> str | None:
        """``etcd://127.0.0.1:PORT`` of a lab on etcd (for tabbyctl), else None."""
        url = state.read(self.name).get("etcd_url")
        return str(url) if url else None

    def _start_etcd(self, progress: Progress) -> None:
        """A private etcd for this lab: data in its state dir, clients on 127.0.0.1:<free port>
        and on a unix socket there (tabby-cni runs in node namespaces, where 127.0.0.1 is the
        node's); recorded as a lab process, so `lab down` stops it by PID."""
        work = state.lab_dir(self.name)
        os.makedirs(work, exist_ok=True)
        client, peer = etcd.free_port(), etcd.free_port()
        try:
            argv = etcd.argv(os.path.join(work, "etcd"), client, peer, unix_socket=True)
        except etcd.EtcdError as e:
            raise LabError(str(e)) from None
        self._start("etcd", argv, cgroups.group(self.name, "control"), cwd=work)
        url = f"etcd+unix://{etcd.socket_path(work)}"
        with state.editing(self.name) as st:
            st["datastore"], st["etcd_url"] = url, f"etcd://127.0.0.1:{client}"
            rec = next(p for p in st["procs"] if p["role"] == "etcd")
        try:
            etcd.wait_ready(url, alive=lambda: processes.alive(rec))
        except etcd.EtcdError as e:
            raise LabError(f"{e} (log: {os.path.join(work, 'etcd.log')})") from None
        progress(f"etcd: 127.0.0.1:{client} and {etcd.socket_path(work)}")

    # ------------------------------------------------------------------ up / down
    @classmethod
    def up(
        cls,
        name: str = "demo",
        nodes: int = 3,
        progress: Progress = print,
        *,
        cluster: kops.KopsCluster | None = None,
        fabric_mtu: int = 1500,
        datastore: str = "sqlite",
        backend: str | None = None,
        placement: Sequence[int] | None = None,
    ) -> Lab:
        """Build lab ``name``; from a kOps ``cluster`` spec (its subnets, node count, pool and
        encapsulation; ``nodes`` is then ignored), with every fabric link at ``fabric_mtu``.
        ``datastore``: ``sqlite`` (the embedded store) or ``etcd`` (a private etcd, see
        ``_start_etcd``). ``backend``: ``bird`` runs BGP (BIRD on every node and on the fabric's
        router), ``vxlan`` none; default: the spec's (bird for ipip), else vxlan.
        ``placement``: node i's subnet index (default: alternating; see ``topology.plan``)."""
        if datastore not in DATASTORES:
            raise LabError(f"datastore {datastore!r}: use one of {', '.join(DATASTORES)}")
        config = None
        if cluster is not None:
            spec_plan = topology.from_spec(name, cluster, fabric_mtu)
            plan = spec_plan.plan
            config, warnings = spec_resources(cluster)
            for warning in (*spec_plan.warnings, *warnings):
                progress(f"warning: {warning}")
        else:
            plan = topology.plan(name, nodes, fabric_mtu=fabric_mtu, placement=placement)
        if backend is None:
            backend = cluster.calico.backend if cluster is not None else "vxlan"
        if backend not in BACKENDS:
            raise LabError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
        taken = fabric.lab_netns(plan.netns_prefix())
        if state.exists(name) or taken:
            raise LabError(
                f"lab {name!r} already exists: run `tabbyctl lab down --name {name}` "
                "first (nothing was changed)"
            )
        preflight.require()
        lab = cls.__new__(cls)
        lab.name, lab.plan, lab.backend = name, plan, backend
        lab.service_cidrs = service_cidrs(plan, cluster)
        try:
            if datastore == "etcd":
                lab._start_etcd(progress)
            lab._build(progress, config)
        except BaseException:
            progress("lab up failed: removing what was created")
            cls.down(name, progress=lambda _m: None)
            raise
        return lab

    def _build(self, progress: Progress, config: list[dict[str, Any]] | None = None) -> None:
        subnets = [s.cidr for s in self.plan.subnets]
        with state.editing(self.name) as st:
            st["name"], st["nodes"] = self.name, len(self.plan.nodes)
            st["subnets"], st["fabric_mtu"] = subnets, self.plan.fabric_mtu
            st["placement"] = [subnets.index(n.subnet) for n in self.plan.nodes]
            st["backend"] = self.backend
            st["ipv6"] = self.plan.ipv6
            if self.service_cidrs != DEFAULT_SERVICE_CIDR and not st.get("datastore"):
                # every component opens the store with it (the embedded store's admission)
                path = f"{state.lab_dir(self.name)}/store.db"
                st["datastore"] = f"sqlite:///{path}?service-cidr={self.service_cidrs}"
        if self.service_cidrs != DEFAULT_SERVICE_CIDR:
            progress(f"datastore: {self.url} (dual-stack services: use it as TABBY_DATASTORE)")
        ds = self.datastore()
        objs = base_resources(self.plan, config)
        if self.backend == "bird":
            objs += bgp.resources(self.plan)
        ds.apply(objs)
        progress(
            f"fabric: {self.plan.fabric_netns} (router for {', '.join(subnets)}, "
            f"MTU {self.plan.fabric_mtu})"
        )
        fabric.build_fabric(self.plan)
        fabric.build_external(self.plan)
        if self.backend == "bird":
            self._start_router_bird(progress)
        for node in self.plan.nodes:
            also = f" {node.ip6}/64" if node.ip6 else ""
            progress(f"node {node.name}: {node.netns} {node.ip}/{node.prefixlen}{also}")
            fabric.build_node(self.plan, node)
            cgroups.group(self.name, node.name)
        progress("starting the controller and one agent per node")
        self._start(
            "controller",
            [tabby_bin(), "controller", "--datastore", self.url],
            cgroups.group(self.name, "control"),
        )
        for node in self.plan.nodes:
            self.start_agent(node)
        self.start_kubelet()
        self.wait_ready(progress=progress)

    def _start(
        self, role: str, argv: list[str], cgroup: str | None, cwd: str | None = None
    ) -> None:
        log = os.path.join(state.lab_dir(self.name), f"{role.replace(' ', '-')}.log")
        rec = processes.spawn(argv, role, log, cgroup=cgroup, cwd=cwd)
        with state.editing(self.name) as st:
            st["procs"] = [p for p in st["procs"] if p["role"] != role] + [rec]

    def _start_router_bird(self, progress: Progress) -> None:
        """The fabric router's BIRD (lab/bgp.py), a recorded lab process in the fabric netns."""
        work = bgp.router_bird_dir(state.lab_dir(self.name))
        os.makedirs(work, exist_ok=True)
        with open(os.path.join(work, "bird.conf"), "w") as f:
            f.write(bgp.router_config(self.plan))
        log = os.path.join(work, "bird.log")
        rec = processes.spawn(
            bgp.router_argv(work),
            "bird fabric",
            log,
            netns=self.plan.fabric_netns,
            cgroup=cgroups.group(self.name, "control"),
        )
        with state.editing(self.name) as st:
            st["procs"] = [p for p in st["procs"] if p["role"] != "bird fabric"] + [rec]
        progress(f"fabric router: BIRD (BGP AS {bgp.AS_NUMBER}) at {bgp.router_ip(self.plan)}")

    def bird_socket(self, node: str) -> str:
        """The control socket of a node's BIRD (``fabric``: the router's)."""
        lab_dir = state.lab_dir(self.name)
        if node == "fabric":
            return os.path.join(bgp.router_bird_dir(lab_dir), "bird.ctl")
        self.plan.node(node)  # a clear error for a node the lab does not have
        return os.path.join(bgp.node_bird_dir(lab_dir, node), "bird.ctl")

    def start_agent(self, node: NodePlan) -> None:
        argv = [
            tabby_bin(),
            "agent",
            "--node",
            node.name,
            "--datastore",
            self.url,
            "--netns",
            node.netns,
            "--pin-root",
            pin_root(self.name, node.name),
            "--data-iface",
            "eth0",
            "--health-port",
            str(HEALTH_PORT),
            "--cgroup",  # pods are its children: connect-time LB hooks see their sockets
            cgroups.group(self.name, node.name),
            "--networking-backend",
            self.backend,
        ]
        if self.backend == "bird":  # BIRD runs in the node's cgroup: `down` ends it with it
            argv += ["--bird-dir", bgp.node_bird_dir(state.lab_dir(self.name), node.name)]
        self._start(f"agent {node.name}", argv, cgroups.group(self.name, node.name))

    def start_kubelet(self) -> None:
        """The lab's kubelet + deployment controller (lab/deployments.py): Deployments -> pods."""
        argv = [tabbyctl_bin(), "lab", "kubelet", "--name", self.name]
        self._start("kubelet", argv, cgroups.group(self.name, "control"))

    def agent_proc(self, node: str) -> dict[str, Any]:
        for rec in state.read(self.name).get("procs", []):
            if rec["role"] == f"agent {node}":
                return dict(rec)
        raise LabError(f"no agent recorded for {node}")

    @staticmethod
    def down(name: str = "demo", progress: Progress = print) -> None:
        saved = state.read(name)
        # The kubelet first: it creates pods (and is the parent of their processes, which it
        # would otherwise leave as zombies that look alive).
        for proc in saved.get("procs", []):
            if proc["role"] == "kubelet":
                processes.stop(proc)
        saved = state.read(name)
        for pod in saved.get("pods", {}).values():
            for proc in pod.get("procs", []):
                processes.stop(proc)
        # The datastore (a lab etcd) goes last: agents and the controller stop while it is up.
        for proc in sorted(saved.get("procs", []), key=lambda p: bool(p["role"] == "etcd")):
            processes.stop(proc)
        topology.plan(name, 1)  # validates the name before anything is removed by prefix
        for ns in fabric.lab_netns(f"{name}-"):
            fabric.del_netns(ns)
        for pins in glob.glob(os.path.join(PIN_BASE, f"{name}-*")):
            remove_pins(pins)
        try:
            cgroups.remove(cgroups.root(name))
            _rmdir_if_empty(os.path.dirname(cgroups.root(name)))
        except RuntimeError:
            pass
        shutil.rmtree(state.lab_dir(name), ignore_errors=True)
        _rmdir_if_empty(state.RUN_BASE)
        _rmdir_if_empty(PIN_BASE)
        progress(f"lab {name} removed")

    # ------------------------------------------------------------------ agents
    def readyz(self, node: NodePlan) -> dict[str, Any]:
        """An agent's /readyz, fetched from inside its node's namespace."""
        result: dict[str, Any] = {}

        def fetch() -> None:
            with enter_netns(node.netns):
                try:
                    with urllib.request.urlopen(
                        f"http://127.0.0.1:{HEALTH_PORT}/readyz", timeout=2
                    ) as r:
                        result.update(json.load(r))
                except urllib.error.HTTPError as e:
                    result.update(json.load(e))
                except OSError as e:
                    result.update({"ready": False, "error": str(e)})

        t = threading.Thread(target=fetch)  # a fresh thread: setns never leaks into ours
        t.start()
        t.join()
        return result

    def wait_ready(
        self, revision: int | None = None, timeout_s: float = 60.0, progress: Progress | None = None
    ) -> int:
        """Block until every agent reports ready at ``revision`` (default: the store's now)."""
        target = self.datastore().revision() if revision is None else revision
        deadline = time.monotonic() + timeout_s
        pending = {n.name for n in self.plan.nodes}
        while pending:
            for node in self.plan.nodes:
                if node.name in pending:
                    r = self.readyz(node)
                    if r.get("ready") and int(r.get("revision", 0)) >= target:
                        pending.discard(node.name)
                        if progress:
                            progress(f"agent {node.name} ready at revision {r['revision']}")
            if pending and time.monotonic() > deadline:
                detail = {n: self.readyz(self.plan.node(n)) for n in sorted(pending)}
                raise LabError(f"agents not ready at revision {target}: {detail}")
            if pending:
                time.sleep(0.05)
        return target

    # ------------------------------------------------------------------ pods
    def add_pod(
        self,
        name: str,
        node: str,
        namespace: str = "default",
        image: str = "netexec",
        labels: dict[str, str] | None = None,
        wait: bool = True,
    ) -> str:
        ip = pods.add(self.plan, self.datastore(), name, node, namespace, image, labels)
        if wait:
            self.wait_ready()
        return ip

    def del_pod(self, name: str, namespace: str = "default", wait: bool = True) -> None:
        pods.remove(self.plan, self.datastore(), namespace, name)
        if wait:
            self.wait_ready()

    def pod(self, name: str, namespace: str = "default") -> dict[str, Any]:
        key = name if "/" in name else f"{namespace}/{name}"
        rec = state.read(self.name).get("pods", {}).get(key)
        if rec is None:
            raise LabError(f"pod {key} is not in lab {self.name}")
        return dict(rec)

    def exec_argv(self, pod: str, argv: list[str]) -> tuple[str, str]:
        """(netns, cgroup) a command for ``pod`` must run in."""
        rec = self.pod(pod)
        return rec["netns"], rec["cgroup"]

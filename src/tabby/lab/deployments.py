"""The lab's deployment controller + kubelet: each Deployment's replicas become lab pods.

What kube-controller-manager (Deployment -> ReplicaSet -> Pods) and kubelet do, folded into one
reconciler for the lab (there are no ReplicaSets): ``reconcile`` makes every Deployment own
exactly ``spec.replicas`` pods, created and removed with the lab's own pod machinery
(``pods.add`` / ``pods.remove``: tabby-cni, the pod's namespace and cgroup, its container as a
local program), so they are recorded in the lab state as `tabbyctl lab pod add` records them.

Invariants:
- A pod belongs to a Deployment through its ownerReference (kind Deployment, the Deployment's
  uid); a pod whose owner no longer exists (deleted, or recreated with a new uid) is removed
  (the garbage collector's part). Pods without such a reference are never touched.
- New pods are named ``<deployment>-<5 random lowercase chars>``, labelled with the template's
  labels, and go to the node with the fewest pods (ties: the first node). Scaling down removes
  the pods on the node holding most of the Deployment's pods, newest first.
- A template the lab cannot run (an image it does not know, more than one container) is refused
  before anything is created: status.conditions gets ``ReplicaFailure`` (reason
  ``FailedCreate``, the message) as kube-controller-manager writes it, and the log says why.
- status (replicas, readyReplicas, availableReplicas, updatedReplicas, conditions) is written
  only when it changed, so the reconciler's own writes do not wake it forever.
"""

from __future__ import annotations

import logging
import random
import string
import threading
from collections.abc import Callable
from typing import Any

from tabby.datastore.api import Compacted, Datastore, DatastoreError, Event, Obj
from tabby.lab import pods, state
from tabby.lab.topology import LabPlan

log = logging.getLogger(__name__)

RETRY_S = 5.0  # a failed pod creation is retried after this long (or on the next change)
BACKOFF_S = (0.5, 10.0)  # first and longest wait after a datastore error
SUFFIX_LEN = 5


class TemplateError(Exception):
    """A Deployment's pod template the lab cannot run; the message names the field."""


def owner_reference(deployment: Obj) -> dict[str, Any]:
    meta = deployment["metadata"]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owner_uid(pod: Obj) -> str | None:
    """The uid of the Deployment that owns ``pod``, or None."""
    for ref in pod["metadata"].get("ownerReferences", []):
        if ref.get("kind") == "Deployment" and ref.get("controller"):
            return str(ref.get("uid"))
    return None


def template_image(deployment: Obj) -> str:
    """The lab image a Deployment's pods run; raises TemplateError naming the field."""
    containers = deployment["spec"]["template"]["spec"]["containers"]
    if len(containers) != 1:
        raise TemplateError(
            f"spec.template.spec.containers: the lab runs pods of exactly one container, "
            f"got {len(containers)}"
        )
    image = str(containers[0].get("image", ""))
    lab = pods.lab_image(image)
    if lab is None:
        known = ", ".join(i for i in pods.IMAGES if i != "netpol")
        raise TemplateError(
            f'spec.template.spec.containers[0].image: image "{image}" is not runnable in the lab '
            f"(images the lab runs as local programs: {known})"
        )
    return lab


def pod_name(deployment: str, taken: set[str]) -> str:
    alphabet = string.ascii_lowercase
    while True:
        name = f"{deployment}-{''.join(random.choices(alphabet, k=SUFFIX_LEN))}"
        if name not in taken:
            return name


def _ready(pod: Obj) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def desired_status(deployment: Obj, owned: list[Obj], failure: str | None) -> Obj:
    """The status block kube-controller-manager would write for these pods."""
    want = int(deployment["spec"]["replicas"])
    ready = sum(1 for p in owned if _ready(p))
    available = ready >= want
    conditions: list[Obj] = [
        {
            "type": "Available",
            "status": "True" if available else "False",
            "reason": "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable",
            "message": "Deployment has minimum availability."
            if available
            else "Deployment does not have minimum availability.",
        }
    ]
    if failure is not None:
        conditions.append(
            {
                "type": "ReplicaFailure",
                "status": "True",
                "reason": "FailedCreate",
                "message": failure,
            }
        )
    status: Obj = {
        "observedGeneration": int(deployment["metadata"].get("generation", 1)),
        "replicas": len(owned),
        "updatedReplicas": len(owned),
        "readyReplicas": ready,
        "availableReplicas": ready,
        "unavailableReplicas": max(want - ready, 0),
        "conditions": conditions,
    }
    return status


class Reconciler:
    """One lab's Deployments -> pods. ``reconcile`` is idempotent; ``run`` repeats it on change."""

    def __init__(
        self,
        plan: LabPlan,
        ds: Datastore,
        add: Callable[..., str] = pods.add,
        remove: Callable[..., None] = pods.remove,
        lab_pods: Callable[[], set[str]] | None = None,
    ) -> None:
        """``add`` / ``remove`` / ``lab_pods`` (the ``ns/name`` keys the lab state records) are
        the lab's own unless given (unit tests give fakes)."""
        self.plan, self.ds = plan, ds
        self._add, self._remove = add, remove
        self._lab_pods = lab_pods or (lambda: set(state.read(plan.name).get("pods", {})))
        self.failed = False  # the last pass could not create a pod: retry later

    # ------------------------------------------------------------------ one pass
    def reconcile(self) -> int:
        """Make the lab's pods match every Deployment; returns the revision it read at."""
        self.failed = False
        deployments, revision = self.ds.list("Deployment")
        all_pods, _ = self.ds.list("Pod")
        uids = {d["metadata"]["uid"] for d in deployments}
        for pod in all_pods:  # the garbage collector: owner gone (or replaced)
            uid = owner_uid(pod)
            if uid is not None and uid not in uids:
                self._delete_pod(pod, "its Deployment is gone")
        for dep in deployments:
            self._reconcile_one(dep)
        return revision

    def _owned(self, dep: Obj) -> list[Obj]:
        uid = dep["metadata"]["uid"]
        pods_now, _ = self.ds.list("Pod", dep["metadata"]["namespace"])
        return [p for p in pods_now if owner_uid(p) == uid]

    def _reconcile_one(self, dep: Obj) -> None:
        meta = dep["metadata"]
        where = f"deployment {meta['namespace']}/{meta['name']}"
        failure: str | None = None
        try:
            image = template_image(dep)
        except TemplateError as e:
            failure = str(e)
            log.error("%s: refused: %s", where, failure)
        owned = self._owned(dep)
        want = int(dep["spec"]["replicas"])
        if failure is None:
            if len(owned) < want:
                failure = self._scale_up(dep, image, want - len(owned), where)
            elif len(owned) > want:
                self._scale_down(dep, owned, len(owned) - want, where)
            owned = self._owned(dep)
        self._write_status(dep, owned, failure)

    def _node_load(self) -> dict[str, int]:
        """Pods per node, as the scheduler counts them: every Pod object's spec.nodeName."""
        load = {n.name: 0 for n in self.plan.nodes}
        for pod in self.ds.list("Pod")[0]:
            node = pod["spec"].get("nodeName")
            if node in load:
                load[node] += 1
        return load

    def _scale_up(self, dep: Obj, image: str, count: int, where: str) -> str | None:
        meta = dep["metadata"]
        labels = dict(dep["spec"]["template"]["metadata"].get("labels", {}))
        for _ in range(count):
            load = self._node_load()
            node = min(self.plan.nodes, key=lambda n: load[n.name]).name
            taken = {p["metadata"]["name"] for p in self.ds.list("Pod", meta["namespace"])[0]}
            name = pod_name(meta["name"], taken)
            try:
                ip = self._add(
                    self.plan,
                    self.ds,
                    name,
                    node,
                    meta["namespace"],
                    image,
                    labels,
                    owner=owner_reference(dep),
                )
            except (pods.PodError, DatastoreError, OSError) as e:
                message = f"pod {meta['namespace']}/{name} on {node}: {e}"
                log.error("%s: %s", where, message)
                self.failed = True
                return message
            log.info("%s: pod %s on %s (%s)", where, name, node, ip)
        return None

    def _scale_down(self, dep: Obj, owned: list[Obj], count: int, where: str) -> None:
        per_node: dict[str, int] = {}
        for p in owned:
            node = p["spec"].get("nodeName", "")
            per_node[node] = per_node.get(node, 0) + 1

        # kube-controller-manager's order: not ready first, then crowded nodes, then newest
        # (two stable sorts: newest first, then the stronger criteria).
        newest = sorted(owned, key=lambda p: p["metadata"]["creationTimestamp"], reverse=True)
        ranked = sorted(newest, key=lambda p: (_ready(p), -per_node[p["spec"].get("nodeName", "")]))
        for pod in ranked[:count]:
            self._delete_pod(pod, f"scaled down to {dep['spec']['replicas']} ({where})")

    def _delete_pod(self, pod: Obj, why: str) -> None:
        meta = pod["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        try:
            if key in self._lab_pods():
                self._remove(self.plan, self.ds, meta["namespace"], meta["name"])
            else:  # an object without a lab pod (left by a crash): the object alone goes
                self.ds.delete("Pod", meta["name"], meta["namespace"])
            log.info("pod %s removed: %s", key, why)
        except (pods.PodError, DatastoreError, OSError) as e:
            log.error("pod %s: removing failed: %s", key, e)
            self.failed = True

    def _write_status(self, dep: Obj, owned: list[Obj], failure: str | None) -> None:
        status = desired_status(dep, owned, failure)
        if dep.get("status") == status:
            return
        meta = dep["metadata"]
        try:
            self.ds.patch("Deployment", meta["name"], meta["namespace"], {"status": status})
        except DatastoreError as e:  # deleted meanwhile: the next pass sees it
            log.info("deployment %s/%s: status not written: %s", meta["namespace"], meta["name"], e)

    # ------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event) -> None:
        """Reconcile, then again on every Deployment or Pod change (and RETRY_S after a failed
        creation) until ``stop``; relists after compaction or a datastore outage."""
        wake = threading.Event()  # ends one watch: on stop, or RETRY_S after a failure

        def forward_stop() -> None:
            stop.wait()
            wake.set()

        threading.Thread(target=forward_stop, name="kubelet-stop", daemon=True).start()
        wait_s = BACKOFF_S[0]
        while not stop.is_set():
            wake.clear()
            try:
                synced = self.reconcile()
                wait_s = BACKOFF_S[0]
                if self.failed:
                    threading.Timer(RETRY_S, wake.set).start()
                for ev in self.ds.watch(synced, wake):
                    if ev.revision > synced and _relevant(ev):
                        synced = max(self.reconcile(), ev.revision)
                        if self.failed:
                            threading.Timer(RETRY_S, wake.set).start()
            except Compacted:
                log.info("deployment controller: watch compacted, relisting")
            except DatastoreError as e:
                log.warning("deployment controller: %s (retrying in %.1f s)", e, wait_s)
                stop.wait(wait_s)
                wait_s = min(wait_s * 2, BACKOFF_S[1])
            except Exception:  # noqa: BLE001 - a bug must not end the lab's only kubelet
                log.exception(
                    "deployment controller: unexpected error (retrying in %.1f s)", wait_s
                )
                stop.wait(wait_s)
                wait_s = min(wait_s * 2, BACKOFF_S[1])


def _relevant(ev: Event) -> bool:
    return ev.kind in ("Deployment", "Pod")

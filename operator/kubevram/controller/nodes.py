"""Whether a placed replica may stay where it is: its node, and the scheduler's word on its pods.

A plan pins each replica to a node and some of its GPUs. Later the node may be deleted, go NotReady,
be cordoned, or lose the GPU labels or allocatable GPUs the plan counted on; or kube-scheduler may
leave the replica's pods ``PodScheduled=False`` (something the planner could not see holds the
node). Each of these is a reason to re-plan that replica; the functions here say which and why, in
words for the status and the events. NotReady nodes and unschedulable pods get a grace period (a
kubelet restarts, a preempted placeholder takes a moment to go).

Pure functions of plain dicts and the time, plus ``NodeCache``: the nodes as the node watch last
saw them, so that the periodic check costs no API call.
"""

from __future__ import annotations

import datetime
import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubevram.controller.render import LABEL_PLACEHOLDER, LABEL_SHAPE, RESERVATION
from kubevram.planner.inventory import node_inventory


def parse_time(value: Any) -> datetime.datetime | None:
    """An RFC 3339 timestamp as the API writes it (``2026-11-26T10:00:00Z``), else None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def _for(now: datetime.datetime, since: datetime.datetime | None) -> float:
    return (now - since).total_seconds() if since is not None else 0.0


def _condition(obj: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == type_:
            return cond
    return None


def node_problem(
    name: str,
    node: Mapping[str, Any] | None,
    now: datetime.datetime,
    grace: float,
    *,
    gpu_labels: bool = True,
) -> str:
    """Why no replica may stay on node ``name`` (``node``: the Node object, None when it is gone);
    empty when it may. NotReady counts only after ``grace`` seconds. ``gpu_labels``: the node must still
    advertise GPUs by GFD labels and allocatable (device-plugin mode; in DRA mode its ResourceSlices do)."""
    if node is None:
        return f"node {name} is gone"
    if (node.get("spec") or {}).get("unschedulable"):
        return f"node {name} is cordoned"
    ready = _condition(node, "Ready")
    if ready is None or ready.get("status") != "True":
        since = parse_time((ready or {}).get("lastTransitionTime"))
        if since is None or _for(now, since) >= grace:
            state = f"Ready={ready.get('status')}" if ready else "no Ready condition"
            return f"node {name} is NotReady ({state}) for {_for(now, since):.0f}s (grace {grace:.0f}s)"
    if gpu_labels and node_inventory(node, []) is None:
        return f"node {name} no longer advertises GPUs (nvidia.com/gpu labels or allocatable)"
    return ""


def advertises_gpus(node: Mapping[str, Any]) -> bool:
    """Whether a Node carries any NVIDIA label or allocatable resource (GFD, the device plugin)."""
    labels = (node.get("metadata") or {}).get("labels") or {}
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    return any(str(k).startswith("nvidia.com/") for k in [*labels, *allocatable])


def placement_problem(
    replica: Mapping[str, Any], node: Mapping[str, Any] | None, now: datetime.datetime, grace: float
) -> str:
    """Why a placed replica (plan JSON: ``node``, ``gpus``, ``maxMemory``, ``resource``) must move;
    empty when it may stay on ``node``. A replica of DRA devices (``resource`` a DeviceClass, no ``/`` in
    it) is checked for its node only: the scheduler checks its claim against the node's ResourceSlices."""
    name = str(replica.get("node") or "")
    resource = str(replica.get("resource") or "")  # status.placements do not carry it
    dra = bool(resource) and "/" not in resource
    problem = node_problem(name, node, now, grace, gpu_labels=not dra)
    if problem or node is None or dra:
        return problem
    inventory = node_inventory(node, [])
    assert inventory is not None  # node_problem said it advertises GPUs
    if resource and inventory.allocatable.get(resource, 0) <= 0:
        return f"node {name} has no allocatable {resource} any more"
    budgets = replica.get("maxMemory") or {}
    for pod_index, index in enumerate(replica.get("gpus") or []):
        if not 0 <= int(index) < len(inventory.devices):
            return f"node {name} has {len(inventory.devices)} GPU(s) now; the replica was on GPU {index}"
        have = inventory.devices[int(index)].memory_bytes
        want = int(budgets.get(str(pod_index)) or 0)
        if have < want:
            return (
                f"node {name} GPU {index} has {have // 2**20} MiB now; the replica's budget there is "
                f"{want // 2**20} MiB"
            )
    return ""


@dataclass(frozen=True)
class StuckPod:
    """A worker pod kube-scheduler has not placed: ``PodScheduled=False``."""

    name: str
    node: str  # the node its reservation pins it to
    seconds: float  # how long it has been so
    message: str  # the scheduler's words
    shape: str = ""  # its workload's placement shape

    def describe(self) -> str:
        why = f": {self.message}" if self.message else ""
        return f"pod {self.name} unschedulable on {self.node or 'its node'} for {self.seconds:.0f}s{why}"


def stuck_pods(pods: Iterable[Mapping[str, Any]], now: datetime.datetime) -> list[StuckPod]:
    """The worker pods (placeholders left out: they wait for the autoscaler by design) that are
    ``PodScheduled=False``, by name."""
    out = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        if LABEL_PLACEHOLDER in (meta.get("labels") or {}) or meta.get("deletionTimestamp"):
            continue
        cond = _condition(pod, "PodScheduled")
        if cond is None or cond.get("status") != "False":
            continue
        try:
            node = str(json.loads((meta.get("annotations") or {}).get(RESERVATION) or "{}").get("node") or "")
        except (ValueError, AttributeError):
            node = ""
        since = parse_time(cond.get("lastTransitionTime")) or parse_time(meta.get("creationTimestamp"))
        message = " ".join(str(cond.get("message") or cond.get("reason") or "").split())
        shape = str((meta.get("labels") or {}).get(LABEL_SHAPE) or "")
        out.append(StuckPod(str(meta.get("name")), node, _for(now, since), message, shape))
    return sorted(out, key=lambda p: p.name)


def failed_creates(workloads: Iterable[Mapping[str, Any]]) -> list[str]:
    """``<workload>: <message>`` for each workload whose ReplicaSet cannot create pods
    (``ReplicaFailure=True``, e.g. ``FailedCreate`` when PodSecurity admission refuses them)."""
    out = []
    for workload in workloads:
        cond = _condition(workload, "ReplicaFailure")
        if cond is not None and cond.get("status") == "True":
            name = (workload.get("metadata") or {}).get("name")
            reason = cond.get("reason") or "ReplicaFailure"
            message = " ".join(str(cond.get("message") or "").split())
            out.append(f"{name}: {reason}: {message}" if message else f"{name}: {reason}")
    return sorted(out)


class NodeCache:
    """The Node objects as the operator's node watch last saw them (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[str, Mapping[str, Any]] = {}

    def update(self, event_type: str | None, node: Mapping[str, Any]) -> None:
        name = str((node.get("metadata") or {}).get("name") or "")
        with self._lock:
            if event_type == "DELETED":
                self._nodes.pop(name, None)
            elif name:
                self._nodes[name] = node

    def get(self, name: str) -> Mapping[str, Any] | None:
        with self._lock:
            return self._nodes.get(name)

    def all(self) -> list[Mapping[str, Any]]:
        """Every node seen, by name."""
        with self._lock:
            return [self._nodes[name] for name in sorted(self._nodes)]

    def reset(self) -> None:
        with self._lock:
            self._nodes.clear()


#: The operator process's view of the nodes, fed by the node watch.
NODES = NodeCache()

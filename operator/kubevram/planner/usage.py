"""What the cluster's GPU memory holds now, per node and GPU and per LLMDeployment: the view behind the
operator's metrics (``kubevram.controller.metrics``) and ``kubevram top``.

Inputs are plain: Node objects, the other pods that hold GPUs, kubevram's reservations (the operator's
placement ledger, or the workloads' reservation annotations), and per LLMDeployment its desired replicas,
its status (``estimate``, ``placements``, ``autoscaling``, ``conditions``, ``workers``, ``calibration``)
and its worker pods. The per-GPU figures use the planner's inventory (``build_inventory``), the same
maths ``kubevram plan`` uses:

* ``capacity``: the device's memory as GPU Feature Discovery labels it;
* ``reserved``: what kubevram's reservations hold there (an exclusive replica reserves the whole GPU, a
  shared one its slice), at most the capacity;
* ``free``: what a new plan could still take there (``NodeInventory.free_bytes``: 0 on a GPU held whole);
* ``used``: what the workers placed there report their torch caching allocator holds
  (``status.workers.<pod>.devices[].reservedBytes``; the CUDA context, a few hundred MiB per process, is
  not in it), None while no worker there has reported. A pod's GPU ``i`` is the ``i``-th GPU, by index,
  of its reservation annotation: the plan's accounting (the device plugin picks the physical devices).

Other pods' GPU requests name no device, so they are per node: ``other_pods_bytes`` (devices requested
times a device's memory, per time-slice on time-sliced GPUs), and the node's ``free_bytes`` is its GPUs'
free bytes less those.

Per deployment: the estimate's parts, replicas desired/placed/ready/pending (with the ``Scheduled``
condition's reason, the planner's message and the GPU class the autoscaling signal asks for), the bytes
its reservations hold, the bytes its workers' allocators hold now, the largest peak one worker reported
(``peakReservedBytes`` summed over its GPUs) and the estimate's error as ``status.calibration`` computed
it (``perGpu.errorPct`` at the largest prefill measured, as a ratio; positive: the estimate is above the
measurement).

Pure: no API calls; malformed reports are skipped, never raised on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubevram.planner.inventory import (
    ANNOTATION_RESERVATION,
    NodeInventory,
    Reservation,
    build_inventory,
)

#: ``status.estimate`` keys and the ``part`` each is shown as.
ESTIMATE_PARTS = (
    ("weightsBytes", "weights"),
    ("kvCacheBytes", "kv_cache"),
    ("activationBytes", "activations"),
    ("overheadBytesPerGPU", "overhead_per_gpu"),
    ("totalBytes", "total"),
)


@dataclass(frozen=True)
class DeploymentState:
    """One LLMDeployment as the operator last saw it (or as ``kubevram top`` read it)."""

    namespace: str
    name: str
    desired: int
    status: Mapping[str, Any]
    pods: Sequence[Mapping[str, Any]] = ()  # its worker pods: their reservations place the reports

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True)
class GpuUsage:
    node: str
    index: int
    product: str
    capacity_bytes: int
    reserved_bytes: int
    free_bytes: int
    used_bytes: int | None
    deployments: tuple[str, ...]  # "namespace/name" of those with a reservation here

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "capacityBytes": self.capacity_bytes,
            "reservedBytes": self.reserved_bytes,
            "usedBytes": self.used_bytes,
            "freeBytes": self.free_bytes,
            "deployments": list(self.deployments),
        }


@dataclass(frozen=True)
class NodeUsage:
    name: str
    product: str
    sharing: str
    gpus: tuple[GpuUsage, ...]
    other_pods_devices: int  # devices (time-slices) other pods request
    other_pods_bytes: int
    inventory: NodeInventory = field(compare=False, repr=False)

    @property
    def free_bytes(self) -> int:
        """What a new plan could still take on the node's GPUs, less what other pods requested."""
        return max(0, sum(g.free_bytes for g in self.gpus) - self.other_pods_bytes)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "product": self.product,
            "sharing": self.sharing,
            "otherPodsDevices": self.other_pods_devices,
            "otherPodsBytes": self.other_pods_bytes,
            "freeBytes": self.free_bytes,
            "gpus": [g.to_json() for g in self.gpus],
        }


@dataclass(frozen=True)
class DeploymentUsage:
    namespace: str
    name: str
    desired: int
    placed: int
    ready: int
    pending: int
    pending_reason: str  # the Scheduled condition's reason while replicas wait, else ""
    pending_message: str
    gpu_class: str  # the node class the autoscaling signal asks for, else ""
    estimate: dict[str, int]  # part -> bytes (ESTIMATE_PARTS)
    reserved_bytes: int
    used_bytes: int | None
    measured_peak_bytes: int | None
    estimate_error_ratio: float | None
    reports: int  # worker reports in status.workers

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "replicas": {
                "desired": self.desired,
                "placed": self.placed,
                "ready": self.ready,
                "pending": self.pending,
            },
            "pendingReason": self.pending_reason,
            "pendingMessage": self.pending_message,
            "gpuClass": self.gpu_class,
            "estimateBytes": dict(self.estimate),
            "reservedBytes": self.reserved_bytes,
            "usedBytes": self.used_bytes,
            "measuredPeakBytes": self.measured_peak_bytes,
            "estimateErrorRatio": self.estimate_error_ratio,
            "workerReports": self.reports,
        }


@dataclass(frozen=True)
class ClusterUsage:
    nodes: tuple[NodeUsage, ...]
    deployments: tuple[DeploymentUsage, ...]
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": [n.to_json() for n in self.nodes],
            "deployments": [d.to_json() for d in self.deployments],
        }


# ------------------------------------------------------------------------------------ the reports


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def _devices(entry: Any) -> list[Mapping[str, Any]]:
    devices = entry.get("devices") if isinstance(entry, Mapping) else None
    return [d for d in devices if isinstance(d, Mapping)] if isinstance(devices, list) else []


def _sum(devices: Iterable[Mapping[str, Any]], key: str) -> int | None:
    values = [v for v in (_int(d.get(key)) for d in devices) if v is not None]
    return sum(values) if values else None


def _pod_reservations(state: DeploymentState) -> dict[str, Reservation]:
    """Worker pod name -> the reservation its annotation carries (the pod's node wins)."""
    out: dict[str, Reservation] = {}
    for pod in state.pods:
        meta = pod.get("metadata") if isinstance(pod, Mapping) else None
        if not isinstance(meta, Mapping):
            continue
        raw = (meta.get("annotations") or {}).get(ANNOTATION_RESERVATION)
        if raw is None:
            continue
        node = str((pod.get("spec") or {}).get("nodeName") or "")
        try:
            out[str(meta.get("name"))] = Reservation.from_annotation(state.namespace, state.name, raw, node)
        except ValueError:
            continue
    return out


def _used_per_gpu(states: Iterable[DeploymentState]) -> dict[tuple[str, int], int]:
    """(node, node GPU index) -> allocator bytes the workers placed there report."""
    out: dict[tuple[str, int], int] = {}
    for state in states:
        held = _pod_reservations(state)
        for pod, entry in (state.status.get("workers") or {}).items():
            reservation = held.get(str(pod))
            if reservation is None or not reservation.node:
                continue
            for device in _devices(entry):
                index, used = _int(device.get("index")), _int(device.get("reservedBytes"))
                if index is None or used is None or not 0 <= index < len(reservation.gpus):
                    continue
                where = (reservation.node, reservation.gpus[index][0])
                out[where] = out.get(where, 0) + used
    return out


def estimate_error_ratio(calibration: Any) -> float | None:
    """``status.calibration.perGpu``'s ``errorPct`` at the largest prefill measured, as a ratio."""
    rows = calibration.get("perGpu") if isinstance(calibration, Mapping) else None
    rows = [r for r in rows or [] if isinstance(r, Mapping) and isinstance(r.get("errorPct"), int | float)]
    if not rows:
        return None
    row = max(rows, key=lambda r: (_int(r.get("tokens")) or 0, abs(float(r["errorPct"]))))
    return float(row["errorPct"]) / 100.0


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _scheduled(status: Mapping[str, Any]) -> Mapping[str, Any]:
    for cond in status.get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == "Scheduled":
            return cond
    return {}


def deployment_usage(state: DeploymentState, reserved_bytes: int) -> DeploymentUsage:
    """One deployment's figures from its status (see the module docstring)."""
    status = state.status
    raw_estimate = _mapping(status.get("estimate"))
    estimate = {
        part: int(raw_estimate[key])
        for key, part in ESTIMATE_PARTS
        if _int(raw_estimate.get(key)) is not None
    }
    signal = _mapping(status.get("autoscaling"))
    pending = _int(signal.get("pendingReplicas")) or 0
    scheduled = _scheduled(status)
    reports = [e for e in (status.get("workers") or {}).values() if isinstance(e, Mapping)]
    used = [u for u in (_sum(_devices(e), "reservedBytes") for e in reports) if u is not None]
    peaks = [p for p in (_sum(_devices(e), "peakReservedBytes") for e in reports) if p is not None]
    return DeploymentUsage(
        namespace=state.namespace,
        name=state.name,
        desired=state.desired,
        placed=len(status.get("placements") or []),
        ready=_int(status.get("readyReplicas")) or 0,
        pending=pending,
        pending_reason=str(scheduled.get("reason") or "") if pending else "",
        pending_message=str(signal.get("reason") or "") if pending else "",
        gpu_class=str(signal.get("gpuClass") or "") if pending else "",
        estimate=estimate,
        reserved_bytes=reserved_bytes,
        used_bytes=sum(used) if used else None,
        measured_peak_bytes=max(peaks) if peaks else None,
        estimate_error_ratio=estimate_error_ratio(status.get("calibration")),
        reports=len(reports),
    )


# ------------------------------------------------------------------------------------------ nodes


def _other_pods_bytes(node: NodeInventory) -> int:
    """Bytes of the devices other pods request on ``node`` (a time-slice counts its share)."""
    total = 0
    for resource, count in node.foreign.items():
        device = next((d for d in node.devices if d.resource == resource), None)
        if device is not None:
            total += count * (device.memory_bytes // max(1, device.slots))
    return total


def cluster_usage(
    nodes: Sequence[Any],
    other_pods: Sequence[Mapping[str, Any]],
    reservations: Iterable[Reservation],
    deployments: Sequence[DeploymentState],
) -> ClusterUsage:
    """The cluster's GPU memory now: ``nodes`` (Node objects), ``other_pods`` (pods that are not
    kubevram's and request GPUs), ``reservations`` (kubevram's) and ``deployments``."""
    reservations = list(reservations)
    inventory = build_inventory(nodes, other_pods, reservations=reservations)
    held: dict[tuple[str, int], int] = {}
    holders: dict[tuple[str, int], dict[str, None]] = {}
    by_owner: dict[tuple[str, str], int] = {}
    for r in reservations:
        by_owner[r.owner] = by_owner.get(r.owner, 0) + sum(b for _, b in r.gpus)
        for index, nbytes in r.gpus:
            held[(r.node, index)] = held.get((r.node, index), 0) + nbytes
            holders.setdefault((r.node, index), {})[f"{r.namespace}/{r.deployment}"] = None
    used = _used_per_gpu(deployments)
    out_nodes = []
    for node in inventory.nodes:
        gpus = tuple(
            GpuUsage(
                node=node.name,
                index=d.index,
                product=node.product,
                capacity_bytes=d.memory_bytes,
                reserved_bytes=min(d.memory_bytes, held.get((node.name, d.index), 0)),
                free_bytes=node.free_bytes(d.index),
                used_bytes=used.get((node.name, d.index)),
                deployments=tuple(holders.get((node.name, d.index), {})),
            )
            for d in node.devices
        )
        out_nodes.append(
            NodeUsage(
                node.name,
                node.product,
                node.sharing,
                gpus,
                sum(node.foreign.values()),
                _other_pods_bytes(node),
                node,
            )
        )
    states = sorted(deployments, key=lambda s: s.key)
    return ClusterUsage(
        tuple(out_nodes),
        tuple(deployment_usage(s, by_owner.get(s.key, 0)) for s in states),
        tuple(inventory.warnings),
    )


__all__ = [
    "ESTIMATE_PARTS",
    "ClusterUsage",
    "DeploymentState",
    "DeploymentUsage",
    "GpuUsage",
    "NodeUsage",
    "cluster_usage",
    "deployment_usage",
    "estimate_error_ratio",
]

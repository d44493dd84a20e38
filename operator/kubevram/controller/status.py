"""Pure status rendering: conditions, phase, placements and the autoscaling signal.

Conditions follow Kubernetes' conventions: ``type``, ``status`` (True/False/Unknown), a CamelCase
``reason``, a ``message`` with the numbers, and ``lastTransitionTime``, which changes only when the
status does (so ``kubectl wait --for=condition=Ready`` and dashboards see real transitions).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from kubevram.controller.render import selector_string

PLANNED, SCHEDULED, READY = "Planned", "Scheduled", "Ready"
CONDITION_TYPES = (PLANNED, SCHEDULED, READY)
ESTIMATE_KEYS = (
    "parameters",
    "weightsBytes",
    "kvCacheBytesPerToken",
    "kvCacheBytes",
    "activationBytes",
    "overheadBytesPerGPU",
    "totalBytes",
)


def now_rfc3339() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    type_: str, status: bool | None, reason: str, message: str, generation: int | None
) -> dict[str, Any]:
    return {
        "type": type_,
        "status": "Unknown" if status is None else ("True" if status else "False"),
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


def merge_conditions(
    old: Sequence[Mapping[str, Any]] | None, new: Sequence[Mapping[str, Any]], now: str
) -> list[dict[str, Any]]:
    """The new conditions in a fixed order, keeping ``lastTransitionTime`` where the status is unchanged.

    Conditions of types not in ``new`` are kept as they were.
    """
    previous = {c.get("type"): c for c in old or [] if isinstance(c, Mapping)}
    updated = {c["type"]: dict(c) for c in new}
    out = []
    for type_ in [*CONDITION_TYPES, *sorted(t for t in {*previous, *updated} if t not in CONDITION_TYPES)]:
        if type_ in updated:
            item = updated[type_]
            before = previous.get(type_)
            same = (
                before is not None
                and before.get("status") == item["status"]
                and before.get("lastTransitionTime")
            )
            item["lastTransitionTime"] = before["lastTransitionTime"] if same and before else now
            out.append(item)
        elif type_ in previous:
            out.append(dict(previous[type_]))
    return out


def gib(value: int) -> str:
    """Bytes for people: ``17.3Gi``."""
    return f"{value / 2**30:.1f}Gi"


def replica_gpu_bytes(replica: Mapping[str, Any]) -> int:
    """GPU memory one replica is planned to use: its per-GPU totals, else its GPU budgets."""
    per_gpu = replica.get("perGpu")
    if per_gpu:
        return sum(int(g.get("total") or 0) for g in per_gpu if isinstance(g, Mapping))
    return sum(int(v) for k, v in (replica.get("maxMemory") or {}).items() if str(k).isdigit())


def placements(plan: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "node": r["node"],
            "gpus": [int(g) for g in r.get("gpus") or []],
            "budgets": {str(k): int(v) for k, v in (r.get("maxMemory") or {}).items()},
        }
        for r in plan.get("replicas") or []
    ]


def estimate(plan: Mapping[str, Any]) -> dict[str, int] | None:
    raw = plan.get("estimate") or {}
    if not all(k in raw for k in ESTIMATE_KEYS):
        return None
    return {k: int(raw[k]) for k in ESTIMATE_KEYS}


def autoscaling(plan: Mapping[str, Any]) -> dict[str, Any]:
    unscheduled = plan.get("unscheduled") or {}
    count = int(unscheduled.get("count") or 0)
    signal = unscheduled.get("autoscaling") or {}
    return {
        "pendingReplicas": count,
        "gpuClass": signal.get("gpuClass") if count else None,
        "minGpuMemoryMiB": signal.get("minGpuMemoryMiB") if count else None,
        "gpuCount": signal.get("gpuCount") if count else None,
        "reason": unscheduled.get("reason") if count else None,
    }


def planned_status(
    name: str,
    plan: Mapping[str, Any],
    *,
    desired: int,
    ready: int,
    generation: int | None,
    old_conditions: Sequence[Mapping[str, Any]] | None,
    now: str,
) -> dict[str, Any]:
    """The status after a plan was applied: placed and pending replicas, readiness, the signal."""
    placed = len(plan.get("replicas") or [])
    signal = autoscaling(plan)
    pending = signal["pendingReplicas"]
    est = estimate(plan)
    first = (plan.get("replicas") or [None])[0]
    per_replica = replica_gpu_bytes(first) if first else (est or {}).get("totalBytes")
    total = (est or {}).get("totalBytes")
    conditions = [
        condition(
            PLANNED,
            True,
            "Planned",
            f"{desired} replica(s) of {gib(total) if total else '?'} each; "
            f"{placed} placed, {pending} pending",
            generation,
        ),
        condition(
            SCHEDULED, True, "AllPlaced", f"{placed} of {desired} replica(s) placed on nodes", generation
        )
        if not pending
        else condition(
            SCHEDULED, False, "InsufficientGPUMemory", signal["reason"] or f"{pending} unplaced", generation
        ),
        condition(
            READY,
            (ready >= desired and desired > 0) or desired == 0,
            "AllReplicasReady" if ready >= desired else "ReplicasNotReady",
            f"{ready} of {desired} replica(s) ready",
            generation,
        ),
    ]
    if pending:
        phase = "Scheduling"
    elif desired and ready >= desired:
        phase = "Running"
    elif ready:
        phase = "Degraded"
    else:
        phase = "Planned"
    return {
        "phase": phase,
        "observedGeneration": generation,
        "conditions": merge_conditions(old_conditions, conditions, now),
        "replicas": desired,
        "readyReplicas": ready,
        "selector": selector_string(name),
        "vramPerReplica": gib(per_replica) if per_replica else None,
        "estimate": est,
        "placements": placements(plan),
        "autoscaling": signal,
    }


def failed_status(
    name: str,
    type_: str,
    reason: str,
    message: str,
    *,
    generation: int | None,
    old_conditions: Sequence[Mapping[str, Any]] | None,
    now: str,
) -> dict[str, Any]:
    """The status of a spec that cannot work: the condition names the field and value."""
    conditions = [condition(type_, False, reason, message, generation)]
    if type_ == PLANNED:
        conditions.append(condition(SCHEDULED, False, "NotPlanned", "nothing to schedule", generation))
    conditions.append(condition(READY, False, "NotPlanned", "no worker runs", generation))
    return {
        "phase": "Failed",
        "observedGeneration": generation,
        "conditions": merge_conditions(old_conditions, conditions, now),
        "replicas": 0,
        "readyReplicas": 0,
        "selector": selector_string(name),
        "placements": [],
    }

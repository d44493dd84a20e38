"""Pure status rendering: conditions, phase, placements and the autoscaling signal.

Conditions follow Kubernetes' conventions: ``type``, ``status`` (True/False/Unknown), a CamelCase
``reason``, a ``message`` with the numbers, and ``lastTransitionTime``, which changes only when the
status does (so ``kubectl wait --for=condition=Ready`` and dashboards see real transitions).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from kubevram.controller.render import group_pods, selector_string
from kubevram.planner.placement import vram_per_replica

PLANNED, SCHEDULED, READY = "Planned", "Scheduled", "Ready"
#: Whether the InferencePool spec.serving.inferencePool asks for exists (or why not).
INFERENCE_POOL = "InferencePool"
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


def condition_of(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any]:
    """The condition of ``type_`` among ``conditions`` (empty when there is none)."""
    return next((c for c in conditions or [] if isinstance(c, Mapping) and c.get("type") == type_), {})


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


def placements(plan: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per replica: its node, GPUs and budgets; a multi-node replica (its leader's) also lists ``pods``."""
    out = []
    for r in plan.get("replicas") or []:
        item: dict[str, Any] = {
            "node": r["node"],
            "gpus": [int(g) for g in r.get("gpus") or []],
            "budgets": {str(k): int(v) for k, v in (r.get("maxMemory") or {}).items()},
        }
        if r.get("group"):
            item["pods"] = [{"node": p["node"], "gpus": [int(g) for g in p["gpus"]]} for p in group_pods(r)]
        out.append(item)
    return out


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
        "nodeCount": (signal.get("nodeCount") or 1) if count and signal else None,
        "reason": unscheduled.get("reason") if count else None,
    }


def scheduled_condition(
    placed: int,
    desired: int,
    signal: Mapping[str, Any],
    generation: int | None,
    problems: Sequence[tuple[str, str]] = (),
    note: str = "",
    code: str | None = None,
) -> dict[str, Any]:
    """``Scheduled``: False while replicas wait for a node (``InsufficientGPUMemory``, or ``code``: e.g.
    ``LeaderWorkerSetUnavailable`` when they need a group the cluster cannot run) or while the cluster
    refuses placed ones (``problems``: ``(reason, message)``, e.g. ``PodsUnschedulable``, ``FailedCreate``);
    ``AllPlaced`` only when neither. ``note`` says what the last plan changed."""
    pending = int(signal.get("pendingReplicas") or 0)
    if pending:
        why = signal.get("reason") or f"{pending} unplaced"
        return condition(SCHEDULED, False, code or "InsufficientGPUMemory", why, generation)
    if problems:
        return condition(SCHEDULED, False, problems[0][0], "; ".join(m for _, m in problems), generation)
    message = f"{placed} of {desired} replica(s) placed on nodes" + (f"; {note}" if note else "")
    return condition(SCHEDULED, True, "AllPlaced", message, generation)


def phase_of(desired: int, ready: int, waiting: bool) -> str:
    if waiting:
        return "Scheduling"
    if desired and ready >= desired:
        return "Running"
    return "Degraded" if ready else "Planned"


def planned_status(
    name: str,
    plan: Mapping[str, Any],
    *,
    desired: int,
    ready: int,
    generation: int | None,
    old_conditions: Sequence[Mapping[str, Any]] | None,
    now: str,
    problems: Sequence[tuple[str, str]] = (),
    note: str = "",
) -> dict[str, Any]:
    """The status after a plan was applied: placed and pending replicas, readiness, the signal, and
    what the cluster says of the placed ones (``problems``, see ``scheduled_condition``)."""
    placed = len(plan.get("replicas") or [])
    signal = autoscaling(plan)
    pending = signal["pendingReplicas"]
    est = estimate(plan)
    per_replica = vram_per_replica(plan)
    conditions = [
        condition(
            PLANNED,
            True,
            "Planned",
            f"{desired} replica(s) of {gib(per_replica) if per_replica else '?'} GPU memory each; "
            f"{placed} placed, {pending} pending",
            generation,
        ),
        scheduled_condition(
            placed, desired, signal, generation, problems, note, (plan.get("unscheduled") or {}).get("code")
        ),
        condition(
            READY,
            (ready >= desired and desired > 0) or desired == 0,
            "AllReplicasReady" if ready >= desired else "ReplicasNotReady",
            f"{ready} of {desired} replica(s) ready",
            generation,
        ),
    ]
    return {
        "phase": phase_of(desired, ready, bool(pending or problems)),
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
    serving: tuple[int, int] = (0, 0),
) -> dict[str, Any]:
    """The status of a spec that cannot work: the condition names the field and value. ``serving``:
    (replicas, ready) of an earlier plan's workers, which keep running (a typo in an update does not take
    a serving model down); their placements, estimate and per-replica figure stay in the status."""
    replicas, ready = serving
    conditions = [condition(type_, False, reason, message, generation)]
    if type_ == PLANNED:
        conditions.append(condition(SCHEDULED, False, "NotPlanned", "nothing to schedule", generation))
    if replicas:
        conditions.append(condition(
            READY, bool(ready), "PreviousPlanServing",
            f"{ready} of {replicas} replica(s) of the previous plan ready; they keep serving until the spec "
            "is fixed", generation,
        ))
    else:
        conditions.append(condition(READY, False, "NotPlanned", "no worker runs", generation))
    out: dict[str, Any] = {
        "phase": "Failed",
        "observedGeneration": generation,
        "conditions": merge_conditions(old_conditions, conditions, now),
        "replicas": replicas,
        "readyReplicas": ready,
        "selector": selector_string(name),
        "autoscaling": autoscaling({}),  # nothing pending
    }
    if not replicas:
        # No plan: no per-replica figure, no estimate (a merge patch removes them).
        out.update({"placements": [], "vramPerReplica": None, "estimate": None})
    return out

"""kopf handlers for LLMDeployment: each is a decorator, a one-line docstring and one call.

The work lives in ``kubevram.controller.reconcile`` (plan, render, apply, report); importing this
module registers the handlers with kopf and does nothing else.
"""

from __future__ import annotations

import os
from typing import Any

import kopf

from kubevram.api.v1alpha1 import GROUP, PLURAL, VERSION
from kubevram.controller.adapter import Cluster
from kubevram.controller.reconcile import (
    Reconciler,
    Settings,
    node_event,
    replan_waiting,
    start_afresh,
    waiting_here,
    waiting_key,
)

RESOURCE = (GROUP, VERSION, PLURAL)
#: How often ready replicas are re-read from the workloads (seconds; the chart may set it).
READY_INTERVAL = float(os.environ.get("KUBEVRAM_READY_INTERVAL") or 15)


def reconciler(body: kopf.Body) -> Reconciler:
    """A reconciler on the cluster in KUBECONFIG, reporting events on ``body``."""

    def report(reason: str, message: str, warning: bool) -> None:
        (kopf.warn if warning else kopf.info)(body, reason=reason, message=message)

    return Reconciler(Cluster(), Settings.from_env(), report=report)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Keep kopf's bookkeeping under kubevram's own annotation prefix and finalizer; start a fresh ledger."""
    start_afresh()  # the ledger is rebuilt from the children by the first plan's read of them
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = 20  # logging.INFO: plan decisions become events on the resource


@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
@kopf.on.resume(*RESOURCE)
def reconcile(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    """Plan the deployment against the cluster and apply its children."""
    reconciler(body).plan_and_apply(body, patch)


@kopf.on.delete(*RESOURCE)
def release(body: kopf.Body, logger: kopf.Logger, **kwargs: Any) -> None:
    """Remove the workloads at once and re-plan the deployments waiting for their GPUs."""
    logger.info("released the reservations of %d workload(s)", reconciler(body).release(body))
    key = (body.get("metadata", {}).get("namespace") or "default", body.get("metadata", {}).get("name"))
    replan_waiting(Cluster(), Settings.from_env(), [k for k in kwargs["waiting"] if k != key])


@kopf.index(*RESOURCE)
def waiting(body: kopf.Body, **_: Any) -> dict[tuple[str, str], int] | None:
    """LLMDeployments with replicas that wait for a node."""
    return waiting_key(body)


@kopf.on.event("", "v1", "nodes")
def nodes(type: str, body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    """Re-plan what a node change affects: waiting deployments, replicas on a node that went away."""
    seen = memo.setdefault("gpu_nodes", {})  # per operator run
    node_event(Cluster(), Settings.from_env(), type, body, seen, set(kwargs["waiting"]) | waiting_here())


@kopf.timer(*RESOURCE, interval=READY_INTERVAL)
def readiness(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    """Check what was placed: nodes, unscheduled or refused pods, ready replicas, stale worker reports."""
    reconciler(body).refresh(body, patch)


# status.calibration from the workers' reports: its own timer, registered on import.
import kubevram.controller.calibrate  # noqa: E402, F401

"""Calibration in the operator: ``status.calibration`` from what the workers report in ``status.workers``.

A kopf timer per LLMDeployment (every ``KUBEVRAM_CALIBRATION_INTERVAL`` seconds, 60 by default) reads
the workers' prefill samples and the estimate, computes predicted vs measured peaks and refits the
activation coefficient (:func:`kubevram.planner.calibration.calibrate`), and patches
``status.calibration`` when it changed. A timer rather than a field handler on ``status.workers``: kopf
keeps the fields its handlers watch in the last-handled-configuration annotation, which would then copy
every worker report into an annotation write; a timer costs nothing when nothing changed.

When no new coefficient can be fitted (too few samples, e.g. after a roll-out), the previous one stays.
With ``spec.estimation.useCalibration`` the planner applies it at the next plan of the deployment
(:func:`with_calibration` hands it over; a spec change or a scale-up plans again).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import kopf

from kubevram.api.errors import SpecError
from kubevram.api.v1alpha1 import (
    GROUP,
    PLURAL,
    VERSION,
    LLMDeployment,
    LLMDeploymentSpec,
    LLMDeploymentStatus,
)
from kubevram.controller.status import now_rfc3339
from kubevram.planner.calibration import calibrate, coefficient_from_status

RESOURCE = (GROUP, VERSION, PLURAL)
CALIBRATION_INTERVAL = float(os.environ.get("KUBEVRAM_CALIBRATION_INTERVAL") or 60)


def calibration_status(body: Mapping[str, Any], now: str) -> dict[str, Any] | None:
    """The new ``status.calibration`` of ``body``, or ``None`` when there is nothing new to write."""
    status = body.get("status") or {}
    workers = status.get("workers") or {}
    old = status.get("calibration") if isinstance(status.get("calibration"), Mapping) else None
    if not workers and not old:
        return None
    try:
        spec = LLMDeploymentSpec.model_validate(body.get("spec") or {})
    except ValueError:
        return None  # the reconcile handler reports the spec's errors
    in_use = coefficient_from_status(status) if spec.estimation.useCalibration else None
    result = calibrate(
        workers if isinstance(workers, Mapping) else {},
        status.get("estimate") if isinstance(status.get("estimate"), Mapping) else None,
        spec.serving.maxSequenceLength * spec.serving.maxBatchSize,
        model=spec.model.id,
        weights=str(spec.precision.weights),
        coefficient_in_use=in_use,
    )
    result["inUse"] = in_use is not None
    previous = (old or {}).get("coefficient")
    if result["coefficient"] is None and isinstance(previous, Mapping):
        result["coefficient"] = dict(previous)
        result["reason"] = f"{result.get('reason', '')}; the previous coefficient stays".lstrip("; ")
    if old is not None and {k: v for k, v in old.items() if k != "time"} == result:
        return None
    result["time"] = now
    return result


def with_calibration(deployment: LLMDeployment, status: Mapping[str, Any] | None) -> LLMDeployment:
    """``deployment`` carrying its ``status.calibration`` (and nothing else of the status) for the planner,
    when it opts in with ``spec.estimation.useCalibration`` and a coefficient exists."""
    if not deployment.spec.estimation.useCalibration or coefficient_from_status(status) is None:
        return deployment
    assert status is not None
    calibration = LLMDeploymentStatus(calibration=dict(status["calibration"]))
    return deployment.model_copy(update={"status": calibration})


@kopf.timer(*RESOURCE, interval=CALIBRATION_INTERVAL, initial_delay=min(CALIBRATION_INTERVAL, 10.0))
def calibration(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    """Compare the workers' measured peaks with the estimate; refit the activation coefficient."""
    try:
        new = calibration_status(body, now_rfc3339())
    except (SpecError, KeyError, TypeError, ValueError) as exc:  # bad reports never stop the operator
        kopf.warn(body, reason="CalibrationFailed", message=str(exc))
        return
    if new is not None:
        patch.status["calibration"] = new

"""Calibration: the workers' measured peaks against the estimate, and the activation coefficient refitted.

Seed 000 measured ChatGLM-6B's GPU memory against the sequence length and found a straight line,
``MemCost = a x SeqLen + b`` (``a = 1.13 MiB``, ``b = 3717 MiB``). Each worker reports, per prefill
size, the peak bytes the torch allocator held during that prefill (``status.workers.<pod>.samples``:
``tokens`` and ``peakAllocatedBytes``, summed over the pod's GPUs). Here, pure and plain:

* :func:`fit_line`: least squares ``peak = a x tokens + b`` over the samples, with the coefficient of
  determination and the residuals; :class:`NotEnough` (with the reason) when the samples cannot determine
  a line: fewer than :data:`MIN_SAMPLES`, fewer than two distinct sizes, a span too narrow, or a negative
  slope (memory never shrinks with more tokens).
* :func:`activation_bytes_per_token`: the slope holds the KV cache every token adds (all layers) plus
  the activations of a decoder block; ``(a - kvCacheBytesPerToken) / gpus`` is the per-token activation
  coefficient the planner takes as ``Workload(activation_bytes_per_token=...)``
  (``spec.estimation.useCalibration``). With ``n`` GPUs each one holds its own block's activations, so
  the summed slope holds the activation term ``n`` times (balanced maps; exact for one GPU).
* :func:`predicted_peak_bytes`: what the estimate says the allocator holds at ``tokens`` prefill tokens:
  weights + KV x tokens + activations (the formula's, scaled linearly from the serving limits, or the
  calibrated coefficient) - the allocator's view, so without the CUDA context and headroom.
* :func:`calibrate`: the whole ``status.calibration`` object from ``status.workers`` and
  ``status.estimate``: per pod and GPU the predicted and measured peak at the largest measured prefill
  and the error, and the refitted coefficient (or why there is none).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubevram.api.v1alpha1 import LLMDeployment

MIN_SAMPLES = 3
MIN_DISTINCT_SIZES = 2
MIN_SPAN = 1.5  # the largest size must be at least this multiple of the smallest


@dataclass(frozen=True)
class Sample:
    """One prefill of one pod: its token count and the peak allocated bytes over ``gpus`` GPUs."""

    pod: str
    tokens: int
    peak_bytes: int
    gpus: int = 1


@dataclass(frozen=True)
class Fit:
    """``peak = bytes_per_token x tokens + intercept_bytes`` over ``samples`` points."""

    bytes_per_token: float
    intercept_bytes: float
    samples: int
    r2: float
    rms_residual_bytes: float

    def predict(self, tokens: float) -> float:
        return self.bytes_per_token * tokens + self.intercept_bytes


@dataclass(frozen=True)
class NotEnough:
    """Why the samples determine no line."""

    reason: str
    samples: int


def fit_line(points: Sequence[tuple[float, float]]) -> Fit | NotEnough:
    """Least squares over ``(tokens, peak_bytes)`` points; :class:`NotEnough` when they cannot decide."""
    pts = [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y) and x > 0]
    n = len(pts)
    if n < MIN_SAMPLES:
        return NotEnough(f"not enough samples: {n} (at least {MIN_SAMPLES} prefills are needed)", n)
    sizes = {x for x, _ in pts}
    if len(sizes) < MIN_DISTINCT_SIZES:
        return NotEnough(
            f"not enough samples: all {n} prefills had {int(next(iter(sizes)))} tokens "
            f"(at least {MIN_DISTINCT_SIZES} different sizes are needed)",
            n,
        )
    low, high = min(sizes), max(sizes)
    if high < MIN_SPAN * low:
        return NotEnough(
            f"not enough samples: prefill sizes span only {int(low)}-{int(high)} tokens "
            f"(the largest must be at least {MIN_SPAN}x the smallest)",
            n,
        )
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    sxy = sum((x - mx) * (y - my) for x, y in pts)
    syy = sum((y - my) ** 2 for _, y in pts)
    a = sxy / sxx
    b = my - a * mx
    if a < 0:
        return NotEnough(f"the fitted slope is negative ({a:.0f} bytes per token): inconsistent samples", n)
    residuals = [y - (a * x + b) for x, y in pts]
    sse = sum(r * r for r in residuals)
    r2 = 1.0 - sse / syy if syy > 0 else 1.0
    return Fit(a, b, n, r2, math.sqrt(sse / n))


def activation_bytes_per_token(fit: Fit, kv_bytes_per_token: float, gpus: int = 1) -> float | None:
    """The activation coefficient in the slope: ``(a - kv) / gpus``; ``None`` if the slope is below the KV."""
    activation = (fit.bytes_per_token - kv_bytes_per_token) / max(1, gpus)
    return activation if activation > 0 else None


def predicted_peak_bytes(
    estimate: Mapping[str, Any],
    tokens: int,
    prefill_tokens: int,
    *,
    coefficient: float | None = None,
    gpus: int = 1,
) -> int:
    """The allocator peak the estimate predicts at a prefill of ``tokens`` (summed over ``gpus`` GPUs).

    ``estimate`` is ``status.estimate`` (``weightsBytes``, ``kvCacheBytesPerToken``, ``activationBytes``
    at ``prefill_tokens`` = ``maxSequenceLength x maxBatchSize``); ``coefficient`` replaces the formula's
    activations per token when calibration is in use.
    """
    weights = int(estimate["weightsBytes"])
    kv = int(estimate["kvCacheBytesPerToken"]) * tokens
    if coefficient is not None:
        activation = coefficient * tokens
    else:
        activation = int(estimate["activationBytes"]) * tokens / max(1, prefill_tokens)
    return int(weights + kv + gpus * activation)


def samples_from_workers(
    workers: Mapping[str, Any], *, model: str | None = None, weights: str | None = None
) -> tuple[list[Sample], list[str]]:
    """The samples in ``status.workers`` (entries of another model or precision are left out) and what
    was skipped, as messages naming the field."""
    out: list[Sample] = []
    skipped: list[str] = []
    for pod, entry in sorted((workers or {}).items()):
        if not isinstance(entry, Mapping):
            skipped.append(f"status.workers.{pod}: not an object")
            continue
        if model is not None and entry.get("model") not in (None, model):
            skipped.append(f"status.workers.{pod}.model: {entry.get('model')!r} is not {model!r}")
            continue
        if weights is not None and entry.get("weights") not in (None, weights):
            skipped.append(f"status.workers.{pod}.weights: {entry.get('weights')!r} is not {weights!r}")
            continue
        devices = entry.get("devices")
        gpus = len(devices) if isinstance(devices, list) else 0
        raw = entry.get("samples") or []
        if not isinstance(raw, list):
            skipped.append(f"status.workers.{pod}.samples: not a list")
            continue
        for i, sample in enumerate(raw):
            where = f"status.workers.{pod}.samples[{i}]"
            try:
                tokens, peak = int(sample["tokens"]), int(sample["peakAllocatedBytes"])
            except (KeyError, TypeError, ValueError):
                skipped.append(f"{where}: needs integer tokens and peakAllocatedBytes")
                continue
            if tokens <= 0 or peak <= 0 or gpus == 0:
                skipped.append(f"{where}: {tokens} tokens, {peak} bytes on {gpus} GPUs")
                continue
            out.append(Sample(pod, tokens, peak, gpus))
    return out, skipped


def calibrate(
    workers: Mapping[str, Any],
    estimate: Mapping[str, Any] | None,
    prefill_tokens: int,
    *,
    model: str | None = None,
    weights: str | None = None,
    coefficient_in_use: float | None = None,
) -> dict[str, Any]:
    """``status.calibration`` from ``status.workers`` and ``status.estimate`` (see the module docstring).

    ``perGpu``: per pod, at its largest measured prefill, ``predictedBytes`` (the estimate, with
    ``coefficient_in_use`` if the planner uses one) vs ``measuredPeakBytes`` and ``errorPct`` (positive:
    the estimate is above the measurement); ``device`` is the pod's GPU index, ``"all"`` for the sum over a
    pod's several GPUs. ``coefficient``: the refit (``bytesPerToken`` for the planner, the fitted line's
    ``slopeBytesPerToken`` and ``interceptBytes``, ``samples``, ``gpus``, ``r2``) or ``None`` with
    ``reason``.
    """
    samples, skipped = samples_from_workers(workers, model=model, weights=weights)
    per_gpu: list[dict[str, Any]] = []
    if estimate is not None:
        largest: dict[str, Sample] = {}
        for s in samples:
            if s.pod not in largest or s.tokens > largest[s.pod].tokens:
                largest[s.pod] = s
        for pod, s in sorted(largest.items()):
            predicted = predicted_peak_bytes(
                estimate, s.tokens, prefill_tokens, coefficient=coefficient_in_use, gpus=s.gpus
            )
            per_gpu.append(
                {
                    "pod": pod,
                    "device": "0" if s.gpus == 1 else "all",
                    "tokens": s.tokens,
                    "predictedBytes": predicted,
                    "measuredPeakBytes": s.peak_bytes,
                    "errorPct": round(100.0 * (predicted - s.peak_bytes) / s.peak_bytes, 2),
                }
            )
    result: dict[str, Any] = {"perGpu": per_gpu, "coefficient": None, "samples": len(samples)}
    if skipped:
        result["skipped"] = skipped[:10]
    if not samples:
        result["reason"] = "not enough samples: no worker has reported a prefill yet"
        return result
    gpus = Counter(s.gpus for s in samples).most_common(1)[0][0]
    group = [s for s in samples if s.gpus == gpus]
    fit = fit_line([(s.tokens, s.peak_bytes) for s in group])
    if isinstance(fit, NotEnough):
        result["reason"] = fit.reason
        return result
    if estimate is None:
        result["reason"] = "no estimate in the status yet (the KV bytes per token are needed)"
        return result
    kv = float(estimate["kvCacheBytesPerToken"])
    activation = activation_bytes_per_token(fit, kv, gpus)
    if activation is None:
        result["reason"] = (
            f"the fitted slope ({fit.bytes_per_token:.0f} bytes per token) is below the KV cache's "
            f"{kv:.0f} bytes per token: inconsistent samples"
        )
        return result
    result["coefficient"] = {
        "bytesPerToken": round(activation),
        "slopeBytesPerToken": round(fit.bytes_per_token),
        "interceptBytes": round(fit.intercept_bytes),
        "samples": fit.samples,
        "gpus": gpus,
        "r2": round(fit.r2, 6),
    }
    return result


def coefficient_from_status(status: Mapping[str, Any] | None) -> float | None:
    """``status.calibration.coefficient.bytesPerToken`` if present and positive, else ``None``."""
    calibration = (status or {}).get("calibration") or {}
    coefficient = calibration.get("coefficient") if isinstance(calibration, Mapping) else None
    value = coefficient.get("bytesPerToken") if isinstance(coefficient, Mapping) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


def deployment_coefficient(deployment: LLMDeployment) -> float | None:
    """The coefficient in ``deployment.status.calibration`` (the planner applies it only when
    ``spec.estimation.useCalibration`` is true, see ``Workload.from_spec``)."""
    status = deployment.status
    return coefficient_from_status({"calibration": status.calibration} if status is not None else None)


__all__ = [
    "MIN_SAMPLES",
    "Fit",
    "NotEnough",
    "Sample",
    "activation_bytes_per_token",
    "calibrate",
    "coefficient_from_status",
    "deployment_coefficient",
    "fit_line",
    "predicted_peak_bytes",
    "samples_from_workers",
]

"""Calibration maths on synthetic samples: the line fit, its refusals, the coefficient, status.calibration."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubevram.api.quantity import MiB
from kubevram.api.v1alpha1 import LLMDeploymentSpec
from kubevram.planner.calibration import (
    Fit,
    NotEnough,
    activation_bytes_per_token,
    calibrate,
    coefficient_from_status,
    fit_line,
    predicted_peak_bytes,
    samples_from_workers,
)
from kubevram.planner.catalog import CONFIGS
from kubevram.planner.estimate import Workload, estimate, kv_bytes_per_token, layer_activation_bytes
from kubevram.planner.facts import facts_from_config

CHATGLM_A = 1.13 * MiB  # seed 000: MemCost(MiB) = 1.13 x SeqLen + 3717
CHATGLM_B = 3717 * MiB
LLAMA = facts_from_config(CONFIGS["meta-llama/llama-3.2-1b"])


def noisy_line(a: float, b: float, sizes: list[int], noise: float, seed: int = 0) -> list[tuple[int, float]]:
    rng = random.Random(seed)
    return [(t, (a * t + b) * (1 + rng.gauss(0, noise))) for t in sizes]


def test_recovers_the_seeds_chatglm_line_from_noisy_samples():
    sizes = [16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048] * 2
    fit = fit_line(noisy_line(CHATGLM_A, CHATGLM_B, sizes, noise=0.005, seed=6))
    assert isinstance(fit, Fit)
    assert fit.bytes_per_token / MiB == pytest.approx(1.13, rel=0.03)
    assert fit.intercept_bytes / MiB == pytest.approx(3717, rel=0.01)
    assert fit.samples == len(sizes) and fit.r2 > 0.99
    assert fit.predict(2048) / MiB == pytest.approx(1.13 * 2048 + 3717, rel=0.01)


@given(
    a=st.floats(min_value=1.0, max_value=1e7),
    b=st.floats(min_value=0.0, max_value=1e11),
    sizes=st.lists(st.integers(min_value=1, max_value=65536), min_size=3, max_size=40, unique=True),
)
def test_exact_samples_give_the_exact_line(a, b, sizes):
    fit = fit_line([(t, a * t + b) for t in sizes])
    if max(sizes) < 1.5 * min(sizes):
        assert isinstance(fit, NotEnough) and "span" in fit.reason
        return
    assert isinstance(fit, Fit)
    assert fit.bytes_per_token == pytest.approx(a, rel=1e-6)
    assert fit.intercept_bytes == pytest.approx(b, rel=1e-6, abs=a * max(sizes) * 1e-6)
    assert fit.r2 == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    ("points", "fragment"),
    [
        ([], "0 (at least 3"),
        ([(100, 1e9), (200, 2e9)], "2 (at least 3"),
        ([(512, 1e9), (512, 1.1e9), (512, 0.9e9)], "all 3 prefills had 512 tokens"),
        ([(1000, 1e9), (1100, 1.1e9), (1200, 1.2e9)], "span only 1000-1200"),
        ([(100, 3e9), (200, 2e9), (400, 1e9)], "slope is negative"),
        ([(0, 1e9), (-5, 2e9), (100, 1e9)], "1 (at least 3"),
    ],
)
def test_few_or_degenerate_samples_say_why(points, fragment):
    result = fit_line(points)
    assert isinstance(result, NotEnough)
    assert fragment in result.reason
    assert result.reason.startswith(("not enough samples", "the fitted slope"))


def test_activation_coefficient_is_the_slope_less_the_kv_cache_per_gpu():
    kv = 32 * 1024
    fit = Fit(bytes_per_token=kv + 60_000, intercept_bytes=0, samples=5, r2=1, rms_residual_bytes=0)
    assert activation_bytes_per_token(fit, kv) == pytest.approx(60_000)
    two = Fit(bytes_per_token=kv + 2 * 60_000, intercept_bytes=0, samples=5, r2=1, rms_residual_bytes=0)
    assert activation_bytes_per_token(two, kv, gpus=2) == pytest.approx(60_000)
    below = Fit(bytes_per_token=kv - 1, intercept_bytes=0, samples=5, r2=1, rms_residual_bytes=0)
    assert activation_bytes_per_token(below, kv) is None


def test_chatglm_slope_leaves_a_positive_activation_term():
    facts = facts_from_config(CONFIGS["thudm/chatglm-6b"])
    kv = kv_bytes_per_token(facts, Workload(weights="float16"))
    assert kv == 2 * 28 * 32 * 128 * 2  # 0.4375 MiB per token
    fit = fit_line(noisy_line(CHATGLM_A, CHATGLM_B, [64, 128, 256, 512, 1024, 2048], 0.0))
    assert isinstance(fit, Fit)
    assert activation_bytes_per_token(fit, kv) == pytest.approx(1.13 * MiB - kv, rel=1e-6)


def llama_estimate(workload: Workload) -> dict[str, int]:
    e = estimate(LLAMA, workload)
    return {
        "weightsBytes": e.weightsBytes,
        "kvCacheBytesPerToken": e.kvCacheBytesPerToken,
        "activationBytes": e.activationBytes,
        "totalBytes": e.totalBytes,
    }


def worker(samples: list[tuple[int, float]], gpus: int = 1, weights: str = "bfloat16") -> dict:
    return {
        "model": "meta-llama/Llama-3.2-1B",
        "weights": weights,
        "devices": [{"index": i} for i in range(gpus)],
        "samples": [{"tokens": t, "batch": 1, "peakAllocatedBytes": int(p)} for t, p in samples],
    }


def test_calibrate_refits_the_coefficient_and_the_planner_then_predicts_the_measurement():
    workload = Workload(weights="bfloat16", max_sequence_length=4096, max_batch_size=1)
    est = llama_estimate(workload)
    formula = layer_activation_bytes(LLAMA, workload, tokens=1)
    true_activation = 1.25 * formula  # the model really needs 25 % more than the formula says
    slope = est["kvCacheBytesPerToken"] + true_activation
    base = est["weightsBytes"] + 8 * MiB

    def measured(t: int) -> float:
        return slope * t + base

    workers = {
        "llama-0": worker(noisy_line(slope, base, [128, 512, 1024, 2048], 0.002, seed=1)),
        "llama-1": worker(noisy_line(slope, base, [256, 768, 4096], 0.002, seed=2)),
        "llama-old": worker([(100, 1e9), (200, 5e9), (300, 9e9)], weights="float32"),  # another precision
    }
    result = calibrate(workers, est, 4096, model="meta-llama/Llama-3.2-1B", weights="bfloat16")
    assert result["samples"] == 7
    assert result["skipped"] == ["status.workers.llama-old.weights: 'float32' is not 'bfloat16'"]
    coefficient = result["coefficient"]
    assert coefficient["bytesPerToken"] == pytest.approx(true_activation, rel=0.03)
    assert coefficient["interceptBytes"] == pytest.approx(base, rel=0.01)
    assert coefficient["samples"] == 7 and coefficient["gpus"] == 1 and coefficient["r2"] > 0.99
    # Per pod at its largest prefill: the formula's prediction under-estimates by about the 25 %.
    rows = {row["pod"]: row for row in result["perGpu"]}
    assert set(rows) == {"llama-0", "llama-1"}
    row = rows["llama-1"]
    assert row["device"] == "0" and row["tokens"] == 4096
    assert row["predictedBytes"] == predicted_peak_bytes(est, 4096, 4096)
    error = 100 * (row["predictedBytes"] / row["measuredPeakBytes"] - 1)
    assert row["errorPct"] == pytest.approx(error, abs=0.01)
    assert row["errorPct"] < -1.0
    # The refitted coefficient in the planner's Workload predicts the measurement within 1 %.
    calibrated = Workload(
        weights="bfloat16", max_sequence_length=4096, activation_bytes_per_token=coefficient["bytesPerToken"]
    )
    activation = layer_activation_bytes(LLAMA, calibrated)
    peak = est["weightsBytes"] + est["kvCacheBytesPerToken"] * 4096 + activation
    assert peak == pytest.approx(measured(4096), rel=0.01)
    again = calibrate(workers, est, 4096, weights="bfloat16", coefficient_in_use=coefficient["bytesPerToken"])
    assert all(abs(r["errorPct"]) < 1.0 for r in again["perGpu"])


def test_calibrate_two_gpu_pods_divide_the_activation_term():
    est = llama_estimate(Workload(weights="bfloat16"))
    kv, act = est["kvCacheBytesPerToken"], 70_000
    slope = kv + 2 * act
    result = calibrate({"p": worker([(t, slope * t + 3e9) for t in (100, 400, 1600)], gpus=2)}, est, 4096)
    assert result["coefficient"]["bytesPerToken"] == pytest.approx(act, rel=1e-6)
    assert result["coefficient"]["gpus"] == 2
    assert result["perGpu"][0]["device"] == "all"


def test_calibrate_without_enough_samples_keeps_no_coefficient_and_says_why():
    est = llama_estimate(Workload())
    empty = calibrate({}, est, 4096)
    assert empty["coefficient"] is None and empty["perGpu"] == []
    assert empty["reason"] == "not enough samples: no worker has reported a prefill yet"
    one = calibrate({"p": worker([(512, 3e9)])}, est, 4096)
    assert one["coefficient"] is None and "1 (at least 3" in one["reason"]
    assert one["perGpu"][0]["measuredPeakBytes"] == 3_000_000_000  # the comparison needs one sample only
    no_estimate = calibrate({"p": worker([(100, 2e9), (200, 3e9), (400, 5e9)])}, None, 4096)
    assert no_estimate["coefficient"] is None and "no estimate" in no_estimate["reason"]
    below = calibrate({"p": worker([(100, 2e9), (200, 2e9 + 100), (400, 2e9 + 300)])}, est, 4096)
    assert below["coefficient"] is None and "below the KV cache" in below["reason"]


def test_malformed_worker_entries_are_skipped_naming_the_field():
    workers = {
        "a": "nonsense",
        "b": {"devices": [{}], "samples": "many"},
        "c": {"devices": [{}], "samples": [{"tokens": "x"}, {"tokens": 10, "peakAllocatedBytes": 0}]},
        "d": {"devices": [], "samples": [{"tokens": 10, "peakAllocatedBytes": 5}]},  # a CPU worker
        "e": {"devices": [{}], "samples": [{"tokens": 10, "peakAllocatedBytes": 5}]},
    }
    samples, skipped = samples_from_workers(workers)
    assert [(s.pod, s.tokens, s.peak_bytes, s.gpus) for s in samples] == [("e", 10, 5, 1)]
    assert skipped == [
        "status.workers.a: not an object",
        "status.workers.b.samples: not a list",
        "status.workers.c.samples[0]: needs integer tokens and peakAllocatedBytes",
        "status.workers.c.samples[1]: 10 tokens, 0 bytes on 1 GPUs",
        "status.workers.d.samples[0]: 10 tokens, 5 bytes on 0 GPUs",
    ]


def test_the_planner_reads_the_coefficient_only_when_the_deployment_opts_in():
    status = {"calibration": {"coefficient": {"bytesPerToken": 70_000}}}
    assert coefficient_from_status(status) == 70_000.0
    for bad in (None, {}, {"calibration": None}, {"calibration": {"coefficient": None}},
                {"calibration": {"coefficient": {"bytesPerToken": -3}}},
                {"calibration": {"coefficient": {"bytesPerToken": True}}}):
        assert coefficient_from_status(bad) is None
    spec = {"model": {"id": "meta-llama/Llama-3.2-1B"}}
    off = LLMDeploymentSpec.model_validate(spec)
    on = LLMDeploymentSpec.model_validate({**spec, "estimation": {"useCalibration": True}})
    assert Workload.from_spec(off, coefficient_from_status(status)).activation_bytes_per_token is None
    assert Workload.from_spec(on, coefficient_from_status(status)).activation_bytes_per_token == 70_000.0
    assert Workload.from_spec(on, coefficient_from_status({})).activation_bytes_per_token is None

"""GPU tier (opt-in: KUBEVRAM_GPU_TESTS=1 on a CUDA machine): release, sleep and estimate on
Llama-3.2-1B's shape.

The model is built from the published config with random weights (``bench/gpu_release_bench.py``
builds it and runs the worker's engine and memory monitor); generations at growing lengths, then the
release between two engine steps, then sleep and wake at levels 1 and 2. Asserted: at least 95 % of the
reserved-but-unallocated bytes are returned, the same process then generates again, and the estimate
(weights + KV + activations) is within 3 % of the measured prefill peak at every length; each sleep
level frees the weights' VRAM (allocator and NVML), and the wake brings them back with the same greedy
answer. The durations (release, sleep, wake) are benchmark figures, recorded by the bench script in
``bench/README.md``, not asserted here.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        os.environ.get("KUBEVRAM_GPU_TESTS") != "1" or not torch.cuda.is_available(),
        reason="GPU tier: set KUBEVRAM_GPU_TESTS=1 on a machine with CUDA",
    ),
]

LENGTHS = [256, 512, 1024, 2048, 4096]


def bench() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "gpu_release_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_release_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run():
    return asyncio.run(bench().measure(LENGTHS, device="cuda", dtype="bfloat16"))


def test_release_returns_the_cached_memory_without_a_restart(run):
    release = run.release
    assert release["cachedBeforeBytes"] > 64 * 2**20, release  # the long prefills left a cache to return
    assert release["returnedShare"] >= 0.95, release
    assert release["after"]["reservedBytes"] < release["before"]["reservedBytes"]
    assert release["after"]["allocatedBytes"] <= release["before"]["allocatedBytes"]
    if release["before"]["nvmlUsedBytes"] is not None:
        assert release["after"]["nvmlUsedBytes"] < release["before"]["nvmlUsedBytes"]
    assert run.after_release["completionTokens"] == 16  # the same engine serves on


def test_estimate_within_3_percent_of_the_measured_peak(run):
    assert [row["tokens"] for row in run.rows] == LENGTHS
    for row in run.rows:
        assert row["completionTokens"] == 16
        assert abs(row["errorPct"]) <= 3.0, row


def test_the_samples_fit_a_line_with_a_positive_activation_term(run):
    fit = run.fit
    assert "reason" not in fit, fit
    assert fit["r2"] > 0.99
    assert fit["activationBytesPerToken"] is not None and fit["activationBytesPerToken"] > 0


@pytest.mark.parametrize("level", ["1", "2"])
def test_sleep_frees_the_weights_vram_and_wakes_to_the_same_answer(run, level):
    s = run.sleep[level]
    weights = s["weightsBytes"]
    assert weights > 2 * 2**30, s  # Llama-3.2-1B in bfloat16: about 2.5 GB (1.24 B parameters, tied)
    before, asleep, awake = s["before"], s["asleep"], s["awake"]
    assert s["freedBytes"] >= 0.95 * weights, s  # the weights' blocks and the cache went back to CUDA
    assert before["allocatedBytes"] - asleep["allocatedBytes"] >= 0.95 * weights, s
    if before["nvmlUsedBytes"] is not None:
        assert before["nvmlUsedBytes"] - asleep["nvmlUsedBytes"] >= 0.9 * weights, s
    assert awake["allocatedBytes"] >= asleep["allocatedBytes"] + 0.95 * weights, s  # back on the GPU
    assert s["sameAnswer"], s

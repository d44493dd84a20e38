"""Memory formulas, table-driven against hand-computed bytes (vLLM's test_kv_cache_utils style)."""

from __future__ import annotations

import pytest

from kubevram.api.load import load_deployments
from kubevram.api.quantity import GiB, MiB
from kubevram.planner.catalog import CONFIGS
from kubevram.planner.estimate import (
    DEFAULT_OVERHEAD_BYTES,
    Workload,
    estimate,
    full_forward_bytes_per_token,
    head_activation_bytes,
    kv_cache_bytes,
    layer_activation_bytes,
)
from kubevram.planner.facts import facts_from_config
from kubevram.planner.modules import Linear

LLAMA2_7B = facts_from_config(CONFIGS["meta-llama/llama-2-7b-hf"])
QWEN2_7B = facts_from_config(CONFIGS["qwen/qwen2-7b"])
MISTRAL_7B = facts_from_config(CONFIGS["mistralai/mistral-7b-v0.1"])
CHATGLM_6B = facts_from_config(CONFIGS["thudm/chatglm-6b"])


@pytest.mark.parametrize(
    ("precision", "expected"),
    [
        ("float32", 6_738_415_616 * 4),
        ("float16", 6_738_415_616 * 2),
        ("bfloat16", 6_738_415_616 * 2),
        # int8: 32 layers x 7 Linear; weights 1 B + float32 row scales; embeddings, norms, head in float16
        (
            "int8",
            32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
            + 32 * 4 * (4 * 4096 + 2 * 11008 + 4096)
            + 2 * (2 * 32000 * 4096 + 65 * 4096),
        ),
        # int4 (NF4): half a byte per weight + one float32 absmax per 64 weights + each Linear's
        # 16-entry float32 lookup table
        (
            "int4",
            32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) // 2
            + 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) // 64 * 4
            + 32 * 7 * 64
            + 2 * (2 * 32000 * 4096 + 65 * 4096),
        ),
    ],
)
def test_weights_by_precision(precision: str, expected: int) -> None:
    rotary = 2 * 64 * 4  # inv_freq and original_inv_freq, float32
    assert estimate(LLAMA2_7B, Workload(weights=precision)).weightsBytes == expected + rotary


def test_int8_and_int4_of_one_linear() -> None:
    lin = Linear(out_features=10, in_features=128, bias=True)
    assert lin.bytes("int8") == 10 * 128 + 10 * 4 + 10 * 2
    assert lin.bytes("int4") == 10 * 128 // 2 + (10 * 128 // 64) * 4 + 64 + 10 * 2
    assert Linear(10, 128, quantizable=False).bytes("int4") == 10 * 128 * 2


@pytest.mark.parametrize(
    ("facts", "kv_cache", "seq", "batch", "expected"),
    [
        (LLAMA2_7B, "auto", 4096, 1, 2 * 32 * 32 * 128 * 2 * 4096),  # 2 GiB, the well-known Llama-2-7B figure
        (QWEN2_7B, "auto", 4096, 4, 2 * 28 * 4 * 128 * 2 * 4096 * 4),  # GQA: 4 KV heads
        (QWEN2_7B, "float32", 10, 1, 2 * 28 * 4 * 128 * 4 * 10),
        # sliding window 4096: right after the prefill of the longest prompt (32,767 tokens: one is left
        # for the answer) every layer still holds the whole prompt; past that step, 4096 tokens
        (MISTRAL_7B, "auto", 32768, 1, 2 * 32 * 8 * 128 * 2 * 32767),
        (MISTRAL_7B, "auto", 1000, 1, 2 * 32 * 8 * 128 * 2 * 1000),
    ],
)
def test_kv_cache(facts, kv_cache: str, seq: int, batch: int, expected: int) -> None:  # type: ignore[no-untyped-def]
    workload = Workload(kv_cache=kv_cache, max_sequence_length=seq, max_batch_size=batch)
    assert kv_cache_bytes(facts, workload) == expected


def test_activations_at_the_serving_limits() -> None:
    workload = Workload(weights="bfloat16", max_sequence_length=2048, max_batch_size=2)
    tokens = 4096
    mask = 2 * 2048 * 2048  # the padded batch's (2, 1, 2048, 2048) boolean attention mask
    # Qwen2-7B: the MLP dominates: residual + normed + 3 x intermediate, bf16
    assert layer_activation_bytes(QWEN2_7B, workload) == tokens * 2 * (2 * 3584 + 3 * 18944) + mask
    # the head: final norm over every position, then the last position's logits per row (+ sampler)
    assert head_activation_bytes(QWEN2_7B, workload) == tokens * 3584 * 2 + 2 * 152064 * (2 + 20) + mask


def test_calibrated_coefficient_replaces_the_layer_formula() -> None:
    workload = Workload(max_sequence_length=100, max_batch_size=2, activation_bytes_per_token=1000.0)
    assert layer_activation_bytes(QWEN2_7B, workload) == 200_000 + 2 * 100 * 100  # + the attention mask


def test_chatglm_seed_reference_slope() -> None:
    """Seed 000 fitted ChatGLM-6B's full forward at 1.13 MiB per token; the formula lands within 10 %."""
    slope = full_forward_bytes_per_token(CHATGLM_6B, Workload(weights="float16")) / MiB
    assert slope == pytest.approx(1.13, rel=0.10)


def test_total_is_the_sum_of_its_parts() -> None:
    est = estimate(QWEN2_7B, Workload(max_sequence_length=4096, max_batch_size=4))
    parts = est.weightsBytes + est.kvCacheBytes + est.activationBytes + est.overheadBytesPerGPU
    assert est.totalBytes == parts + est.fragmentationBytes
    assert est.fragmentationBytes == int((est.kvCacheBytes + est.activationBytes) * 0.05)
    assert est.overheadBytesPerGPU == DEFAULT_OVERHEAD_BYTES
    assert 17 * GiB < est.totalBytes < 20 * GiB


def test_workload_from_spec_reads_overrides() -> None:
    (dep,) = load_deployments(
        """
apiVersion: llm.kubevram.io/v1alpha1
kind: LLMDeployment
metadata: {name: q}
spec:
  model: {id: Qwen/Qwen2-7B}
  precision: {weights: int4, kvCache: float16}
  serving: {maxSequenceLength: 1024, maxBatchSize: 8}
  estimation: {overheadPerGPU: 900Mi, fragmentation: 0.1, useCalibration: true}
"""
    )
    workload = Workload.from_spec(dep.spec, activation_bytes_per_token=123.0)
    assert (workload.weights, workload.kv_bytes, workload.compute_dtype) == ("int4", 2, "float16")
    assert (workload.overhead_per_gpu, workload.fragmentation) == (900 * MiB, 0.1)
    assert workload.prefill_tokens == 8192 and workload.activation_bytes_per_token == 123.0

"""GPU memory of one replica: weights, KV cache, activations, CUDA context and allocator headroom.

Every formula is here, in bytes; ``docs/estimate.md`` states each once with its source:

* **Weights**: parameters x bytes (float32 4, float16/bfloat16 2), buffers at their own dtype;
  int8/int4 are bitsandbytes' LLM.int8 and NF4 on every ``nn.Linear`` but the head; a pre-quantized
  checkpoint's ``quantization_config`` decides its quantized weights (``modules.Linear.bytes``).
* **KV cache**: per layer what transformers' ``DynamicCache`` stores per token (``LayerSpec``:
  ``2 x kv_heads x head_dim``, or MLA's latents) x bytes x batch x the tokens the layer holds at its peak
  (``LayerSpec.tokens_held``: a sliding layer holds its window, or the whole prompt right after a prefill
  longer than it). ``precision.kvCache`` is the compute dtype (float16 for int8/int4 weights).
* **Activations** at a prefill of ``maxSequenceLength x maxBatchSize`` tokens (``T``), with SDPA
  attention (no ``T^2`` score matrix): the peak inside one decoder block is the larger of attention
  (residual, normed input, q and rotated q, rotated k, k/v repeated to every head for GQA, output) and
  MLP (residual, normed input, three ``T x intermediate`` tensors: activation, up projection and their
  product; MoE: through ``num_experts_per_tok`` experts and the shared ones, float32 router logits).
  Where the logits are computed the workspace is the final norm over ``T`` positions plus the logits of
  the last position of each row in the compute dtype, their float32 copy and the sampler's
  probabilities, sort keys and indices (``20 B + dtype`` per vocabulary entry and row). Both carry the
  padded batch's ``(batch, 1, L, L)`` attention masks (``attention_mask_bytes``).
* **Overhead per GPU**: CUDA context, kernels and cuBLAS workspaces, 1.25 GiB by default, overridable by
  ``spec.estimation.overheadPerGPU``.
* **Allocator headroom**: the caching allocator rounds blocks (512 B; 2 MiB small-pool segments, 20 MiB
  segments for 1-10 MiB requests, larger requests to 2 MiB) and fragments; ``spec.estimation.fragmentation``
  (5 % by default) of the dynamic memory (KV cache and activations) is reserved for it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kubevram.api.quantity import GiB, parse_quantity
from kubevram.api.v1alpha1 import (
    DEFAULT_COMMUNICATION_PER_GPU,
    DEFAULT_FRAGMENTATION,
    DEFAULT_OVERHEAD_PER_GPU,
    LLMDeploymentSpec,
)
from kubevram.planner.facts import Attention, ModelFacts
from kubevram.planner.families import FAMILIES
from kubevram.planner.modules import COMPUTE_DTYPE, FLOAT_BYTES, Kind, Module, model_modules

DEFAULT_OVERHEAD_BYTES = parse_quantity(DEFAULT_OVERHEAD_PER_GPU)  # the CRD documents the same value
DEFAULT_COMMUNICATION_BYTES = parse_quantity(DEFAULT_COMMUNICATION_PER_GPU)
KV_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}
SAMPLER_BYTES_PER_LOGIT = 4 + 4 + 4 + 8  # float32 logits, probabilities, sorted values, int64 indices


@dataclass(frozen=True)
class Workload:
    """What a replica must serve: precisions and the serving limits the memory is sized for."""

    weights: str = "bfloat16"
    kv_cache: str = "auto"
    max_sequence_length: int = 4096
    max_batch_size: int = 1
    overhead_per_gpu: int = DEFAULT_OVERHEAD_BYTES
    fragmentation: float = DEFAULT_FRAGMENTATION
    # From calibration (the seed's MemCost = a x SeqLen + b): activation bytes per prefill token.
    activation_bytes_per_token: float | None = None
    # NCCL buffers per GPU of a multi-node group (single-node replicas hold none).
    communication_per_gpu: int = DEFAULT_COMMUNICATION_BYTES

    @classmethod
    def from_spec(cls, spec: LLMDeploymentSpec, activation_bytes_per_token: float | None = None) -> Workload:
        overhead = spec.estimation.overheadPerGPU
        comm = spec.estimation.communicationPerGPU
        return cls(
            weights=str(spec.precision.weights),
            kv_cache=str(spec.precision.kvCache),
            max_sequence_length=spec.serving.maxSequenceLength,
            max_batch_size=spec.serving.maxBatchSize,
            overhead_per_gpu=parse_quantity(overhead) if overhead is not None else DEFAULT_OVERHEAD_BYTES,
            fragmentation=spec.estimation.fragmentation,
            activation_bytes_per_token=activation_bytes_per_token if spec.estimation.useCalibration else None,
            communication_per_gpu=parse_quantity(comm) if comm is not None else DEFAULT_COMMUNICATION_BYTES,
        )

    @property
    def compute_dtype(self) -> str:
        return COMPUTE_DTYPE[self.weights]

    @property
    def compute_bytes(self) -> int:
        return FLOAT_BYTES[self.compute_dtype]

    @property
    def kv_bytes(self) -> int:
        return FLOAT_BYTES[self.compute_dtype] if self.kv_cache == "auto" else KV_BYTES[self.kv_cache]

    @property
    def prefill_tokens(self) -> int:
        return self.max_sequence_length * self.max_batch_size

    @property
    def longest_prompt(self) -> int:
        """The longest prompt prefilled in one forward: the worker leaves room for one new token."""
        return max(1, self.max_sequence_length - 1)


def kv_bytes_per_token(facts: ModelFacts, workload: Workload) -> int:
    """KV cache bytes one token adds across all layers (before any sliding-window cap)."""
    return facts.kv_bytes_per_token_per_dtype_byte * workload.kv_bytes


def layer_kv_bytes(facts: ModelFacts, layer: int, workload: Workload) -> int:
    """KV cache one decoder layer holds at its peak serving ``maxBatchSize`` sequences of
    ``maxSequenceLength`` tokens (``LayerSpec.tokens_held``: a sliding layer holds its window, or the
    whole prompt right after a prefill longer than the window)."""
    spec = facts.layers[layer]
    tokens = spec.tokens_held(workload.max_sequence_length, workload.longest_prompt)
    return spec.kv_elements * workload.kv_bytes * tokens * workload.max_batch_size


def kv_cache_bytes(facts: ModelFacts, workload: Workload) -> int:
    """The KV cache of the whole replica at its peak: right after the prefill of the longest prompt
    (every layer holds the prompt) or at the last token (full layers hold every token, sliding ones
    their window), whichever is larger. Each layer's own peak (``layer_kv_bytes``, what a GPU holding a
    subset of the layers budgets) can fall at either moment, so their sum may exceed this by one token
    per full-attention layer in models that mix full and sliding layers."""
    rows = workload.kv_bytes * workload.max_batch_size
    prompt = min(workload.longest_prompt, workload.max_sequence_length)
    at_prefill = sum(layer.kv_elements for layer in facts.layers if layer.attention is not Attention.none)
    at_end = sum(
        layer.kv_elements * layer.tokens_held(workload.max_sequence_length, 1) for layer in facts.layers
    )
    return rows * max(at_prefill * prompt, at_end)


def _eager(facts: ModelFacts) -> bool:
    return facts.family in FAMILIES and FAMILIES[facts.family].eager


def attention_mask_bytes(facts: ModelFacts, workload: Workload) -> int:
    """The 4-D attention masks a prefill of ``maxBatchSize`` left-padded rows of ``maxSequenceLength``
    builds (transformers' ``masking_utils``): ``(batch, 1, L, L)`` per attention kind present (full,
    sliding), boolean for SDPA, in the compute dtype for eager attention. They live through the whole
    forward, next to any block's and the head's workspace."""
    width = workload.max_sequence_length
    kinds = len({layer.attention for layer in facts.layers if layer.attention is not Attention.none}) or 1
    element = workload.compute_bytes if _eager(facts) else 1
    return workload.max_batch_size * width * width * kinds * element


def layer_activation_bytes(facts: ModelFacts, workload: Workload, tokens: int | None = None) -> int:
    """Peak transient bytes inside one decoder block during a prefill of ``tokens`` (default ``T``, with
    the attention masks of the padded batch)."""
    t = workload.prefill_tokens if tokens is None else tokens
    masks = attention_mask_bytes(facts, workload) if tokens is None else 0
    if workload.activation_bytes_per_token is not None:
        return int(workload.activation_bytes_per_token * t) + masks
    dt = workload.compute_bytes
    heads = facts.num_attention_heads
    if facts.mla:  # queries and the keys/values decompressed per head
        q = heads * (facts.qk_nope_head_dim + facts.qk_rope_head_dim)
        kv = heads * (facts.qk_nope_head_dim + facts.v_head_dim)
    else:
        q, kv = heads * facts.head_dim, facts.num_kv_heads * facts.head_dim
    h = facts.hidden_size
    attention = h + h + 2 * q + kv + 2 * q + q  # residual, normed, q and q_rot, k_rot, k/v per head, output
    mlp = h + h + 3 * facts.intermediate_size
    if facts.num_experts:  # routed tokens through k experts, the shared experts, float32 router logits
        routed = facts.num_experts_per_tok * 3 * facts.expert_intermediate_size
        mlp = max(mlp, h + h + routed + 3 * facts.shared_intermediate_size + facts.num_experts * 4 // dt)
    scores = 0
    if _eager(facts) and tokens is None:
        # eager attention: the (batch, heads, L, L) scores, their soft-capped copy and float32 softmax
        width = workload.max_sequence_length
        scores = workload.max_batch_size * heads * width * width * (2 * dt + 4)
    return t * dt * max(attention, mlp) + scores + masks


def logits_bytes_per_position(facts: ModelFacts, workload: Workload) -> int:
    """Bytes per (position, vocabulary entry) of the logits a forward keeps.

    transformers' heads return the compute dtype and the generation loop upcasts to float32;
    ChatGLM-6B's remote code instead copies them once more (``permute(...).contiguous()``).
    """
    dt = workload.compute_bytes
    return 2 * dt if facts.family == "chatglm" and facts.chatglm_version == 1 else dt + 4


def head_activation_bytes(facts: ModelFacts, workload: Workload) -> int:
    """Workspace where the logits are computed: final norm over ``T`` positions, then the last position's
    logits per row (``logits_to_keep=1``), their float32 copy and the sampler's working tensors."""
    dt = workload.compute_bytes
    norm = workload.prefill_tokens * facts.hidden_size * dt
    logits = workload.max_batch_size * facts.vocab_size * (dt + SAMPLER_BYTES_PER_LOGIT)
    return norm + logits + attention_mask_bytes(facts, workload)


def activation_bytes(facts: ModelFacts, workload: Workload) -> int:
    """The activation workspace of a single-GPU replica: the larger of a decoder block's and the head's."""
    return max(layer_activation_bytes(facts, workload), head_activation_bytes(facts, workload))


def full_forward_bytes_per_token(facts: ModelFacts, workload: Workload) -> float:
    """Bytes per token of a plain ``model(input_ids)`` forward that returns every position's logits and
    the KV cache (the seed's experiment): the slope ``a`` of ``MemCost = a x SeqLen + b``."""
    one = Workload(**{**asdict(workload), "max_sequence_length": 1, "max_batch_size": 1})
    return (
        kv_bytes_per_token(facts, workload)
        + layer_activation_bytes(facts, one, tokens=1)
        + facts.vocab_size * logits_bytes_per_position(facts, workload)
    )


def weights_bytes(modules: list[Module], precision: str) -> int:
    return sum(m.weight_bytes(precision) for m in modules)


@dataclass(frozen=True)
class Estimate:
    """The memory of one replica (bytes). ``totalBytes`` is what a single GPU would need."""

    parameters: int
    weightsBytes: int
    kvCacheBytesPerToken: int
    kvCacheBytes: int
    activationBytes: int
    overheadBytesPerGPU: int
    fragmentationBytes: int
    totalBytes: int
    dtype: str
    maxSequenceLength: int
    maxBatchSize: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def estimate(facts: ModelFacts, workload: Workload) -> Estimate:
    """Estimate one replica's GPU memory as if it ran on a single GPU."""
    modules = model_modules(facts)
    weights = weights_bytes(modules, workload.weights)
    kv = kv_cache_bytes(facts, workload)
    act = activation_bytes(facts, workload)
    frag = int((kv + act) * workload.fragmentation)
    return Estimate(
        parameters=sum(m.params for m in modules),
        weightsBytes=weights,
        kvCacheBytesPerToken=kv_bytes_per_token(facts, workload),
        kvCacheBytes=kv,
        activationBytes=act,
        overheadBytesPerGPU=workload.overhead_per_gpu,
        fragmentationBytes=frag,
        totalBytes=weights + kv + act + workload.overhead_per_gpu + frag,
        dtype=workload.weights,
        maxSequenceLength=workload.max_sequence_length,
        maxBatchSize=workload.max_batch_size,
    )


def gpu_bytes_for(
    facts: ModelFacts, modules: list[Module], workload: Workload, *, with_head: bool
) -> dict[str, int]:
    """What one GPU holding ``modules`` needs: its weights, the KV of exactly its layers, the activation
    workspace (the head's where the logits are computed), the overhead and the allocator headroom."""
    weights = weights_bytes(modules, workload.weights)
    kv = sum(layer_kv_bytes(facts, m.layer, workload) for m in modules if m.layer is not None)
    has_layers = any(m.kind is Kind.layer for m in modules)
    act = max(
        layer_activation_bytes(facts, workload) if has_layers else 0,
        head_activation_bytes(facts, workload) if with_head else 0,
        workload.prefill_tokens
        * facts.hidden_size
        * workload.compute_bytes,  # the residual stream passing by
    )
    return gpu_breakdown(weights, kv, act, workload.overhead_per_gpu, workload.fragmentation)


def gpu_breakdown(weights: int, kv: int, act: int, overhead: int, fragmentation: float) -> dict[str, int]:
    """The parts one GPU holds and their total; the allocator headroom is ``fragmentation`` of the
    dynamic memory (KV cache and activations)."""
    frag = int((kv + act) * fragmentation)
    return {
        "weights": weights,
        "kvCache": kv,
        "activations": act,
        "overhead": overhead,
        "fragmentation": frag,
        "total": weights + kv + act + overhead + frag,
    }


__all__ = [
    "DEFAULT_OVERHEAD_BYTES",
    "Estimate",
    "GiB",
    "Workload",
    "activation_bytes",
    "attention_mask_bytes",
    "estimate",
    "full_forward_bytes_per_token",
    "gpu_breakdown",
    "gpu_bytes_for",
    "head_activation_bytes",
    "kv_bytes_per_token",
    "kv_cache_bytes",
    "layer_activation_bytes",
    "layer_kv_bytes",
]

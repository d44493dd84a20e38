"""The module tree of a model, without torch: top-level modules, their parameters and bytes.

``model_modules(facts)`` lists, in forward order, the modules a device map assigns, under the names
transformers gives them (``model.embed_tokens``, ``model.layers.N``, ``model.norm``, ``lm_head``;
gpt2 ``transformer.h.N``; gpt_neox ``gpt_neox.layers.N``; ChatGLM ``transformer.layers.N``...): one
builder for every family, reading the family's data (``kubevram.planner.families``).
Decoder blocks are the unit that is never split (transformers' ``_no_split_modules``). Each module
knows its Linear weights (the ones bitsandbytes quantizes), its other parameters (embeddings, norms)
and its buffers (rotary ``inv_freq``), so its size at any precision is exact.

A tied output head (``lm_head`` sharing the input embedding's weight) owns no parameters of its own:
``tied_to`` names the module whose weight it uses, as accelerate's ``find_tied_parameters`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from functools import lru_cache

from kubevram.api.v1alpha1 import COMPUTE_DTYPES
from kubevram.planner.facts import ModelFacts
from kubevram.planner.quantization import Quantization

FLOAT_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}

# Compute dtype of each storage precision: bitsandbytes dequantizes int8/int4 to float16.
COMPUTE_DTYPE = COMPUTE_DTYPES

# bitsandbytes NF4 (Linear4bit): two weights a byte, one float32 absmax per block of 64 weights, and
# each layer's quant_state keeps its own copy of the 16-entry float32 lookup table (``code``).
NF4_BLOCK = 64
NF4_CODE_BYTES = 16 * 4
NESTED_CODE_BYTES = 256 * 4  # double quantization: the 8-bit code of the nested absmax


class Kind(StrEnum):
    embedding = "embedding"
    rotary = "rotary"
    layer = "layer"
    norm = "norm"
    head = "head"


@dataclass(frozen=True)
class Linear:
    """A weight matrix ``out x in`` (``count`` of them: MoE experts), with an optional bias."""

    out_features: int
    in_features: int
    bias: bool = False
    count: int = 1
    quantizable: bool = True  # nn.Linear/Conv1D that bitsandbytes replaces; fused 3-D expert weights are not
    fp32: bool = False  # kept in float32 whatever the model dtype (``_keep_in_fp32_modules_strict``)
    router: bool = False  # an MoE router: no quantization method touches it
    quant: Quantization | None = None  # stored pre-quantized (the checkpoint's quantization_config)
    # Tensor parallel (transformers' tp_plan): "col" shards the output features (colwise: weight and bias),
    # "row" the input features (rowwise: the bias stays whole on every rank); "" keeps it whole.
    split: str = ""

    @property
    def params(self) -> int:
        return self.count * (self.out_features * self.in_features + (self.out_features if self.bias else 0))

    def bytes(self, precision: str) -> int:
        """Bytes at a storage precision (bitsandbytes LLM.int8 / NF4 for int8 / int4)."""
        weights = self.count * self.out_features * self.in_features
        bias = self.count * self.out_features if self.bias else 0
        if self.fp32:
            return (weights + bias) * 4
        if self.quant is not None and self.quant.method != "bitsandbytes":
            dtype = FLOAT_BYTES[COMPUTE_DTYPE[precision]]
            return self.quant.linear_bytes(self.out_features, self.in_features, self.count, self.bias, dtype)
        if precision in FLOAT_BYTES:
            return (weights + bias) * FLOAT_BYTES[precision]
        half = FLOAT_BYTES["float16"]
        if not self.quantizable:
            return (weights + bias) * half
        if precision == "int8":
            # int8 weights + one float32 scale per output row (Int8Params.SCB); the bias stays float16
            return weights + 4 * self.count * self.out_features + bias * half
        if precision == "int4":
            per_matrix = self.out_features * self.in_features
            packed = -(-per_matrix // 2)
            blocks = -(-per_matrix // NF4_BLOCK)
            if self.quant is not None and self.quant.double_quant:
                # absmax in 8 bits, float32 absmax per 256 blocks, a 256-entry code and an offset
                stats = blocks + -(-blocks // 256) * 4 + NESTED_CODE_BYTES + 4
            else:
                stats = blocks * 4  # one float32 absmax per block of 64
            return self.count * (packed + stats + NF4_CODE_BYTES) + bias * half
        raise ValueError(f"{precision!r} is not one of float32, float16, bfloat16, int8, int4")


@dataclass(frozen=True)
class Module:
    """A top-level module of the device map."""

    name: str
    kind: Kind
    linears: tuple[Linear, ...] = ()
    other_params: int = 0  # never quantized: embeddings, norms, position tables
    buffer_bytes: int = 0  # rotary inv_freq and friends (their own dtype)
    dtype_buffers: int = 0  # buffer elements created in the model dtype (Gemma's embed_scale)
    layer: int | None = None
    tied_to: str | None = None  # a tied head: the module that holds the shared weight

    @property
    def params(self) -> int:
        return sum(linear.params for linear in self.linears) + self.other_params

    def weight_bytes(self, precision: str) -> int:
        """Bytes of parameters and buffers at ``precision`` (a tied head: 0, its weight lives elsewhere)."""
        linear = sum(lin.bytes(precision) for lin in self.linears)
        other = FLOAT_BYTES[COMPUTE_DTYPE[precision]]
        return linear + (self.other_params + self.dtype_buffers) * other + self.buffer_bytes


def model_modules(facts: ModelFacts) -> list[Module]:
    """The top-level modules of ``facts``' model, in the order transformers' ``named_children`` gives."""
    if facts.modules:
        return list(facts.modules)
    return list(_modules(facts))


def parameter_count(facts: ModelFacts) -> int:
    """Parameters of the model, tied weights counted once (``sum(p.numel() for p in model.parameters())``)."""
    return sum(m.params for m in model_modules(facts))


@lru_cache(maxsize=256)
def _modules(f: ModelFacts) -> tuple[Module, ...]:
    fam = f.spec
    names = fam.names
    h = f.hidden_size
    rotary = _rotary(f)
    out = [
        Module(names.embed, Kind.embedding, other_params=f.vocab_size * h, dtype_buffers=int(fam.embed_scale))
    ]
    if names.positions:
        out.append(
            Module(names.positions, Kind.embedding, other_params=(f.max_position_embeddings or 1024) * h)
        )
    has_rotary = bool(names.rotary) and bool(rotary.buffer_bytes or rotary.dtype_buffers)
    if has_rotary and names.rotary_at == "first":
        out.append(rotary)
    per_layer_buffers = _layer_buffers(f)
    for i, spec in enumerate(f.layers):
        linears = _quantized(f, _attention(f) + (_moe(f) if spec.moe else _mlp(f, f.intermediate_size)))
        other = f.layer_norms * _norm(f, h) + _qk_norm(f) + (_mla_norms(f) if f.mla else 0)
        buffers = (
            f.num_experts * 4 if spec.moe and fam.moe and fam.moe.score_bias else 0
        ) + per_layer_buffers[0]
        out.append(
            Module(
                f"{names.layers}.{i}",
                Kind.layer,
                linears,
                other_params=other,
                buffer_bytes=buffers,
                dtype_buffers=per_layer_buffers[1],
                layer=i,
            )
        )
    if has_rotary and names.rotary_at == "before_norm":
        out.append(rotary)
    final_norm = _norm(f, h)
    if final_norm:
        out.append(Module(names.norm, Kind.norm, other_params=final_norm))
    if names.buffer:  # GPTBigCode's (positions x positions) boolean causal mask
        out.append(Module(names.buffer, Kind.rotary, buffer_bytes=(f.max_position_embeddings or 1024) ** 2))
    if has_rotary and names.rotary_at == "end":
        out.append(rotary)
    if f.tie_word_embeddings:
        out.append(Module(names.head, Kind.head, tied_to=names.embed))
    else:
        out.append(Module(names.head, Kind.head, other_params=f.vocab_size * (h + int(f.lm_head_bias))))
    return tuple(out)


def _norm(f: ModelFacts, size: int) -> int:
    """Parameters of one norm over ``size`` features."""
    kind = f.spec.norm
    if kind == "none":
        return 0
    return 2 * size if f.norm_bias else size


def _qk_norm(f: ModelFacts) -> int:
    if not f.qk_norm:
        return 0
    fam = f.spec
    per = 2 if fam.qk_norm_bias else 1
    if fam.qk_norm == "head":  # one norm over head_dim for q, one for k
        return 2 * f.head_dim * per
    return (f.num_attention_heads + f.num_kv_heads) * f.head_dim * per  # one per head


def _mla_norms(f: ModelFacts) -> int:
    return f.kv_lora_rank + f.q_lora_rank


def _attention(f: ModelFacts) -> tuple[Linear, ...]:
    h, hd, heads = f.hidden_size, f.head_dim, f.num_attention_heads
    if f.mla:
        qk = heads * (f.qk_nope_head_dim + f.qk_rope_head_dim)
        if f.q_lora_rank:
            query: tuple[Linear, ...] = (
                Linear(f.q_lora_rank, h, f.qkv_bias),
                Linear(qk, f.q_lora_rank),
            )
        else:
            query = (Linear(qk, h),)
        return (
            *query,
            Linear(f.kv_lora_rank + f.qk_rope_head_dim, h, f.qkv_bias),
            Linear(heads * (f.qk_nope_head_dim + f.v_head_dim), f.kv_lora_rank),
            Linear(h, heads * f.v_head_dim, f.o_bias),
        )
    q, kv = heads * hd, f.num_kv_heads * hd
    out = Linear(h, q, f.o_bias, split="row")
    if f.spec.qkv == "fused":
        return Linear(q + 2 * kv, h, f.qkv_bias, split="col"), out
    return (
        Linear(q, h, f.qkv_bias, split="col"),
        Linear(kv, h, f.qkv_bias, split="col"),
        Linear(kv, h, f.qkv_bias, split="col"),
        out,
    )


def _mlp(f: ModelFacts, inner: int) -> tuple[Linear, ...]:
    h, bias, kind = f.hidden_size, f.mlp_bias, f.spec.mlp
    down = Linear(h, inner, bias, split="row")
    if kind == "plain":
        return Linear(inner, h, bias, split="col"), down
    if kind == "fused_gated":
        return Linear(2 * inner, h, bias, split="col"), down
    return Linear(inner, h, bias, split="col"), Linear(inner, h, bias, split="col"), down


def _moe(f: ModelFacts) -> tuple[Linear, ...]:
    moe = f.spec.moe
    assert moe is not None
    h, n, inner = f.hidden_size, f.num_experts, f.expert_intermediate_size
    linears = [
        Linear(n, h, quantizable=moe.router_linear, fp32=moe.router_fp32, router=True),
        Linear(2 * inner, h, count=n, quantizable=False),  # experts' fused gate_up (a 3-D parameter)
        Linear(h, inner, count=n, quantizable=False),  # experts' down
    ]
    if f.shared_intermediate_size:
        linears += _mlp(f, f.shared_intermediate_size)
    if moe.shared_gate:
        linears.append(Linear(1, h))
    return tuple(linears)


def _quantized(f: ModelFacts, linears: tuple[Linear, ...]) -> tuple[Linear, ...]:
    """Mark the Linears a pre-quantized checkpoint stores quantized (routers never; fused experts unless
    the method cannot quantize them)."""
    quant = f.quantization
    if quant is None:
        return linears
    return tuple(
        replace(lin, quant=quant)
        if not lin.router and (lin.quantizable or (lin.count > 1 and quant.experts))
        else lin
        for lin in linears
    )


def _rotary(f: ModelFacts) -> Module:
    """The shared rotary module: transformers 5 keeps inv_freq and original_inv_freq (float32,
    rotary_dim / 2 each) per attention kind; ChatGLM one float16 inv_freq; GPT-J a float32 sin/cos table
    of max_position_embeddings x rotary_dim."""
    kind = f.spec.rotary_buffers
    name = f.spec.names.rotary or ""
    if kind == "chatglm":
        return Module(name, Kind.rotary, buffer_bytes=(f.rotary_dim // 2) * 2)
    if kind == "embed_positions":
        return Module(name, Kind.rotary, buffer_bytes=f.max_position_embeddings * f.rotary_dim * 4)
    return Module(name, Kind.rotary, buffer_bytes=f.rotary_tables * 2 * (f.rotary_dim // 2) * 4)


def _layer_buffers(f: ModelFacts) -> tuple[int, int]:
    """(bytes, model-dtype elements) of buffers each decoder layer holds itself: InternLM2's rotary
    (float32 inv_freq, cos/sin caches of max_position_embeddings x head_dim in the model dtype) and
    ChatGLM-6B's float16 inv_freq."""
    kind = f.spec.rotary_buffers
    if kind == "cos_sin_cached":
        return (f.head_dim // 2) * 4, 2 * f.max_position_embeddings * f.head_dim
    if kind == "chatglm" and not f.spec.names.rotary:
        return (f.rotary_dim // 2) * 2, 0
    return 0, 0

"""The module tree of a model, without torch: top-level modules, their parameters and bytes.

``model_modules(facts)`` lists, in forward order, the modules a device map assigns, under the names
transformers gives them (``model.embed_tokens``, ``model.layers.N``, ``model.norm``, ``lm_head``;
gpt2 ``transformer.h.N``; gpt_neox ``gpt_neox.layers.N``; ChatGLM ``transformer.layers.N``...).
Decoder blocks are the unit that is never split (transformers' ``_no_split_modules``). Each module
knows its Linear weights (the ones bitsandbytes quantizes), its other parameters (embeddings, norms)
and its buffers (rotary ``inv_freq``), so its size at any precision is exact.

A tied output head (``lm_head`` sharing the input embedding's weight) owns no parameters of its own:
``tied_to`` names the module whose weight it uses, as accelerate's ``find_tied_parameters`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from kubevram.planner.facts import ModelFacts

FLOAT_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}

# Compute dtype of each storage precision: bitsandbytes dequantizes int8/int4 to float16.
COMPUTE_DTYPE: dict[str, str] = {
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "int8": "float16",
    "int4": "float16",
}

# bitsandbytes NF4 (Linear4bit): two weights a byte, plus one float32 absmax per block of 64 weights.
NF4_BLOCK = 64


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

    @property
    def params(self) -> int:
        return self.count * (self.out_features * self.in_features + (self.out_features if self.bias else 0))

    def bytes(self, precision: str) -> int:
        """Bytes at a storage precision (bitsandbytes LLM.int8 / NF4 for int8 / int4)."""
        weights = self.count * self.out_features * self.in_features
        bias = self.count * self.out_features if self.bias else 0
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
            absmax = -(-per_matrix // NF4_BLOCK) * 4
            return self.count * (packed + absmax) + bias * half
        raise ValueError(f"{precision!r} is not one of float32, float16, bfloat16, int8, int4")


@dataclass(frozen=True)
class Module:
    """A top-level module of the device map."""

    name: str
    kind: Kind
    linears: tuple[Linear, ...] = ()
    other_params: int = 0  # never quantized: embeddings, norms, position tables
    buffer_bytes: int = 0  # rotary inv_freq and friends (their own dtype)
    layer: int | None = None
    tied_to: str | None = None  # a tied head: the module that holds the shared weight

    @property
    def params(self) -> int:
        return sum(linear.params for linear in self.linears) + self.other_params

    def weight_bytes(self, precision: str) -> int:
        """Bytes of parameters and buffers at ``precision`` (a tied head: 0, its weight lives elsewhere)."""
        linear = sum(lin.bytes(precision) for lin in self.linears)
        other_dtype = precision if precision in FLOAT_BYTES else "float16"
        return linear + self.other_params * FLOAT_BYTES[other_dtype] + self.buffer_bytes


def model_modules(facts: ModelFacts) -> list[Module]:
    """The top-level modules of ``facts``' model, in the order transformers' ``named_children`` gives."""
    if facts.modules:
        return list(facts.modules)
    return _BUILDERS[facts.family](facts)


def parameter_count(facts: ModelFacts) -> int:
    """Parameters of the model, tied weights counted once (``sum(p.numel() for p in model.parameters())``)."""
    return sum(m.params for m in model_modules(facts))


def _rotary_buffers(facts: ModelFacts, element_bytes: int = 4, copies: int = 2) -> int:
    # transformers 5 keeps inv_freq and original_inv_freq (float32, rotary_dim / 2 each)
    return copies * (facts.rotary_dim // 2) * element_bytes


def _head(facts: ModelFacts, name: str, embedding: str) -> Module:
    if facts.tie_word_embeddings:
        return Module(name, Kind.head, tied_to=embedding)
    return Module(name, Kind.head, other_params=facts.vocab_size * facts.hidden_size)


def _llama(f: ModelFacts) -> list[Module]:
    h, hd = f.hidden_size, f.head_dim
    if f.family == "phi3":
        attention: tuple[Linear, ...] = (
            Linear((f.num_attention_heads + 2 * f.num_kv_heads) * hd, h),
            Linear(h, f.num_attention_heads * hd),
        )
        mlp: tuple[Linear, ...] = (Linear(2 * f.intermediate_size, h), Linear(h, f.intermediate_size))
    else:
        attention = (
            Linear(f.num_attention_heads * hd, h, f.attention_bias),
            Linear(f.num_kv_heads * hd, h, f.attention_bias),
            Linear(f.num_kv_heads * hd, h, f.attention_bias),
            Linear(h, f.num_attention_heads * hd, f.o_proj_bias),
        )
        if f.num_experts:
            mlp = (
                Linear(f.num_experts, h, quantizable=False),  # router
                Linear(2 * f.intermediate_size, h, count=f.num_experts, quantizable=False),  # fused gate_up
                Linear(h, f.intermediate_size, count=f.num_experts, quantizable=False),
            )
        else:
            mlp = (
                Linear(f.intermediate_size, h, f.mlp_bias),
                Linear(f.intermediate_size, h, f.mlp_bias),
                Linear(h, f.intermediate_size, f.mlp_bias),
            )
    layers = [
        Module(f"model.layers.{i}", Kind.layer, attention + mlp, other_params=2 * h, layer=i)
        for i in range(f.num_layers)
    ]
    embed_scale = 4 if f.model_type == "gemma" else 0  # Gemma's scalar embed_scale buffer
    return [
        Module("model.embed_tokens", Kind.embedding, other_params=f.vocab_size * h, buffer_bytes=embed_scale),
        *layers,
        Module("model.norm", Kind.norm, other_params=h),
        Module("model.rotary_emb", Kind.rotary, buffer_bytes=_rotary_buffers(f)),
        _head(f, "lm_head", "model.embed_tokens"),
    ]


def _gpt2(f: ModelFacts) -> list[Module]:
    h, inner = f.hidden_size, f.intermediate_size
    block = (Linear(3 * h, h, True), Linear(h, h, True), Linear(inner, h, True), Linear(h, inner, True))
    return [
        Module("transformer.wte", Kind.embedding, other_params=f.vocab_size * h),
        Module("transformer.wpe", Kind.embedding, other_params=(f.max_position_embeddings or 1024) * h),
        *(
            Module(f"transformer.h.{i}", Kind.layer, block, other_params=4 * h, layer=i)
            for i in range(f.num_layers)
        ),
        Module("transformer.ln_f", Kind.norm, other_params=2 * h),
        _head(f, "lm_head", "transformer.wte"),
    ]


def _gpt_neox(f: ModelFacts) -> list[Module]:
    h, inner = f.hidden_size, f.intermediate_size
    block = (
        Linear(3 * h, h, f.attention_bias),
        Linear(h, h, f.o_proj_bias),
        Linear(inner, h, True),
        Linear(h, inner, True),
    )
    return [
        Module("gpt_neox.embed_in", Kind.embedding, other_params=f.vocab_size * h),
        *(
            Module(f"gpt_neox.layers.{i}", Kind.layer, block, other_params=4 * h, layer=i)
            for i in range(f.num_layers)
        ),
        Module("gpt_neox.final_layer_norm", Kind.norm, other_params=2 * h),
        Module("gpt_neox.rotary_emb", Kind.rotary, buffer_bytes=_rotary_buffers(f)),
        _head(f, "lm_head", "gpt_neox.embed_in"),
    ]


def _falcon(f: ModelFacts) -> list[Module]:
    h, hd = f.hidden_size, f.head_dim
    if f.falcon_new_arch:
        qkv = (f.num_attention_heads + 2 * f.num_kv_heads) * hd
        norms = 2 if f.falcon_ln_count == 2 else 1
    else:
        qkv = h + 2 * hd if f.num_kv_heads == 1 else 3 * h
        norms = 1 if f.parallel_attn else 2
    block = (
        Linear(qkv, h, f.attention_bias),
        Linear(h, h, f.attention_bias),
        Linear(f.intermediate_size, h, f.mlp_bias),
        Linear(h, f.intermediate_size, f.mlp_bias),
    )
    rotary = (
        [Module("transformer.rotary_emb", Kind.rotary, buffer_bytes=_rotary_buffers(f))]
        if f.rotary_dim
        else []
    )
    return [
        Module("transformer.word_embeddings", Kind.embedding, other_params=f.vocab_size * h),
        *(
            Module(f"transformer.h.{i}", Kind.layer, block, other_params=norms * 2 * h, layer=i)
            for i in range(f.num_layers)
        ),
        Module("transformer.ln_f", Kind.norm, other_params=2 * h),
        *rotary,
        _head(f, "lm_head", "transformer.word_embeddings"),
    ]


def _chatglm(f: ModelFacts) -> list[Module]:
    h, hd = f.hidden_size, f.head_dim
    inv_freq = _rotary_buffers(f, element_bytes=2, copies=1)  # one float16 inv_freq
    if f.chatglm_version == 1:
        block = (
            Linear(3 * h, h, True),
            Linear(h, h, True),
            Linear(f.intermediate_size, h, True),
            Linear(h, f.intermediate_size, True),
        )
        return [
            Module("transformer.word_embeddings", Kind.embedding, other_params=f.vocab_size * h),
            *(
                Module(
                    f"transformer.layers.{i}",
                    Kind.layer,
                    block,
                    other_params=4 * h,
                    buffer_bytes=inv_freq,
                    layer=i,
                )
                for i in range(f.num_layers)
            ),
            Module("transformer.final_layernorm", Kind.norm, other_params=2 * h),
            _head(f, "lm_head", "transformer.word_embeddings"),
        ]
    projection = f.num_attention_heads * hd
    norm = 2 * h if f.ln_bias else h
    block = (
        Linear(projection + 2 * f.num_kv_heads * hd, h, f.attention_bias),
        Linear(h, projection, f.o_proj_bias),
        Linear(2 * f.intermediate_size, h, f.mlp_bias),
        Linear(h, f.intermediate_size, f.mlp_bias),
    )
    return [
        Module("transformer.embedding", Kind.embedding, other_params=f.vocab_size * h),
        Module("transformer.rotary_pos_emb", Kind.rotary, buffer_bytes=inv_freq),
        *(
            Module(f"transformer.encoder.layers.{i}", Kind.layer, block, other_params=2 * norm, layer=i)
            for i in range(f.num_layers)
        ),
        Module("transformer.encoder.final_layernorm", Kind.norm, other_params=norm),
        _head(f, "transformer.output_layer", "transformer.embedding"),
    ]


_BUILDERS = {
    "llama": _llama,
    "phi3": _llama,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "falcon": _falcon,
    "chatglm": _chatglm,
}

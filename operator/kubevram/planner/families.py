"""Each covered architecture as a few lines of data on the one decoder description.

A ``Family`` says how a transformers model class lays out the general decoder of
``kubevram.planner.facts``: the names of its top-level modules (what a device map assigns), which
projections are fused, which biases and norms exist (constants, or ``(config key, default)`` as the
model class reads them), its MLP and mixture of experts, how its layers slide, and the defaults of its
config class for keys a ``config.json`` may leave out. Sources: each model's ``configuration_*.py``
and ``modeling_*.py`` in transformers 5 (``src/transformers/models/<model_type>/``), and for
remote-code models (ChatGLM, InternLM2) the modeling file published with the checkpoint.

Adding an architecture is adding an entry here, checked by ``tests/unit/test_exactness.py`` against
transformers' own modules and KV cache.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

Flag = bool | tuple[str, bool]  # a constant, or (config key, default when the key is absent)
DEFAULT_LAYOUT = ("model.embed_tokens", "model.layers", "model.norm", "lm_head")


@dataclass(frozen=True)
class Names:
    """Top-level module names, as ``named_modules`` and accelerate's device maps give them."""

    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    norm: str = "model.norm"
    rotary: str | None = "model.rotary_emb"  # None: no shared rotary module
    head: str = "lm_head"
    positions: str | None = None  # a learned position table (GPT-2's wpe)
    buffer: str | None = None  # a buffer the model itself owns (GPTBigCode's causal mask)
    rotary_at: str = "end"  # where the rotary module sits: end | first (ChatGLM2/3, before the layers) |
    # before_norm (Phi: between the layers and the final norm)


@dataclass(frozen=True)
class MoE:
    """A mixture-of-experts MLP: experts fused in 3-D tensors (transformers 5), a router, shared experts."""

    experts: str  # config key of the routed experts per layer
    intermediate: str = "moe_intermediate_size"
    shared: str | None = None  # shared_expert_intermediate_size, or n_shared_experts x intermediate
    shared_gate: bool = False  # Qwen2-MoE's sigmoid gate on the shared expert (a 1 x hidden Linear)
    router_linear: bool = False  # the router is an nn.Linear (bitsandbytes quantizes it)
    router_fp32: bool = False  # ``_keep_in_fp32_modules_strict``: the router weight stays float32
    score_bias: bool = False  # DeepSeek-V3's float32 e_score_correction_bias buffer


@dataclass(frozen=True)
class Family:
    label: str  # the name the README's table shows
    names: Names = field(default_factory=Names)
    qkv: str = "separate"  # separate q/k/v projections | fused (one Linear)
    qkv_bias: Flag = ("attention_bias", False)
    o_bias: Flag | None = None  # None: the same as qkv_bias
    qk_norm: str = "none"  # none | head (one norm over head_dim each) | full (over every head)
    qk_norm_enabled: Flag = True
    qk_norm_bias: bool = False
    mla: bool = False  # DeepSeek's multi-head latent attention
    mlp: str = "gated"  # gated (gate, up, down) | fused_gated (gate_up, down) | plain (up, down)
    mlp_bias: Flag = False
    moe: MoE | None = None
    norm: str = "rms"  # rms (a weight) | ln (weight and bias) | weight (LayerNorm without bias) | none
    rms_key: str | None = None  # ChatGLM2/3 ``rmsnorm``: RMSNorm when true, else LayerNorm
    layer_norms: int = 2  # hidden-size norms per block
    parallel_key: str | None = None  # config key that, when true, leaves one norm per block
    tie: bool = False  # tie_word_embeddings' default in the config class
    lm_head_bias: Flag = False
    embed_scale: bool = False  # Gemma: a scalar buffer in the model dtype
    rotary: str = "partial_rotary_factor"  # key of the rotated fraction | rotary_dim | half | none
    rotary_buffers: str = "inv_freq"  # inv_freq | chatglm | embed_positions | cos_sin_cached
    rotary_per_kind: bool = False  # Gemma-3: one inv_freq pair per attention kind present
    sliding: str = "none"  # none | all | qwen | qwen_moe | pattern
    sliding_pattern: int = 0
    kv_heads: str = "num_key_value_heads"  # | heads | multi_query | chatglm2
    head_dim_key: str | None = "head_dim"  # None: always hidden_size / heads
    intermediate_keys: tuple[str, ...] = ("intermediate_size",)
    intermediate_factor: int = 0  # default intermediate = factor x hidden (0: required)
    vocab_keys: tuple[str, ...] = ("vocab_size",)
    falcon: bool = False
    eager: bool = False  # transformers runs it with eager attention (Gemma-2's soft-capping): scores exist
    remote_code: bool = False  # transformers cannot build it: trust_remote_code
    # transformers' tp_plan shards its attention and MLP colwise/rowwise (q/k/v and gate/up by output, o and
    # down by input: each rank holds its share of the heads and of the KV cache), the embedding by vocabulary
    # and the head by vocabulary gathered; families whose plan gathers q/k/v (OLMo 2, Phi-3, GLM) or shards
    # experts differ, and run multi-node as pipeline stages only.
    tensor_parallel: bool = False
    # False where transformers' naive pipeline forward would compute something else: Granite scales
    # ``inputs_embeds`` inside the base model's forward, so a later stage would scale the hidden states again.
    pipeline_safe: bool = True
    defaults: tuple[tuple[str, Any], ...] = ()

    @property
    def pipeline(self) -> bool:
        """Whether transformers' pipeline parallelism can split it: the layout its
        ``apply_pipeline_parallelism`` reads (``model.embed_tokens``, ``model.layers``, ``model.norm``,
        ``lm_head``), no remote code, and a base model that takes a stage's hidden states as
        ``inputs_embeds`` unchanged."""
        n = self.names
        layout = (n.embed, n.layers, n.norm, n.head)
        return layout == DEFAULT_LAYOUT and not self.remote_code and self.pipeline_safe


LLAMA = Family(
    "Llama", qkv_bias=("attention_bias", False), mlp_bias=("mlp_bias", False), tensor_parallel=True
)
MISTRAL = Family("Mistral", qkv_bias=False, sliding="all", tensor_parallel=True)
QWEN2 = Family("Qwen2", qkv_bias=True, o_bias=False, sliding="qwen", tensor_parallel=True)
QWEN3 = replace(
    LLAMA, label="Qwen3", mlp_bias=False, qk_norm="head", sliding="qwen", defaults=(("head_dim", 128),)
)
GEMMA = Family(
    "Gemma", mlp_bias=False, tie=True, embed_scale=True, tensor_parallel=True, defaults=(("head_dim", 256),)
)
GEMMA2 = replace(
    GEMMA,
    label="Gemma 2",
    layer_norms=4,
    eager=True,
    sliding="pattern",
    sliding_pattern=2,
    defaults=(("head_dim", 256), ("sliding_window", 4096)),
)
COHERE = Family(
    "Command R (Cohere)",
    norm="weight",
    layer_norms=1,
    tie=True,
    qk_norm="full",
    qk_norm_enabled=("use_qk_norm", False),
)
STARCODER2 = Family(
    "StarCoder2",
    tensor_parallel=True,
    qkv_bias=("use_bias", True),
    mlp="plain",
    mlp_bias=("use_bias", True),
    norm="ln",
    tie=True,
    sliding="all",
)
GPT2_NAMES = Names("transformer.wte", "transformer.h", "transformer.ln_f", None, positions="transformer.wpe")
GPT2 = Family(
    "GPT-2",
    names=GPT2_NAMES,
    qkv="fused",
    qkv_bias=True,
    mlp="plain",
    mlp_bias=True,
    norm="ln",
    tie=True,
    rotary="none",
    kv_heads="heads",
    head_dim_key=None,
    intermediate_keys=("n_inner",),
    intermediate_factor=4,
)
GLM = Family(
    "GLM-4 (glm)",
    qkv_bias=("attention_bias", True),
    o_bias=False,
    mlp="fused_gated",
    defaults=(("head_dim", 128), ("partial_rotary_factor", 0.5)),
)
DEEPSEEK_V2_MOE = MoE("n_routed_experts", shared="n_shared_experts", router_fp32=True)
DEEPSEEK_V2 = Family(
    "DeepSeek-V2",
    mla=True,
    mlp_bias=("mlp_bias", False),
    moe=DEEPSEEK_V2_MOE,
    defaults=(
        ("kv_lora_rank", 512),
        ("q_lora_rank", 1536),
        ("qk_nope_head_dim", 128),
        ("qk_rope_head_dim", 64),
        ("v_head_dim", 128),
        ("n_routed_experts", 64),
        ("n_shared_experts", 2),
        ("moe_intermediate_size", 1407),
    ),
)

FAMILIES: dict[str, Family] = {
    "llama": LLAMA,
    "mistral": MISTRAL,
    "mixtral": replace(
        MISTRAL,
        label="Mixtral",
        tensor_parallel=False,
        moe=MoE("num_local_experts", intermediate="intermediate_size"),
        defaults=(("num_local_experts", 8),),
    ),
    "qwen2": QWEN2,
    "qwen2_moe": replace(
        QWEN2,
        label="Qwen2-MoE",
        tensor_parallel=False,
        qkv_bias=("qkv_bias", True),
        sliding="qwen_moe",
        moe=MoE("num_experts", shared="shared_expert_intermediate_size", shared_gate=True),
        defaults=(
            ("num_experts", 60),
            ("moe_intermediate_size", 1408),
            ("shared_expert_intermediate_size", 5632),
        ),
    ),
    "qwen3": QWEN3,
    "qwen3_moe": replace(
        QWEN3,
        label="Qwen3-MoE",
        tensor_parallel=False,
        moe=MoE("num_experts"),
        defaults=(("num_experts", 128), ("moe_intermediate_size", 768)),
    ),
    "gemma": GEMMA,
    "gemma2": GEMMA2,
    "gemma3_text": replace(
        GEMMA2,
        label="Gemma 3 (text)",
        eager=False,
        qk_norm="head",
        sliding_pattern=6,
        rotary_per_kind=True,
        defaults=(("head_dim", 256), ("sliding_window", 4096)),
    ),
    "cohere": COHERE,
    "cohere2": replace(
        COHERE,
        label="Command R7B (Cohere2)",
        qk_norm="none",
        sliding="pattern",
        sliding_pattern=4,
        defaults=(("sliding_window", 4096),),
    ),
    "olmo": Family("OLMo", norm="none", tensor_parallel=True),
    "olmo2": Family("OLMo 2", qk_norm="full"),
    "granite": replace(LLAMA, label="Granite", pipeline_safe=False),
    "granitemoe": replace(
        LLAMA,
        label="Granite MoE",
        tensor_parallel=False,
        pipeline_safe=False,
        mlp_bias=False,
        moe=MoE("num_local_experts", intermediate="intermediate_size"),
        defaults=(("num_local_experts", 8),),
    ),
    "starcoder2": STARCODER2,
    "gpt_bigcode": replace(
        GPT2,
        label="GPTBigCode (SantaCoder, StarCoder)",
        names=replace(GPT2_NAMES, buffer="transformer.bias"),
        kv_heads="multi_query",
    ),
    "stablelm": Family(
        "StableLM",
        qkv_bias=("use_qkv_bias", False),
        o_bias=False,
        qk_norm="full",
        qk_norm_enabled=("qk_layernorm", False),
        norm="ln",
        parallel_key="use_parallel_residual",
        defaults=(("partial_rotary_factor", 0.25),),
    ),
    "phi": Family(
        "Phi-1/Phi-2",
        names=Names(norm="model.final_layernorm", rotary_at="before_norm"),
        qkv_bias=True,
        qk_norm="head",
        qk_norm_enabled=("qk_layernorm", False),
        qk_norm_bias=True,
        mlp="plain",
        mlp_bias=True,
        norm="ln",
        layer_norms=1,
        lm_head_bias=True,
        defaults=(("partial_rotary_factor", 0.5),),
    ),
    "phi3": Family("Phi-3", qkv="fused", qkv_bias=False, mlp="fused_gated", sliding="all"),
    "phimoe": Family(
        "Phi-3.5-MoE",
        norm="ln",
        lm_head_bias=("lm_head_bias", False),
        sliding="all",
        moe=MoE("num_local_experts", intermediate="intermediate_size", router_linear=True),
        defaults=(("num_local_experts", 16),),
    ),
    "deepseek_v2": DEEPSEEK_V2,
    "deepseek_v3": replace(
        DEEPSEEK_V2,
        label="DeepSeek-V3/R1",
        mlp_bias=False,
        moe=replace(DEEPSEEK_V2_MOE, score_bias=True),
        defaults=(
            ("kv_lora_rank", 512),
            ("q_lora_rank", 1536),
            ("qk_nope_head_dim", 128),
            ("qk_rope_head_dim", 64),
            ("v_head_dim", 128),
            ("n_routed_experts", 256),
            ("n_shared_experts", 1),
            ("moe_intermediate_size", 2048),
            ("first_k_dense_replace", 3),
        ),
    ),
    "falcon": Family(
        "Falcon: 7B multi-query, 40B/180B new architecture, sequential",
        names=Names(
            "transformer.word_embeddings", "transformer.h", "transformer.ln_f", "transformer.rotary_emb"
        ),
        qkv="fused",
        qkv_bias=("bias", False),
        mlp="plain",
        mlp_bias=("bias", False),
        norm="ln",
        tie=True,
        head_dim_key=None,
        intermediate_keys=("ffn_hidden_size",),
        intermediate_factor=4,
        falcon=True,
    ),
    "gpt2": GPT2,
    "gpt_neox": Family(
        "GPT-NeoX (Pythia)",
        names=Names(
            "gpt_neox.embed_in", "gpt_neox.layers", "gpt_neox.final_layer_norm", "gpt_neox.rotary_emb"
        ),
        qkv="fused",
        qkv_bias=("attention_bias", True),
        mlp="plain",
        mlp_bias=True,
        norm="ln",
        rotary="rotary_pct",
        kv_heads="heads",
        head_dim_key=None,
        defaults=(("rotary_pct", 0.25),),
    ),
    "gptj": Family(
        "GPT-J",
        names=Names("transformer.wte", "transformer.h", "transformer.ln_f", "transformer.rotary_emb"),
        qkv_bias=False,
        mlp="plain",
        mlp_bias=True,
        norm="ln",
        layer_norms=1,
        lm_head_bias=True,
        rotary="rotary_dim",
        rotary_buffers="embed_positions",
        kv_heads="heads",
        head_dim_key=None,
        intermediate_keys=("n_inner",),
        intermediate_factor=4,
        defaults=(("rotary_dim", 64), ("n_positions", 2048)),
    ),
    "glm": GLM,
    "glm4": replace(GLM, label="GLM-4-0414 (glm4)", layer_norms=4),
    "chatglm": replace(
        GPT2,
        label="ChatGLM-6B (remote code)",
        names=Names("transformer.word_embeddings", "transformer.layers", "transformer.final_layernorm", None),
        rotary="half",
        rotary_buffers="chatglm",
        intermediate_keys=("inner_hidden_size",),
        remote_code=True,
    ),
    "chatglm2": Family(
        "ChatGLM2/ChatGLM3 (remote code)",
        names=Names(
            "transformer.embedding",
            "transformer.encoder.layers",
            "transformer.encoder.final_layernorm",
            "transformer.rotary_pos_emb",
            head="transformer.output_layer",
            rotary_at="first",
        ),
        qkv="fused",
        qkv_bias=("add_qkv_bias", False),
        o_bias=("add_bias_linear", False),
        mlp="fused_gated",
        mlp_bias=("add_bias_linear", False),
        norm="ln",
        rms_key="rmsnorm",
        tie=True,
        rotary="half",
        rotary_buffers="chatglm",
        kv_heads="chatglm2",
        head_dim_key="kv_channels",
        intermediate_keys=("ffn_hidden_size",),
        vocab_keys=("padded_vocab_size", "vocab_size"),
        remote_code=True,
    ),
    "internlm2": Family(
        "InternLM2 (remote code)",
        names=Names("model.tok_embeddings", "model.layers", "model.norm", None, head="output"),
        qkv="fused",
        qkv_bias=("bias", True),
        mlp_bias=False,
        rotary_buffers="cos_sin_cached",
        head_dim_key=None,
        remote_code=True,
    ),
}

# Spellings of model_type that older checkpoints carry.
ALIASES: dict[str, str] = {"RefinedWeb": "falcon", "RefinedWebModel": "falcon"}


def canonical_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with legacy spellings turned into the keys the family reads.

    Falcon's first hub files (``model_type: RefinedWeb`` for 40B, ``RefinedWebModel`` for 7B) say
    ``n_head``, ``n_head_kv`` and ``n_layer``; RefinedWeb is the new decoder architecture (grouped KV
    heads, two layer norms) even without ``new_decoder_architecture``. ChatGLM's remote code covers two
    layouts under one ``model_type``: ChatGLM2/3 configs carry ``ffn_hidden_size``/``padded_vocab_size``.
    A deep copy: transformers' config classes write into nested dicts they are given (``rope_scaling``
    gains ``rope_theta``), which must not change the caller's config or the catalogue.
    """
    out = copy.deepcopy(dict(config))
    model_type = str(out.get("model_type"))
    if model_type in ALIASES:
        out["model_type"] = ALIASES[model_type]
        renames = {
            "n_head": "num_attention_heads",
            "n_layer": "num_hidden_layers",
            "n_head_kv": "num_kv_heads",
        }
        for old, new in renames.items():
            if old in out and out.get(new) is None:
                out[new] = out.pop(old)
        if model_type == "RefinedWeb":
            out.setdefault("new_decoder_architecture", True)
    elif model_type == "chatglm" and ("ffn_hidden_size" in out or "padded_vocab_size" in out):
        out["model_type"] = "chatglm2"
    elif model_type == "falcon" and out.get("n_head_kv") is not None and out.get("num_kv_heads") is None:
        out["num_kv_heads"] = out["n_head_kv"]
    return out


def covered_model_types() -> list[str]:
    """Every ``model_type`` the analytic path sizes (legacy spellings included)."""
    return sorted({*FAMILIES, *ALIASES} - {"chatglm2"}, key=str.lower)


_SLIDING = {
    "none": "full",
    "all": "full, or all sliding with `sliding_window`",
    "qwen": "full; sliding from `max_window_layers` on with `use_sliding_window`",
    "qwen_moe": "full; alternate sliding below `max_window_layers` with `use_sliding_window`",
    "pattern": "{m} sliding then 1 full, repeated (`sliding_window_pattern` {n})",
}
_MLP = {"gated": "gated", "fused_gated": "gated, fused gate/up", "plain": "plain"}


def architectures_markdown() -> str:
    """The README's table of covered architectures, generated from ``FAMILIES`` and the catalogue."""
    from kubevram.planner.catalog import CONFIGS

    examples: dict[str, list[str]] = {}
    for model_id, config in CONFIGS.items():
        examples.setdefault(canonical_config(config)["model_type"], []).append(model_id)
    rows = [
        "| `model_type` | architecture | attention (KV cache per layer) | MLP | catalogue example |",
        "| --- | --- | --- | --- | --- |",
    ]
    for model_type in sorted(FAMILIES):
        fam = FAMILIES[model_type]
        if fam.mla:
            attention = "MLA: caches `kv_lora_rank + qk_rope_head_dim` latents"
        elif fam.falcon:
            attention = "multi-query, MHA, or grouped KV heads broadcast to every head"
        elif fam.kv_heads == "multi_query":
            attention = "multi-query (`multi_query`) or MHA"
        else:
            attention = _SLIDING[fam.sliding].format(n=fam.sliding_pattern, m=fam.sliding_pattern - 1)
            if fam.qk_norm != "none":
                enabled = fam.qk_norm_enabled
                attention += (
                    f"; q/k norms with `{enabled[0]}`" if isinstance(enabled, tuple) else "; q/k norms"
                )
        mlp = _MLP[fam.mlp]
        if fam.moe is not None:
            mlp = "MoE" + (" + shared experts" if fam.moe.shared else "") + f" (`{fam.moe.experts}`)"
        label = fam.label + (" (also `RefinedWeb`, `RefinedWebModel`)" if fam.falcon else "")
        shown = sorted(examples.get(model_type, []))[:1]
        key = "`chatglm`" if model_type == "chatglm2" else f"`{model_type}`"
        rows.append(f"| {key} | {label} | {attention} | {mlp} | {', '.join(shown) or '-'} |")
    return "\n".join(rows) + "\n"

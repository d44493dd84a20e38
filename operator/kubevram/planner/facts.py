"""One description of a decoder-only transformer, read from a Hugging Face ``config.json``.

``facts_from_config(config)`` reads any covered architecture into a frozen ``ModelFacts``: the
dimensions, the attention geometry (MHA/GQA/MQA, explicit ``head_dim``, MLA's latent ranks, q/k norms,
partial rotary), the MLP (gated, fused, plain, mixture of experts with shared experts), norms, biases,
the tied head, and one ``LayerSpec`` per decoder layer: its attention kind (full, sliding with its
window, chunked, none) and the values its KV cache stores per token, as vLLM's
``vllm/v1/kv_cache_interface.py`` describes a model as a list of per-layer specs.

What differs between families is data, not code: ``kubevram.planner.families.FAMILIES`` maps each
``model_type`` to a ``Family`` entry (module names, which projections are fused, which biases and norms
exist, the config keys and defaults of its transformers config class). Keys and their aliases:

=================  ===================================================================
fact               config keys
=================  ===================================================================
layers             num_hidden_layers, n_layer, num_layers (ChatGLM)
hidden size        hidden_size, n_embd, d_model
attention heads    num_attention_heads, n_head
KV heads           num_key_value_heads, num_kv_heads, n_head_kv (Falcon), multi_query_group_num
                   (ChatGLM2/3); ``multi_query`` (Falcon-7B, GPTBigCode) means 1; default: no GQA
head_dim           head_dim, kv_channels (ChatGLM2/3); default hidden_size / attention heads
intermediate       intermediate_size, n_inner, ffn_hidden_size, inner_hidden_size (ChatGLM);
                   default 4 x hidden_size where the family says so
vocabulary         vocab_size, padded_vocab_size (ChatGLM2/3)
sliding layers     layer_types; else the family's rule: every layer (``sliding_window`` set), a
                   pattern (``sliding_window_pattern``), or Qwen's ``use_sliding_window`` with
                   ``max_window_layers``
MLA                q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim
mixture of experts the family's expert-count key (num_local_experts, num_experts, n_routed_experts),
                   moe_intermediate_size, shared experts (shared_expert_intermediate_size,
                   n_shared_experts), first_k_dense_replace, moe_layer_freq, decoder_sparse_step,
                   mlp_only_layers
=================  ===================================================================

Pure: plain dicts in, a dataclass out. A config that lacks what is needed raises ``SpecError`` naming
the key, e.g. ``spec.model.config.hidden_size: is required (an integer > 0)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kubevram.api.errors import SpecError
from kubevram.planner.families import ALIASES, FAMILIES, Family, Flag, canonical_config
from kubevram.planner.quantization import Quantization, quantization_from_config


class Attention(StrEnum):
    """What a layer's KV cache keeps (transformers' ``config.layer_types``)."""

    full = "full_attention"
    sliding = "sliding_attention"
    chunked = "chunked_attention"
    none = "none"


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer: its attention kind and the values its KV cache stores per token.

    ``kv_elements`` counts K and V together: ``2 x kv_heads x head_dim`` for MHA/GQA/MQA,
    ``kv_lora_rank + qk_rope_head_dim`` for MLA (transformers caches the compressed latent and the
    rotary key, not per-head keys and values).
    """

    attention: Attention
    kv_elements: int
    window: int | None = None  # sliding window or attention chunk, in tokens
    moe: bool = False

    def tokens_held(self, tokens: int, prefill: int) -> int:
        """Tokens whose keys and values the layer holds at its peak while a sequence grows to ``tokens``,
        its prompt prefilled by one forward of ``prefill`` tokens.

        A full layer holds them all. transformers' ``DynamicSlidingWindowLayer`` keeps a view over the
        last ``window - 1`` tokens, but after a decode step the storage behind it holds ``window``, and
        right after a prefill longer than the window the whole prompt stays referenced until the next
        step: what is held is ``min(tokens, max(window, prefill))``.
        """
        if self.attention is Attention.none:
            return 0
        if self.window is None or self.attention is Attention.full:
            return tokens
        return min(tokens, max(self.window, min(prefill, tokens)))


@dataclass(frozen=True)
class ModelFacts:
    """The numbers of a decoder-only transformer that decide its memory, and its per-layer specs."""

    model_type: str
    family: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    layers: tuple[LayerSpec, ...] = ()
    # attention geometry
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # the family's q/k norms are present
    q_lora_rank: int = 0  # MLA (0: no low-rank query, or no MLA at all)
    kv_lora_rank: int = 0  # MLA: > 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # MLP
    mlp_bias: bool = False
    num_experts: int = 0  # 0: every MLP is dense
    num_experts_per_tok: int = 0
    expert_intermediate_size: int = 0
    shared_intermediate_size: int = 0  # shared experts, all together
    # the rest
    layer_norms: int = 2  # norms of the hidden size per block
    norm_bias: bool = False  # LayerNorm with a bias (else RMSNorm, or LayerNorm without bias)
    lm_head_bias: bool = False
    rotary_dim: int = 0  # dimensions rotated (inv_freq holds rotary_dim // 2 floats)
    rotary_tables: int = 1  # inv_freq pairs (Gemma-3: one per attention kind present)
    max_position_embeddings: int = 0
    rope_scaling_factor: float = 1.0  # rope_scaling / rope_parameters "factor" (1: none)
    original_max_position_embeddings: int = 0  # what the rope scaling extends (0: not given)
    falcon_new_arch: bool = False
    chatglm_version: int = 0  # 1: ChatGLM-6B, 2: ChatGLM2/3
    config_dtype: str | None = None
    quantization: Quantization | None = None  # a pre-quantized checkpoint's quantization_config
    # Only for architectures sized by introspection (family "meta"): their top-level modules.
    modules: tuple[Any, ...] = ()

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]

    @property
    def position_limit(self) -> int:
        """The longest sequence the model's positions reach (0: the config does not say): its
        ``max_position_embeddings``, or what its rope scaling extends that to (``factor`` times the
        original length, or times ``max_position_embeddings`` when the original is not given)."""
        if self.rope_scaling_factor <= 1:
            return self.max_position_embeddings
        base = self.original_max_position_embeddings or self.max_position_embeddings
        return max(self.max_position_embeddings, int(base * self.rope_scaling_factor))

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def cache_heads(self) -> int:
        """Heads the KV cache stores. transformers' Falcon (new decoder architecture) broadcasts its
        ``num_kv_heads`` to every attention head before caching; everyone else caches the KV heads."""
        return self.num_attention_heads if self.falcon_new_arch else self.num_kv_heads

    @property
    def kv_bytes_per_token_per_dtype_byte(self) -> int:
        """KV elements per token across all layers (K and V): multiply by the KV dtype's bytes."""
        return sum(layer.kv_elements for layer in self.layers)

    @property
    def sliding_window(self) -> int | None:
        windows = [layer.window for layer in self.layers if layer.window]
        return max(windows) if windows else None


# --------------------------------------------------------------------------------------------------
# Reading keys


def _get(config: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[str, Any] | None:
    for key in keys:
        if config.get(key) is not None:
            return key, config[key]
    return None


def _positive_int(
    config: Mapping[str, Any], keys: tuple[str, ...], where: str, default: int | None = None
) -> int:
    found = _get(config, keys)
    if found is None:
        if default is not None:
            return default
        names = " or ".join(keys)
        raise SpecError(f"{where}.{keys[0]}", f"is required (an integer > 0; config keys: {names})")
    key, value = found
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SpecError(f"{where}.{key}", f"{value!r} is not an integer > 0")
    return value


def _count(config: Mapping[str, Any], key: str, where: str, default: int = 0) -> int:
    """An integer >= 0 (0 and null mean none)."""
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpecError(f"{where}.{key}", f"{value!r} is not an integer >= 0")
    return value


def _bool(config: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SpecError(f"{where}.{key}", f"{value!r} is not true or false")
    return value


def flag(config: Mapping[str, Any], value: Flag, where: str) -> bool:
    """A family's flag: a constant, or ``(config key, default)``."""
    if isinstance(value, bool):
        return value
    key, default = value
    return _bool(config, key, default, where)


def _float(config: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise SpecError(f"{where}.{key}", f"{value!r} is not a number > 0")
    return float(value)


def _rope(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """transformers 5's ``rope_parameters``, or the older ``rope_scaling`` (a dict, or null)."""
    for key in ("rope_parameters", "rope_scaling"):
        value = config.get(key)
        if isinstance(value, Mapping):
            return value
    return {}


def _dtype(config: Mapping[str, Any]) -> str | None:
    value = config.get("torch_dtype") or config.get("dtype")
    return str(value) if value else None


# --------------------------------------------------------------------------------------------------
# The description


def facts_from_config(config: Mapping[str, Any], where: str = "spec.model.config") -> ModelFacts:
    """Read a Hugging Face ``config.json`` (as a dict) into ``ModelFacts``.

    ``where`` prefixes field names in errors (``--model-config`` for the CLI).
    Raises ``SpecError`` for an unknown ``model_type`` (naming the keys to supply) or a missing key.
    """
    if not isinstance(config, Mapping):
        raise SpecError(where, f"{type(config).__name__} is not a config.json object")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise SpecError(f"{where}.model_type", f"{model_type!r} is required (e.g. llama, qwen2, chatglm)")
    if (model_type not in FAMILIES and model_type not in ALIASES) or model_type == "chatglm2":
        raise UnknownArchitecture(model_type, where)
    config = canonical_config(config)
    family_name = str(config["model_type"])
    fam = FAMILIES[family_name]
    # keys the config class fills in when config.json leaves them out
    config = {**dict(fam.defaults), **config}
    chatglm_version = {"chatglm": 1, "chatglm2": 2}.get(family_name, 0)

    layers = _positive_int(config, ("num_hidden_layers", "n_layer", "num_layers"), where)
    hidden = _positive_int(config, ("hidden_size", "n_embd", "d_model"), where)
    heads = _positive_int(config, ("num_attention_heads", "n_head"), where)
    head_dim_keys = (fam.head_dim_key,) if fam.head_dim_key else ()
    if not head_dim_keys or _get(config, head_dim_keys) is None:
        if hidden % heads:
            raise SpecError(f"{where}.num_attention_heads", f"{heads} does not divide hidden_size {hidden}")
        head_dim = hidden // heads
    else:
        head_dim = _positive_int(config, head_dim_keys, where)
    kv_heads = _kv_heads(config, fam, heads, where)
    if heads % kv_heads:
        raise SpecError(
            f"{where}.num_key_value_heads", f"{kv_heads} does not divide num_attention_heads {heads}"
        )
    intermediate = _positive_int(
        config,
        fam.intermediate_keys,
        where,
        default=fam.intermediate_factor * hidden if fam.intermediate_factor else None,
    )
    vocab = _positive_int(config, fam.vocab_keys, where)
    tie = _bool(config, "tie_word_embeddings", fam.tie, where)

    # MLA: DeepSeek-V2/V3 cache the compressed latent and the rotary key
    kv_lora = _count(config, "kv_lora_rank", where) if fam.mla else 0
    rope_dim = _count(config, "qk_rope_head_dim", where) if kv_lora else 0
    mla: dict[str, Any] = {
        "q_lora_rank": _count(config, "q_lora_rank", where) if kv_lora else 0,
        "kv_lora_rank": kv_lora,
        "qk_nope_head_dim": _count(config, "qk_nope_head_dim", where) if kv_lora else 0,
        "qk_rope_head_dim": rope_dim,
        "v_head_dim": _count(config, "v_head_dim", where) if kv_lora else 0,
    }
    falcon_new = fam.falcon and _bool(config, "new_decoder_architecture", False, where)
    cache_heads = heads if falcon_new else kv_heads
    kv_elements = kv_lora + rope_dim if kv_lora else 2 * cache_heads * head_dim

    experts, moe_layers = _experts(config, fam, layers, where)
    kinds, windows = _attention_kinds(config, fam, layers, where)
    specs = tuple(
        LayerSpec(kind, 0 if kind is Attention.none else kv_elements, windows[i], i in moe_layers)
        for i, kind in enumerate(kinds)
    )
    rotary = rope_dim if kv_lora else _rotary_dim(config, fam, head_dim, where)
    rope = _rope(config)
    factor = rope.get("factor")
    return ModelFacts(
        model_type=str(model_type),
        family=family_name,
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=vocab,
        tie_word_embeddings=tie,
        layers=specs,
        **mla,
        qkv_bias=flag(config, fam.qkv_bias, where),
        o_bias=flag(config, fam.qkv_bias if fam.o_bias is None else fam.o_bias, where),
        qk_norm=fam.qk_norm != "none" and flag(config, fam.qk_norm_enabled, where),
        mlp_bias=flag(config, fam.mlp_bias, where),
        norm_bias=fam.norm == "ln"
        and not (fam.rms_key is not None and _bool(config, fam.rms_key, True, where)),
        num_experts=experts,
        num_experts_per_tok=_count(config, "num_experts_per_tok", where) if experts else 0,
        expert_intermediate_size=(
            _positive_int(config, (fam.moe.intermediate,), where) if experts and fam.moe else 0
        ),
        shared_intermediate_size=_shared(config, fam, where) if experts else 0,
        lm_head_bias=flag(config, fam.lm_head_bias, where),
        rotary_dim=rotary,
        rotary_tables=len({k for k in kinds if k is not Attention.none}) if fam.rotary_per_kind else 1,
        max_position_embeddings=int(
            config.get("max_position_embeddings")
            or config.get("n_positions")
            or config.get("max_sequence_length")
            or config.get("seq_length")
            or 0
        ),
        rope_scaling_factor=float(factor) if isinstance(factor, int | float) and factor > 1 else 1.0,
        original_max_position_embeddings=int(rope.get("original_max_position_embeddings") or 0),
        falcon_new_arch=falcon_new,
        chatglm_version=chatglm_version,
        layer_norms=_layer_norms(config, fam, falcon_new, where),
        config_dtype=_dtype(config),
        quantization=_quantization(config, where),
    )


def _quantization(config: Mapping[str, Any], where: str) -> Quantization | None:
    return quantization_from_config(config, where)


def _kv_heads(config: Mapping[str, Any], fam: Family, heads: int, where: str) -> int:
    if fam.falcon:
        if _bool(config, "new_decoder_architecture", False, where):
            return _positive_int(config, ("num_kv_heads",), where, heads)
        return 1 if _bool(config, "multi_query", True, where) else heads
    if fam.kv_heads == "multi_query":
        return 1 if _bool(config, "multi_query", True, where) else heads
    if fam.kv_heads == "heads":
        return heads
    if fam.kv_heads == "chatglm2":
        if _bool(config, "multi_query_attention", False, where):
            return _positive_int(config, ("multi_query_group_num",), where)
        return heads
    return _positive_int(config, ("num_key_value_heads",), where, heads)


def _layer_norms(config: Mapping[str, Any], fam: Family, falcon_new: bool, where: str) -> int:
    if fam.falcon:
        if falcon_new:
            return 2 if (config.get("num_ln_in_parallel_attn") or 2) == 2 else 1
        return 1 if _bool(config, "parallel_attn", True, where) else 2
    if fam.parallel_key is not None and _bool(config, fam.parallel_key, False, where):
        return 1
    return fam.layer_norms


def _rotary_dim(config: Mapping[str, Any], fam: Family, head_dim: int, where: str) -> int:
    if fam.rotary == "none":  # (Falcon builds its rotary module even with alibi)
        return 0
    if fam.rotary == "rotary_dim":
        return _positive_int(config, ("rotary_dim",), where, head_dim)
    if fam.rotary == "half":  # ChatGLM: each half of the head rotated separately / 2D positions
        return head_dim // 2
    factor = config.get(fam.rotary)
    if factor is None:
        factor = _rope(config).get("partial_rotary_factor", 1.0)
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0 < factor <= 1:
        raise SpecError(f"{where}.{fam.rotary}", f"{factor!r} is not a fraction in (0, 1]")
    return int(head_dim * float(factor))


def _attention_kinds(
    config: Mapping[str, Any], fam: Family, layers: int, where: str
) -> tuple[list[Attention], list[int | None]]:
    """Per layer: its attention kind and window, as transformers' config classes and ``DynamicCache``
    decide them (``layer_types`` first, then each family's rule)."""
    window = config.get("sliding_window")
    chunk = config.get("attention_chunk_size")
    for key, value in (("sliding_window", window), ("attention_chunk_size", chunk)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 1):
            raise SpecError(f"{where}.{key}", f"{value!r} is not an integer > 1 or null")
    if fam.sliding == "qwen" and not _bool(config, "use_sliding_window", False, where):
        window = None  # Qwen's config classes drop the window unless use_sliding_window
    layer_types = config.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != layers:
            raise SpecError(f"{where}.layer_types", f"is not a list of {layers} layer types")
        kinds = [_kind(t, where) for t in layer_types]
    elif fam.sliding == "all":
        kinds = [Attention.sliding if window is not None else Attention.full] * layers
    elif fam.sliding == "qwen":
        first = _count(config, "max_window_layers", where, layers)
        kinds = [
            Attention.sliding if window is not None and i >= first else Attention.full for i in range(layers)
        ]
    elif fam.sliding == "qwen_moe":
        first = _count(config, "max_window_layers", where, layers)
        use = _bool(config, "use_sliding_window", False, where)
        kinds = [
            Attention.sliding if use and (i + 1) % 2 and i < first else Attention.full for i in range(layers)
        ]
    elif fam.sliding == "pattern":
        pattern = _positive_int(config, ("sliding_window_pattern",), where, fam.sliding_pattern)
        kinds = [Attention.sliding if (i + 1) % pattern else Attention.full for i in range(layers)]
    else:
        kinds = [Attention.full] * layers
    windows: list[int | None] = []
    for i, kind in enumerate(kinds):
        size = window if kind is Attention.sliding else chunk if kind is Attention.chunked else None
        if kind in (Attention.sliding, Attention.chunked) and size is None:
            key = "sliding_window" if kind is Attention.sliding else "attention_chunk_size"
            raise SpecError(f"{where}.{key}", f"is required: layer {i} is {kind.value}")
        windows.append(size)
    return kinds, windows


_LAYER_TYPES = {
    "full_attention": Attention.full,
    "sliding_attention": Attention.sliding,
    "chunked_attention": Attention.chunked,
}


def _kind(value: Any, where: str) -> Attention:
    if value in _LAYER_TYPES:
        return _LAYER_TYPES[value]
    known = ", ".join(_LAYER_TYPES)
    raise SpecError(f"{where}.layer_types", f"{value!r} is not a layer type the estimator knows ({known})")


def _experts(config: Mapping[str, Any], fam: Family, layers: int, where: str) -> tuple[int, frozenset[int]]:
    """Experts per MoE layer and which layers are MoE (the rest have a dense MLP)."""
    if fam.moe is None:
        return 0, frozenset()
    experts = _count(config, fam.moe.experts, where)
    if not experts:
        return 0, frozenset()
    first = _count(config, "first_k_dense_replace", where)
    freq = _count(config, "moe_layer_freq", where, 1) or 1
    step = _count(config, "decoder_sparse_step", where, 1) or 1
    only = config.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
        raise SpecError(f"{where}.mlp_only_layers", f"{only!r} is not a list of layer indices")
    moe = frozenset(
        i for i in range(layers) if i >= first and i % freq == 0 and (i + 1) % step == 0 and i not in only
    )
    return experts, moe


def _shared(config: Mapping[str, Any], fam: Family, where: str) -> int:
    moe = fam.moe
    if moe is None or moe.shared is None:
        return 0
    if moe.shared == "n_shared_experts":
        return _count(config, "n_shared_experts", where) * _positive_int(config, (moe.intermediate,), where)
    return _count(config, moe.shared, where)


class UnknownArchitecture(SpecError):
    """The analytic path does not know this ``model_type``; meta-device introspection may."""

    def __init__(self, model_type: str, where: str, hint: str = "") -> None:
        self.model_type = model_type
        shown = model_type if len(model_type) <= 60 else model_type[:57] + "..."
        super().__init__(
            f"{where}.model_type",
            f"{shown!r} is not an architecture kubevram covers (the README's table of covered "
            f"architectures); give the config of a covered model_type with the keys "
            f"{', '.join(REQUIRED_KEYS)}{hint}",
        )


REQUIRED_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)

"""Model facts from a Hugging Face ``config.json``: the dimensions every memory formula needs.

``facts_from_config(config)`` reads the standard keys and each family's deviations into a frozen
``ModelFacts``. The family decides the module tree (see ``kubevram.planner.modules``); the facts here
are the numbers. Keys and their aliases, in the order they are looked up:

=================  ===================================================================
fact               config keys
=================  ===================================================================
layers             num_hidden_layers, n_layer, num_layers (ChatGLM)
hidden size        hidden_size, n_embd, d_model
attention heads    num_attention_heads, n_head
KV heads           num_key_value_heads, num_kv_heads (Falcon), multi_query_group_num (ChatGLM2/3);
                   Falcon ``multi_query`` means 1; default: the attention heads (no GQA)
head_dim           head_dim, kv_channels (ChatGLM2/3); default hidden_size / attention heads
intermediate       intermediate_size, n_inner, ffn_hidden_size, inner_hidden_size (ChatGLM);
                   default 4 x hidden_size
vocabulary         vocab_size, padded_vocab_size (ChatGLM2/3)
=================  ===================================================================

Pure: plain dicts in, a dataclass out. A config that lacks what is needed raises ``SpecError`` naming
the key, e.g. ``spec.model.config.hidden_size: is required (an integer > 0)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubevram.api.errors import SpecError

# model_type -> family. Families share a module tree; the facts carry their differences.
FAMILIES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gemma": "llama",
    "mixtral": "llama",
    "phi3": "phi3",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "falcon": "falcon",
    "RefinedWeb": "falcon",
    "RefinedWebModel": "falcon",
    "chatglm": "chatglm",
}

# transformers' config-class default for tie_word_embeddings when the key is absent. ChatGLM's
# remote code has no key and ties its output layer (PretrainedConfig's default, True); ChatGLM2/3
# configs say false explicitly.
TIE_DEFAULT: dict[str, bool] = {
    "llama": False,
    "mistral": False,
    "qwen2": False,
    "gemma": True,
    "mixtral": False,
    "phi3": False,
    "gpt2": True,
    "gpt_neox": False,
    "falcon": True,
    "RefinedWeb": True,
    "RefinedWebModel": True,
    "chatglm": True,
}

REQUIRED_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)


@dataclass(frozen=True)
class ModelFacts:
    """The numbers of a decoder-only transformer that decide its memory."""

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
    attention_bias: bool = False  # q/k/v (and o, for llama's attention_bias) carry biases
    o_proj_bias: bool = False
    mlp_bias: bool = False
    num_experts: int = 0  # 0: a dense MLP
    num_experts_per_tok: int = 0
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()  # per layer: does it keep only a window of tokens?
    rotary_dim: int = 0  # dimensions rotated (inv_freq holds rotary_dim // 2 floats)
    max_position_embeddings: int = 0
    # family details
    ln_bias: bool = False  # LayerNorm (weight and bias) instead of RMSNorm (weight)
    parallel_attn: bool = True  # falcon: attention and MLP read the same normed input
    falcon_new_arch: bool = False
    falcon_ln_count: int = 1
    chatglm_version: int = 0  # 1: ChatGLM-6B, 2: ChatGLM2/3
    config_dtype: str | None = None
    # Only for architectures sized by introspection (family "meta"): their top-level modules.
    modules: tuple[Any, ...] = ()

    @property
    def cache_heads(self) -> int:
        """Heads the KV cache stores. transformers' Falcon (new decoder architecture) broadcasts its
        ``num_kv_heads`` to every attention head before caching; everyone else caches the KV heads."""
        return self.num_attention_heads if self.falcon_new_arch else self.num_kv_heads

    @property
    def kv_bytes_per_token_per_dtype_byte(self) -> int:
        """KV elements per token across all layers (K and V): multiply by the KV dtype's bytes."""
        return 2 * self.num_layers * self.cache_heads * self.head_dim

    def tokens_kept(self, layer: int, tokens: int) -> int:
        """Tokens a layer's KV cache holds after ``tokens`` tokens.

        transformers' ``DynamicSlidingWindowLayer`` keeps the last ``sliding_window - 1`` tokens;
        full-attention layers keep them all.
        """
        if self.sliding_window and self.sliding_layers and self.sliding_layers[layer]:
            return min(tokens, self.sliding_window - 1)
        return tokens


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


def _bool(config: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SpecError(f"{where}.{key}", f"{value!r} is not true or false")
    return value


def _sliding(
    config: Mapping[str, Any], model_type: str, layers: int, where: str
) -> tuple[int | None, tuple[bool, ...]]:
    """Which layers keep a sliding window, following each transformers config class."""
    window = config.get("sliding_window")
    if window is None or model_type not in ("mistral", "mixtral", "qwen2", "phi3"):
        return None, ()
    if isinstance(window, bool) or not isinstance(window, int) or window <= 1:
        raise SpecError(f"{where}.sliding_window", f"{window!r} is not an integer > 1 or null")
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == layers:
        flags = tuple(t == "sliding_attention" for t in layer_types)
    elif model_type == "qwen2":
        # Qwen2: only with use_sliding_window, and only layers from max_window_layers on.
        if not config.get("use_sliding_window", False):
            return None, ()
        first = config.get("max_window_layers", layers)
        flags = tuple(i >= first for i in range(layers))
    else:
        flags = (True,) * layers
    return (window, flags) if any(flags) else (None, ())


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
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnknownArchitecture(model_type, where)
    if family == "chatglm":
        return _chatglm(config, where)

    layers = _positive_int(config, ("num_hidden_layers", "n_layer", "num_layers"), where)
    hidden = _positive_int(config, ("hidden_size", "n_embd", "d_model"), where)
    heads = _positive_int(config, ("num_attention_heads", "n_head"), where)
    explicit_head_dim = config.get("head_dim")
    if explicit_head_dim is not None:
        head_dim = _positive_int(config, ("head_dim",), where)
    else:
        if hidden % heads:
            raise SpecError(f"{where}.num_attention_heads", f"{heads} does not divide hidden_size {hidden}")
        head_dim = hidden // heads
    kv_heads = _kv_heads(config, family, heads, where)
    if heads % kv_heads:
        raise SpecError(
            f"{where}.num_key_value_heads", f"{kv_heads} does not divide num_attention_heads {heads}"
        )
    intermediate = _positive_int(
        config,
        ("intermediate_size", "n_inner", "ffn_hidden_size"),
        where,
        default=4 * hidden if family in ("gpt2", "falcon") else None,
    )
    vocab = _positive_int(config, ("vocab_size",), where)
    tie = _bool(config, "tie_word_embeddings", TIE_DEFAULT[model_type], where)
    window, sliding_layers = _sliding(config, model_type, layers, where)
    experts = config.get("num_local_experts") if model_type == "mixtral" else None
    rotary = _rotary_dim(config, family, head_dim)
    bias = _biases(config, model_type, where)
    return ModelFacts(
        model_type=model_type,
        family=family,
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=vocab,
        tie_word_embeddings=tie,
        attention_bias=bias[0],
        o_proj_bias=bias[1],
        mlp_bias=bias[2],
        num_experts=_positive_int(config, ("num_local_experts",), where) if experts is not None else 0,
        num_experts_per_tok=_positive_int(config, ("num_experts_per_tok",), where, 2) if experts else 0,
        sliding_window=window,
        sliding_layers=sliding_layers,
        rotary_dim=rotary,
        max_position_embeddings=int(
            config.get("max_position_embeddings")
            or config.get("n_positions")
            or config.get("seq_length")
            or 0
        ),
        ln_bias=family in ("gpt2", "gpt_neox", "falcon"),
        parallel_attn=_bool(config, "parallel_attn", True, where),
        falcon_new_arch=_bool(config, "new_decoder_architecture", False, where),
        falcon_ln_count=int(config.get("num_ln_in_parallel_attn") or 2),
        config_dtype=_dtype(config),
    )


class UnknownArchitecture(SpecError):
    """The analytic path does not know this ``model_type``; meta-device introspection may."""

    def __init__(self, model_type: str, where: str) -> None:
        self.model_type = model_type
        known = ", ".join(sorted(set(FAMILIES) - {"RefinedWeb", "RefinedWebModel"}))
        super().__init__(
            f"{where}.model_type",
            f"{model_type!r} is not an architecture the analytic estimator knows ({known}); install "
            f"transformers (kubevram[worker]) to size it on the meta device, or supply a config with a known "
            f"model_type and the keys {', '.join(REQUIRED_KEYS[1:])}",
        )


def _biases(config: Mapping[str, Any], model_type: str, where: str) -> tuple[bool, bool, bool]:
    """(q/k/v bias, output projection bias, MLP bias), as each transformers model builds its Linears."""
    if model_type in ("llama", "gemma"):
        attention = _bool(config, "attention_bias", False, where)
        return (
            attention,
            attention,
            _bool(config, "mlp_bias", False, where) if model_type == "llama" else False,
        )
    if model_type == "qwen2":
        return True, False, False
    if model_type == "gpt2":
        return True, True, True
    if model_type == "gpt_neox":
        attention = _bool(config, "attention_bias", True, where)
        return attention, attention, True
    if model_type.startswith(("falcon", "RefinedWeb")):
        bias = _bool(config, "bias", False, where)
        return bias, bias, bias
    return False, False, False  # mistral, mixtral, phi3


def _kv_heads(config: Mapping[str, Any], family: str, heads: int, where: str) -> int:
    if family == "falcon":
        if _bool(config, "new_decoder_architecture", False, where):
            return _positive_int(config, ("num_kv_heads",), where, heads)
        return 1 if _bool(config, "multi_query", True, where) else heads
    if family in ("gpt2", "gpt_neox"):
        return heads
    return _positive_int(config, ("num_key_value_heads",), where, heads)


def _rotary_dim(config: Mapping[str, Any], family: str, head_dim: int) -> int:
    if family == "gpt2":
        return 0
    if family == "falcon" and config.get("alibi"):
        return 0
    factor = (
        config.get("rotary_pct", 0.25) if family == "gpt_neox" else config.get("partial_rotary_factor", 1.0)
    )
    return int(head_dim * float(factor))


def _dtype(config: Mapping[str, Any]) -> str | None:
    value = config.get("torch_dtype") or config.get("dtype")
    return str(value) if value else None


def _chatglm(config: Mapping[str, Any], where: str) -> ModelFacts:
    """ChatGLM's remote-code configs: v1 (ChatGLM-6B, ``inner_hidden_size``), v2/v3 (``ffn_hidden_size``)."""
    layers = _positive_int(config, ("num_layers", "num_hidden_layers"), where)
    hidden = _positive_int(config, ("hidden_size",), where)
    heads = _positive_int(config, ("num_attention_heads",), where)
    version = 2 if ("ffn_hidden_size" in config or "padded_vocab_size" in config) else 1
    if version == 1:
        head_dim = hidden // heads
        kv_heads = heads
        intermediate = _positive_int(config, ("inner_hidden_size",), where, 4 * hidden)
        vocab = _positive_int(config, ("vocab_size",), where)
        rotary = head_dim // 2  # 2D positions: each half of the head is rotated separately
        qkv_bias, other_bias, ln_bias = True, True, True
    else:
        head_dim = _positive_int(config, ("kv_channels",), where, hidden // heads)
        multi_query = _bool(config, "multi_query_attention", False, where)
        kv_heads = _positive_int(config, ("multi_query_group_num",), where) if multi_query else heads
        intermediate = _positive_int(config, ("ffn_hidden_size",), where)
        vocab = _positive_int(config, ("padded_vocab_size", "vocab_size"), where)
        rotary = head_dim // 2
        qkv_bias = _bool(config, "add_qkv_bias", False, where)
        other_bias = _bool(config, "add_bias_linear", False, where)
        ln_bias = not _bool(config, "rmsnorm", True, where)
    return ModelFacts(
        model_type="chatglm",
        family="chatglm",
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=vocab,
        tie_word_embeddings=_bool(config, "tie_word_embeddings", True, where),
        attention_bias=qkv_bias,
        o_proj_bias=other_bias,
        mlp_bias=other_bias,
        rotary_dim=rotary,
        max_position_embeddings=int(config.get("max_sequence_length") or config.get("seq_length") or 0),
        ln_bias=ln_bias,
        chatglm_version=version,
        config_dtype=_dtype(config),
    )

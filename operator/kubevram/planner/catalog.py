"""Published ``config.json`` values of well-known models, so a plan needs no download.

Lookup order everywhere a config is needed: ``spec.model.config`` (inline), ``spec.model.configMapRef``,
``--model-config``, then this catalogue by ``spec.model.id`` (case-insensitive; a path ending in a known
name such as ``/models/Qwen2-7B-Instruct`` matches too). Only the keys the planner reads are kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_LLAMA2_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}
_LLAMA2_70B = {
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}
_LLAMA3_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
_LLAMA3_70B = {
    **_LLAMA3_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
}
_LLAMA32_1B = {
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
_QWEN2_7B = {
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "sliding_window": 131072,
    "use_sliding_window": False,
    "max_window_layers": 28,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
_QWEN2_05B = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "max_window_layers": 24,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
_MISTRAL_7B = {
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "sliding_window": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
_MIXTRAL_8X7B = {
    "model_type": "mixtral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "sliding_window": None,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
_GEMMA_7B = {
    "model_type": "gemma",
    "hidden_size": 3072,
    "intermediate_size": 24576,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "head_dim": 256,
    "vocab_size": 256000,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-06,
    "torch_dtype": "bfloat16",
}
_PHI3_MINI = {
    "model_type": "phi3",
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32064,
    "max_position_embeddings": 4096,
    "sliding_window": 2047,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "pad_token_id": 32000,
}
_GPT2 = {
    "model_type": "gpt2",
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "vocab_size": 50257,
    "n_positions": 1024,
}
_PYTHIA_6_9B = {
    "model_type": "gpt_neox",
    "hidden_size": 4096,
    "intermediate_size": 16384,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "vocab_size": 50432,
    "max_position_embeddings": 2048,
    "rotary_pct": 0.25,
    "tie_word_embeddings": False,
    "use_parallel_residual": True,
    "torch_dtype": "float16",
}
_FALCON_7B = {
    "model_type": "falcon",
    "hidden_size": 4544,
    "num_hidden_layers": 32,
    "num_attention_heads": 71,
    "vocab_size": 65024,
    "multi_query": True,
    "parallel_attn": True,
    "bias": False,
    "alibi": False,
    "new_decoder_architecture": False,
    "torch_dtype": "bfloat16",
}
_CHATGLM_6B = {
    "model_type": "chatglm",
    "num_layers": 28,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "inner_hidden_size": 16384,
    "vocab_size": 130528,
    "max_sequence_length": 2048,
    "position_encoding_2d": True,
    "layernorm_epsilon": 1e-05,
    "torch_dtype": "float16",
}
_CHATGLM2_6B = {
    "model_type": "chatglm",
    "num_layers": 28,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "kv_channels": 128,
    "ffn_hidden_size": 13696,
    "padded_vocab_size": 65024,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "rmsnorm": True,
    "post_layer_norm": True,
    "seq_length": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}

CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/llama-2-7b-hf": _LLAMA2_7B,
    "meta-llama/llama-2-7b-chat-hf": _LLAMA2_7B,
    "meta-llama/llama-2-70b-hf": _LLAMA2_70B,
    "meta-llama/llama-2-70b-chat-hf": _LLAMA2_70B,
    "meta-llama/meta-llama-3-8b": _LLAMA3_8B,
    "meta-llama/meta-llama-3-8b-instruct": _LLAMA3_8B,
    "meta-llama/meta-llama-3-70b": _LLAMA3_70B,
    "meta-llama/meta-llama-3-70b-instruct": _LLAMA3_70B,
    "meta-llama/llama-3.2-1b": _LLAMA32_1B,
    "meta-llama/llama-3.2-1b-instruct": _LLAMA32_1B,
    "qwen/qwen2-7b": _QWEN2_7B,
    "qwen/qwen2-7b-instruct": _QWEN2_7B,
    "qwen/qwen2-0.5b": _QWEN2_05B,
    "qwen/qwen2-0.5b-instruct": _QWEN2_05B,
    "mistralai/mistral-7b-v0.1": _MISTRAL_7B,
    "mistralai/mixtral-8x7b-v0.1": _MIXTRAL_8X7B,
    "mistralai/mixtral-8x7b-instruct-v0.1": _MIXTRAL_8X7B,
    "google/gemma-7b": _GEMMA_7B,
    "microsoft/phi-3-mini-4k-instruct": _PHI3_MINI,
    "openai-community/gpt2": _GPT2,
    "gpt2": _GPT2,
    "eleutherai/pythia-6.9b": _PYTHIA_6_9B,
    "tiiuae/falcon-7b": _FALCON_7B,
    "thudm/chatglm-6b": _CHATGLM_6B,
    "thudm/chatglm2-6b": _CHATGLM2_6B,
}


def known_config(model_id: str) -> Mapping[str, Any] | None:
    """The published config of ``model_id`` (hub id, or a path ending in a known model name), if known."""
    key = model_id.strip().lower().rstrip("/")
    if key in CONFIGS:
        return CONFIGS[key]
    tail = key.rsplit("/", 1)[-1]
    matches = {id(v): v for k, v in CONFIGS.items() if k.rsplit("/", 1)[-1] == tail}
    return next(iter(matches.values())) if len(matches) == 1 else None

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

# Architectures beyond the first ten families: real dimensions from each model's config.json on the Hub
# (only the keys the planner reads; the config classes' defaults fill in the rest the same way).
_LLAMA31_8B = {**_LLAMA3_8B, "max_position_embeddings": 131072,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
_LLAMA31_405B = {**_LLAMA31_8B, "hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
                 "num_attention_heads": 128}
_QWEN25_72B = {
    **_QWEN2_7B, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "max_window_layers": 70,
}
_QWEN15_MOE = {
    "model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_key_value_heads": 16, "num_experts": 60, "num_experts_per_tok": 4, "decoder_sparse_step": 1,
    "vocab_size": 151936, "max_position_embeddings": 8192, "sliding_window": 32768,
    "use_sliding_window": False,
    "max_window_layers": 21, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
_QWEN3_8B = {
    "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
    "max_position_embeddings": 40960, "sliding_window": None, "use_sliding_window": False,
    "max_window_layers": 36, "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
_QWEN3_30B_A3B = {
    "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "vocab_size": 151936, "max_position_embeddings": 40960, "sliding_window": None,
    "use_sliding_window": False, "max_window_layers": 48, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
_GEMMA2_9B = {
    "model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000,
    "max_position_embeddings": 8192, "sliding_window": 4096, "query_pre_attn_scalar": 256,
    "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "torch_dtype": "float32",
}
_GEMMA3_1B = {
    "model_type": "gemma3_text", "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144,
    "max_position_embeddings": 32768, "sliding_window": 512, "sliding_window_pattern": 6,
    "query_pre_attn_scalar": 256, "rope_theta": 1000000, "rope_local_base_freq": 10000,
    "torch_dtype": "bfloat16",
}
_COMMAND_R = {
    "model_type": "cohere", "hidden_size": 8192, "intermediate_size": 22528, "num_hidden_layers": 40,
    "num_attention_heads": 64, "num_key_value_heads": 64, "vocab_size": 256000,
    "max_position_embeddings": 8192, "logit_scale": 0.0625, "use_qk_norm": False, "tie_word_embeddings": True,
    "torch_dtype": "float16",
}
_COMMAND_R7B = {
    "model_type": "cohere2", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 256000,
    "max_position_embeddings": 8192, "sliding_window": 4096, "sliding_window_pattern": 4,
    "logit_scale": 0.25, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}
_OLMO_7B = {
    "model_type": "olmo", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 50304,
    "max_position_embeddings": 2048, "attention_bias": False, "clip_qkv": None, "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
_OLMO2_7B = {
    "model_type": "olmo2", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 100352,
    "max_position_embeddings": 4096, "attention_bias": False, "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
_GRANITE_8B = {
    "model_type": "granite", "hidden_size": 4096, "intermediate_size": 12800, "num_hidden_layers": 40,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 49155,
    "max_position_embeddings": 4096, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
_GRANITE_MOE_3B = {
    "model_type": "granitemoe", "hidden_size": 1536, "intermediate_size": 512, "num_hidden_layers": 32,
    "num_attention_heads": 24, "num_key_value_heads": 8, "num_local_experts": 40, "num_experts_per_tok": 8,
    "vocab_size": 49155, "max_position_embeddings": 4096, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
_STARCODER2_7B = {
    "model_type": "starcoder2", "hidden_size": 4608, "intermediate_size": 18432, "num_hidden_layers": 32,
    "num_attention_heads": 36, "num_key_value_heads": 4, "vocab_size": 49152,
    "max_position_embeddings": 16384, "sliding_window": 4096, "use_bias": True, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
_STARCODER = {
    "model_type": "gpt_bigcode", "n_embd": 6144, "n_inner": 24576, "n_layer": 40, "n_head": 48,
    "n_positions": 8192, "vocab_size": 49152, "multi_query": True, "torch_dtype": "float32",
}
_SANTACODER = {
    "model_type": "gpt_bigcode", "n_embd": 2048, "n_inner": 8192, "n_layer": 24, "n_head": 16,
    "n_positions": 2048, "vocab_size": 49280, "multi_query": True, "torch_dtype": "float32",
}
_STABLELM2_16B = {
    "model_type": "stablelm", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 100352,
    "max_position_embeddings": 4096, "partial_rotary_factor": 0.25, "use_qkv_bias": True,
    "qk_layernorm": False, "use_parallel_residual": False, "tie_word_embeddings": False,
    "torch_dtype": "float16",
}
_PHI2 = {
    "model_type": "phi", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 51200,
    "max_position_embeddings": 2048, "partial_rotary_factor": 0.4, "qk_layernorm": False,
    "tie_word_embeddings": False, "torch_dtype": "float16",
}
_PHI35_MOE = {
    "model_type": "phimoe", "hidden_size": 4096, "intermediate_size": 6400, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 16, "num_experts_per_tok": 2,
    "vocab_size": 32064, "max_position_embeddings": 131072, "sliding_window": 131072,
    "attention_bias": True, "lm_head_bias": True, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
_DEEPSEEK_V2_LITE = {
    "model_type": "deepseek_v2", "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64,
    "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "vocab_size": 102400, "max_position_embeddings": 163840,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
_DEEPSEEK_V3 = {
    "model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1,
    "n_group": 8, "topk_group": 4, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 129280, "max_position_embeddings": 163840,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
# Falcon-40B's first hub config (remote code): legacy keys, new decoder architecture implied.
_FALCON_40B = {
    "model_type": "RefinedWeb", "hidden_size": 8192, "n_head": 128, "n_head_kv": 8, "n_layer": 60,
    "vocab_size": 65024, "parallel_attn": True, "bias": False, "alibi": False, "torch_dtype": "bfloat16",
}
_GPTJ_6B = {
    "model_type": "gptj", "n_embd": 4096, "n_layer": 28, "n_head": 16, "rotary_dim": 64, "n_positions": 2048,
    "vocab_size": 50400, "tie_word_embeddings": False, "torch_dtype": "float32",
}
_GLM4_9B_HF = {
    "model_type": "glm", "hidden_size": 4096, "intermediate_size": 13696, "num_hidden_layers": 40,
    "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 151552,
    "max_position_embeddings": 131072, "attention_bias": True, "partial_rotary_factor": 0.5,
    "tie_word_embeddings": False, "pad_token_id": 151329, "torch_dtype": "bfloat16",
}
_GLM4_9B_0414 = {**_GLM4_9B_HF, "model_type": "glm4", "max_position_embeddings": 32768}
_INTERNLM2_7B = {
    "model_type": "internlm2", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 92544,
    "max_position_embeddings": 32768, "bias": False, "rope_theta": 1000000,
    "rope_scaling": {"type": "dynamic", "factor": 2.0}, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
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
    "meta-llama/llama-3.1-8b": _LLAMA31_8B,
    "meta-llama/llama-3.1-8b-instruct": _LLAMA31_8B,
    "meta-llama/llama-3.1-405b": _LLAMA31_405B,
    "meta-llama/llama-3.1-405b-instruct": _LLAMA31_405B,
    "qwen/qwen2.5-72b-instruct": _QWEN25_72B,
    "qwen/qwen1.5-moe-a2.7b": _QWEN15_MOE,
    "qwen/qwen3-8b": _QWEN3_8B,
    "qwen/qwen3-30b-a3b": _QWEN3_30B_A3B,
    "google/gemma-2-9b": _GEMMA2_9B,
    "google/gemma-2-9b-it": _GEMMA2_9B,
    "google/gemma-3-1b-it": _GEMMA3_1B,
    "cohereforai/c4ai-command-r-v01": _COMMAND_R,
    "cohereforai/c4ai-command-r7b-12-2024": _COMMAND_R7B,
    "allenai/olmo-7b-hf": _OLMO_7B,
    "allenai/olmo-2-1124-7b": _OLMO2_7B,
    "ibm-granite/granite-3.0-8b-instruct": _GRANITE_8B,
    "ibm-granite/granite-3.0-3b-a800m-instruct": _GRANITE_MOE_3B,
    "bigcode/starcoder2-7b": _STARCODER2_7B,
    "bigcode/starcoder": _STARCODER,
    "bigcode/gpt_bigcode-santacoder": _SANTACODER,
    "stabilityai/stablelm-2-1_6b": _STABLELM2_16B,
    "microsoft/phi-2": _PHI2,
    "microsoft/phi-3.5-moe-instruct": _PHI35_MOE,
    "deepseek-ai/deepseek-v2-lite": _DEEPSEEK_V2_LITE,
    "deepseek-ai/deepseek-v3": _DEEPSEEK_V3,
    "deepseek-ai/deepseek-r1": _DEEPSEEK_V3,
    "tiiuae/falcon-40b": _FALCON_40B,
    "eleutherai/gpt-j-6b": _GPTJ_6B,
    "thudm/glm-4-9b-chat-hf": _GLM4_9B_HF,
    "thudm/glm-4-9b-0414": _GLM4_9B_0414,
    "internlm/internlm2-chat-7b": _INTERNLM2_7B,
}


def known_config(model_id: str) -> Mapping[str, Any] | None:
    """The published config of ``model_id`` (hub id, or a path ending in a known model name), if known."""
    key = model_id.strip().lower().rstrip("/")
    if key in CONFIGS:
        return CONFIGS[key]
    tail = key.rsplit("/", 1)[-1]
    matches = {id(v): v for k, v in CONFIGS.items() if k.rsplit("/", 1)[-1] == tail}
    return next(iter(matches.values())) if len(matches) == 1 else None

"""The analytic planner against transformers itself: parameter counts on the meta device, KV cache
bytes against the real ``past_key_values`` of a tiny forward pass, for every family transformers runs."""

from __future__ import annotations

from typing import Any

import pytest

from kubevram.planner.catalog import CONFIGS
from kubevram.planner.estimate import Workload, kv_bytes_per_token, kv_cache_bytes
from kubevram.planner.facts import facts_from_config
from kubevram.planner.modules import parameter_count

torch = pytest.importorskip("torch")

NATIVE = sorted({k for k, v in CONFIGS.items() if v["model_type"] != "chatglm" and k != "gpt2"})


@pytest.mark.parametrize("model_id", NATIVE)
def test_parameter_count_equals_meta_model(model_id: str, meta_model: Any) -> None:
    model = meta_model(CONFIGS[model_id])
    assert parameter_count(facts_from_config(CONFIGS[model_id])) == sum(p.numel() for p in model.parameters())


# Tiny configs of every family transformers runs natively, with the deviations that change the KV cache:
# GQA, explicit head_dim, sliding windows (all layers, some layers), multi-query and new-architecture Falcon.
TINY: dict[str, dict[str, Any]] = {
    "llama-gqa": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    ),
    "llama-bias": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
    ),
    "mistral-window": dict(
        model_type="mistral",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=128,
        sliding_window=6,
    ),
    "qwen2-some-window": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        sliding_window=5,
        use_sliding_window=True,
        max_window_layers=1,
    ),
    "gemma-head-dim": dict(
        model_type="gemma",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        vocab_size=128,
    ),
    "mixtral": dict(
        model_type="mixtral",
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "phi3-window": dict(
        model_type="phi3",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        sliding_window=7,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "gpt2": dict(
        model_type="gpt2",
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=128,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "gpt_neox": dict(
        model_type="gpt_neox",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
    ),
    "falcon-multi-query": dict(
        model_type="falcon",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        multi_query=True,
        parallel_attn=True,
        bias=False,
    ),
    "falcon-new-arch": dict(
        model_type="falcon",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        vocab_size=128,
        new_decoder_architecture=True,
        bias=True,
    ),
    "falcon-sequential": dict(
        model_type="falcon",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        multi_query=False,
        parallel_attn=False,
        bias=True,
    ),
}


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize(("tokens", "batch"), [(9, 1), (12, 3)])
def test_kv_formula_equals_real_past_key_values(name: str, tokens: int, batch: int, tiny_model: Any) -> None:
    config = TINY[name]
    model = tiny_model(config)
    facts = facts_from_config(config)
    assert parameter_count(facts) == sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, config["vocab_size"], (batch, tokens))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    real = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    workload = Workload(weights="float32", max_sequence_length=tokens, max_batch_size=batch)
    assert kv_cache_bytes(facts, workload) == real
    if not facts.sliding_window:
        assert kv_bytes_per_token(facts, workload) * tokens * batch == real


def test_chatglm_6b_kv_per_token_in_fp16() -> None:
    facts = facts_from_config(CONFIGS["thudm/chatglm-6b"])
    assert kv_bytes_per_token(facts, Workload(weights="float16")) == 458_752

"""The analytic decoder description against transformers itself, for every covered architecture.

Ground truth, per architecture (``TINY``: a scaled-down copy that keeps every structural key of a
published config):

* parameters and weight bytes (buffers at their real dtype) of the model built on the meta device in
  bfloat16, and per top-level module the sizes of transformers' own module tree, under the names a
  device map uses;
* the KV cache: the storages behind the cache tensors of a real CPU forward (batch 2), at its peak over
  a prefill of ``L - 1`` tokens and one decode step, at lengths below and above any sliding window.

Published configs (``kubevram.planner.catalog``, real dimensions) are built on the meta device and
checked for parameters and bytes at full scale. Remote-code architectures (ChatGLM, InternLM2) cannot be
built by transformers 5; they are checked against their published counts and layouts below.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubevram.planner.catalog import CONFIGS
from kubevram.planner.estimate import Workload, kv_bytes_per_token, kv_cache_bytes, weights_bytes
from kubevram.planner.facts import facts_from_config
from kubevram.planner.families import FAMILIES, canonical_config
from kubevram.planner.modules import Kind, model_modules, parameter_count

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_BASE = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 64,
}
_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_GPT = {"n_embd": 64, "n_layer": 3, "n_head": 4, "vocab_size": 128, "n_positions": 64, **_IDS}
WINDOW = 5
MOE = {"moe_intermediate_size": 32, "num_experts_per_tok": 2}

# A tiny copy of each architecture's published config, every structural key kept (GQA, explicit head
# dims, sliding layers, MLA ranks, dense and MoE layers, shared experts, q/k norms, biases, partial rotary).
TINY: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", **_BASE, "attention_bias": True, "mlp_bias": True},
    "llama-tied-head-dim": {"model_type": "llama", **_BASE, "head_dim": 24, "tie_word_embeddings": True},
    "mistral": {"model_type": "mistral", **_BASE, "sliding_window": WINDOW},
    "mixtral": {
        "model_type": "mixtral",
        **_BASE,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": None,
    },
    "qwen2": {
        "model_type": "qwen2",
        **_BASE,
        "sliding_window": WINDOW,
        "use_sliding_window": True,
        "max_window_layers": 1,
    },
    "qwen2_moe": {
        "model_type": "qwen2_moe",
        **_BASE,
        **MOE,
        "num_experts": 4,
        "shared_expert_intermediate_size": 48,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [2],
        "num_hidden_layers": 4,
        "sliding_window": WINDOW,
        "use_sliding_window": True,
        "max_window_layers": 3,
    },
    "qwen3": {"model_type": "qwen3", **_BASE, "head_dim": 32, "sliding_window": None},
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        **_BASE,
        **MOE,
        "num_experts": 4,
        "head_dim": 16,
        "mlp_only_layers": [0],
    },
    "gemma": {"model_type": "gemma", **_BASE, "head_dim": 16},
    "gemma2": {"model_type": "gemma2", **_BASE, "head_dim": 16, "sliding_window": WINDOW},
    "gemma3_text": {
        "model_type": "gemma3_text",
        **_BASE,
        "head_dim": 16,
        "sliding_window": WINDOW,
        "sliding_window_pattern": 2,
        "num_hidden_layers": 4,
    },
    "cohere": {"model_type": "cohere", **_BASE, "use_qk_norm": True, "attention_bias": True, **_IDS},
    "cohere2": {"model_type": "cohere2", **_BASE, "sliding_window": WINDOW, "num_hidden_layers": 4, **_IDS},
    "olmo": {"model_type": "olmo", **_BASE, **_IDS},
    "olmo2": {"model_type": "olmo2", **_BASE, **_IDS},
    "granite": {"model_type": "granite", **_BASE, "mlp_bias": True, "tie_word_embeddings": True},
    "granitemoe": {"model_type": "granitemoe", **_BASE, "num_local_experts": 4, "num_experts_per_tok": 2},
    "starcoder2": {"model_type": "starcoder2", **_BASE, "sliding_window": WINDOW, **_IDS},
    "gpt_bigcode": {"model_type": "gpt_bigcode", **_GPT, "n_inner": 96, "multi_query": True},
    "gpt_bigcode-mha": {"model_type": "gpt_bigcode", **_GPT, "multi_query": False},
    "stablelm": {
        "model_type": "stablelm",
        **_BASE,
        "use_qkv_bias": True,
        "qk_layernorm": True,
        "partial_rotary_factor": 0.25,
    },
    "stablelm-parallel": {"model_type": "stablelm", **_BASE, "use_parallel_residual": True},
    "phi": {"model_type": "phi", **_BASE, "qk_layernorm": True, "partial_rotary_factor": 0.5},
    "phi3": {"model_type": "phi3", **_BASE, "sliding_window": WINDOW, **_IDS},
    "phimoe": {
        "model_type": "phimoe",
        **_BASE,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": WINDOW,
        "attention_bias": True,
        "lm_head_bias": True,
    },
    "deepseek_v2": {
        "model_type": "deepseek_v2",
        **_BASE,
        **MOE,
        "num_key_value_heads": 4,
        "n_routed_experts": 4,
        "n_shared_experts": 2,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 16,
        "q_lora_rank": None,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 12,
        "mlp_bias": True,
    },
    "deepseek_v3": {
        "model_type": "deepseek_v3",
        **_BASE,
        **MOE,
        "num_key_value_heads": 4,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 2,
        "topk_group": 1,
        "kv_lora_rank": 16,
        "q_lora_rank": 24,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 12,
        "attention_bias": True,
    },
    "falcon-7b": {
        "model_type": "falcon",
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "vocab_size": 128,
        "multi_query": True,
        "parallel_attn": True,
        "bias": False,
    },
    "falcon-40b": {
        "model_type": "falcon",
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_kv_heads": 2,
        "vocab_size": 128,
        "new_decoder_architecture": True,
        "bias": True,
    },
    "falcon-sequential-alibi": {
        "model_type": "falcon",
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "vocab_size": 128,
        "multi_query": False,
        "parallel_attn": False,
        "bias": True,
        "alibi": True,
    },
    "gpt2": {"model_type": "gpt2", **_GPT},
    "gpt_neox": {"model_type": "gpt_neox", **_BASE, "rotary_pct": 0.5},
    "gptj": {"model_type": "gptj", **_GPT, "rotary_dim": 8},
    "glm": {"model_type": "glm", **_BASE, "head_dim": 16, **_IDS},
    "glm4": {"model_type": "glm4", **_BASE, "head_dim": 16, **_IDS},
}
NATIVE_FAMILIES = {f for f, fam in FAMILIES.items() if not fam.remote_code}
LENGTHS = [(4, "below the window"), (9, "above the window")]
BATCH = 2


def test_every_native_family_has_a_tiny_copy() -> None:
    assert {c["model_type"] for c in TINY.values()} == NATIVE_FAMILIES


def _build(config: dict[str, Any], *, meta: bool, dtype: Any = None) -> Any:
    cfg = canonical_config(config)
    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    hf_config = transformers.AutoConfig.for_model(cfg["model_type"], **kwargs)
    if meta:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    else:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    model.tie_weights()
    return model


def _bytes(model: Any) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def _module_bytes(model: Any, name: str) -> int:
    try:
        target = model.get_submodule(name)
        tensors = [*target.parameters(), *target.buffers()]
    except AttributeError:  # a tensor the model owns directly (GPTBigCode's causal mask)
        tensors = [model.get_buffer(name)]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("name", sorted(TINY))
def test_parameters_bytes_and_module_tree(name: str) -> None:
    config = TINY[name]
    facts = facts_from_config(config)
    model = _build(config, meta=True, dtype=torch.bfloat16)
    assert parameter_count(facts) == sum(p.numel() for p in model.parameters())
    modules = model_modules(facts)
    assert weights_bytes(modules, "bfloat16") == _bytes(model)
    for module in modules:
        expected = 0 if module.tied_to else _module_bytes(model, module.name)
        assert module.weight_bytes("bfloat16") == expected, module.name
    # every tensor under exactly one device-map key, keys in forward order
    keys = [m.name for m in modules]
    for tensor in [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]:
        assert sum(tensor == k or tensor.startswith(k + ".") for k in keys) == 1, tensor
    order = _forward_order(model)
    assert sorted(keys, key=order.index) == keys
    assert sum(m.kind is Kind.layer for m in modules) == facts.num_layers


def _forward_order(module: Any, prefix: str = "") -> list[str]:
    """Names in the order accelerate's device map visits them: a module, its children, its own buffers."""
    out = [prefix]
    for name, child in module.named_children():
        out += _forward_order(child, f"{prefix}.{name}" if prefix else name)
    out += [f"{prefix}.{name}" if prefix else name for name, _ in module.named_buffers(recurse=False)]
    return out


def _held(cache: Any) -> int:
    """Bytes of the storages behind every cached tensor (views over a larger tensor count in full)."""
    storages: dict[int, int] = {}
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if tensor is not None and tensor.numel():
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.fixture(scope="module")
def peaks() -> dict[tuple[str, int], int]:
    """Per architecture and length ``L``: the most KV bytes held over a prefill of ``L - 1`` tokens and
    one decode step, batch of 2 (one tiny model per architecture, built once)."""
    out: dict[tuple[str, int], int] = {}
    for name, config in TINY.items():
        model = _build(config, meta=False)
        for length, _ in LENGTHS:
            ids = torch.randint(3, config["vocab_size"], (BATCH, length))
            cache = transformers.DynamicCache(config=model.config)
            with torch.no_grad():
                model(ids[:, :-1], past_key_values=cache, use_cache=True)
                after_prefill = _held(cache)
                model(ids[:, -1:], past_key_values=cache, use_cache=True)
            out[(name, length)] = max(after_prefill, _held(cache))
    return out


@pytest.mark.parametrize("length", [n for n, _ in LENGTHS], ids=[w for _, w in LENGTHS])
@pytest.mark.parametrize("name", sorted(TINY))
def test_kv_cache_equals_what_a_real_forward_holds(
    name: str, length: int, peaks: dict[tuple[str, int], int]
) -> None:
    facts = facts_from_config(TINY[name])
    workload = Workload(weights="float32", max_sequence_length=length, max_batch_size=BATCH)
    assert kv_cache_bytes(facts, workload) == peaks[(name, length)]
    if not facts.sliding_window:
        assert kv_bytes_per_token(facts, workload) * length * BATCH == peaks[(name, length)]


# ---------------------------------------------------------------- published configs at full scale

NATIVE_PUBLISHED = sorted(
    k for k, v in CONFIGS.items() if not FAMILIES[canonical_config(v)["model_type"]].remote_code
)


@pytest.mark.parametrize("model_id", NATIVE_PUBLISHED)
def test_published_configs_equal_the_meta_model(model_id: str) -> None:
    config = CONFIGS[model_id]
    model = _build(config, meta=True, dtype=torch.bfloat16)
    facts = facts_from_config(config)
    assert parameter_count(facts) == sum(p.numel() for p in model.parameters())
    assert weights_bytes(model_modules(facts), "bfloat16") == _bytes(model)


@pytest.mark.parametrize(
    ("model_id", "per_token"),
    [
        ("deepseek-ai/DeepSeek-V3", 61 * (512 + 64) * 2),  # MLA latents: 70,272 B, not 1,998,848
        ("tiiuae/falcon-40b", 60 * 2 * 128 * 64 * 2),  # RefinedWeb: 8 KV heads broadcast to 128
        ("tiiuae/falcon-7b", 32 * 2 * 1 * 64 * 2),  # multi-query
        ("bigcode/starcoder", 40 * 2 * 1 * 128 * 2),
    ],
)
def test_published_kv_bytes_per_token(model_id: str, per_token: int) -> None:
    facts = facts_from_config(CONFIGS[model_id.lower()])
    assert kv_bytes_per_token(facts, Workload(weights="bfloat16")) == per_token


def test_gemma3_slides_five_layers_in_six() -> None:
    facts = facts_from_config(CONFIGS["google/gemma-3-1b-it"])
    full = [i for i, layer in enumerate(facts.layers) if layer.window is None]
    assert full == [5, 11, 17, 23] and {layer.window for layer in facts.layers} == {None, 512}


def test_falcon_40b_legacy_keys_equal_the_converted_config() -> None:
    """The RefinedWeb hub file and the falcon config transformers reads today describe one model."""
    legacy = facts_from_config(CONFIGS["tiiuae/falcon-40b"])
    converted = {
        "model_type": "falcon",
        "hidden_size": 8192,
        "num_attention_heads": 128,
        "num_kv_heads": 8,
        "num_hidden_layers": 60,
        "vocab_size": 65024,
        "new_decoder_architecture": True,
        "parallel_attn": True,
        "bias": False,
        "alibi": False,
    }
    model = _build(converted, meta=True, dtype=torch.bfloat16)
    assert parameter_count(legacy) == sum(p.numel() for p in model.parameters())


def test_internlm2_follows_its_published_modeling_file() -> None:
    """InternLM2 is remote code (``modeling_internlm2.py`` published with the checkpoint) that
    transformers 5 cannot build. Its layers are Llama's with q/k/v fused into ``attention.wqkv`` and
    an output head named ``output``; each attention keeps its own rotary buffers: a float32 inv_freq and
    cos/sin caches of max_position_embeddings x head_dim in the model dtype."""
    config = CONFIGS["internlm/internlm2-chat-7b"]
    facts = facts_from_config(config)
    llama = {**config, "model_type": "llama", "attention_bias": False}
    llama.pop("rope_scaling")
    model = _build(llama, meta=True, dtype=torch.bfloat16)
    assert parameter_count(facts) == sum(p.numel() for p in model.parameters()) == 7_737_708_544
    modules = model_modules(facts)
    assert [m.name for m in modules[:2]] == ["model.tok_embeddings", "model.layers.0"]
    assert modules[-1].name == "output"
    layer = modules[1]
    assert layer.buffer_bytes == 64 * 4 and layer.dtype_buffers == 2 * 32768 * 128
    assert facts.rope_scaling_factor == 2.0


# ---------------------------------------------------------------- per-forward tensors that scale with L^2

MASKED = ["llama", "qwen2", "gemma2", "deepseek_v3", "mistral", "falcon-7b", "gpt_bigcode"]


@pytest.mark.parametrize("name", MASKED)
def test_attention_masks_of_a_padded_prefill_equal_the_estimate(name: str) -> None:
    """The 4-D masks the decoder blocks receive in a left-padded prefill of 2 rows, measured in a real
    CPU forward, are what ``attention_mask_bytes`` budgets (one per attention kind; boolean, or the
    compute dtype under Gemma-2's eager attention)."""
    from kubevram.planner.estimate import attention_mask_bytes

    config = TINY[name]
    model = _build(config, meta=False)
    masks: dict[int, int] = {}

    def keep(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            masks[mask.data_ptr()] = mask.numel() * mask.element_size()

    blocks = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    for block in blocks:
        block.register_forward_pre_hook(keep, with_kwargs=True)
    width = 9
    ids = torch.randint(3, config["vocab_size"], (BATCH, width))
    attention = torch.ones((BATCH, width), dtype=torch.long)
    attention[1, :4] = 0  # the shorter row, left-padded as the worker pads it
    with torch.no_grad():
        model(
            ids,
            attention_mask=attention,
            position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,
        )
    workload = Workload(weights="float32", max_sequence_length=width, max_batch_size=BATCH)
    assert sum(masks.values()) == attention_mask_bytes(facts_from_config(config), workload) > 0

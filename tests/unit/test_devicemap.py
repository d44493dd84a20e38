"""Device maps and per-GPU budgets (``kubevram.planner.devicemap``) against transformers and accelerate.

Ground truth: meta-device models (module names and byte sizes, every parameter under exactly one
device-map key), accelerate's ``infer_auto_device_map`` (sequential layer boundaries on the same
budgets; our ``max_memory`` gives our map back), and a tiny random Llama that loads from disk with our
``device_map``/``max_memory`` (cpu and disk offload included) and generates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubevram.api.errors import SpecError
from kubevram.api.quantity import GiB, MiB
from kubevram.planner.catalog import known_config
from kubevram.planner.devicemap import (
    NoFit,
    ReplicaPlan,
    accelerate_max_memory,
    min_per_gpu_bytes,
    plan_replica,
)
from kubevram.planner.estimate import Workload, gpu_bytes_for, layer_kv_bytes
from kubevram.planner.facts import facts_from_config
from kubevram.planner.modules import model_modules

torch = pytest.importorskip("torch")
accelerate_modeling = pytest.importorskip("accelerate.utils.modeling")

_TINY = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
}
_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", **_TINY},
    "llama-tied": {"model_type": "llama", "tie_word_embeddings": True, **_TINY},
    "mistral": {"model_type": "mistral", "sliding_window": 16, **_TINY},
    "qwen2": {"model_type": "qwen2", **_TINY},
    "gemma": {"model_type": "gemma", "head_dim": 16, **_TINY},
    "mixtral": {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2, **_TINY},
    "phi3": {"model_type": "phi3", **_IDS, **_TINY},
    "gpt2": {
        "model_type": "gpt2", "n_embd": 64, "n_layer": 6, "n_head": 4, "vocab_size": 128, "n_positions": 256,
    },
    "gpt_neox": {
        "model_type": "gpt_neox", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6,
        "num_attention_heads": 4, "vocab_size": 128, "max_position_embeddings": 256,
    },
    "falcon": {
        "model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4,
        "vocab_size": 128, "new_decoder_architecture": False, "multi_query": True,
    },
    "falcon-new": {
        "model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4,
        "num_kv_heads": 2, "vocab_size": 128, "new_decoder_architecture": True,
    },
}
# Real dimensions, built on the meta device (no memory): the names and sizes at full scale.
REAL = ["meta-llama/Meta-Llama-3-8B", "google/gemma-7b", "Qwen/Qwen2-0.5B", "openai-community/gpt2"]

SERVING = Workload(weights="float32", max_sequence_length=64, max_batch_size=2, overhead_per_gpu=8 * 1024)
# Weights only: no KV, no activations, no overhead; what accelerate budgets.
WEIGHTS_ONLY = Workload(weights="float32", max_sequence_length=0, max_batch_size=0, overhead_per_gpu=0,
                        fragmentation=0.0)


@pytest.fixture(scope="module")
def metas(meta_model: Any) -> dict[str, Any]:
    return {name: meta_model(cfg) for name, cfg in FAMILIES.items()}


def _expand(acc_map: Mapping[str, Any], keys: list[str]) -> dict[str, Any]:
    """accelerate's map (possibly on parent modules) on our top-level keys."""
    out = {}
    for key in keys:
        owners = [k for k in acc_map if k == "" or key == k or key.startswith(k + ".")]
        assert owners, f"{key} not in accelerate's map {acc_map}"
        out[key] = acc_map[max(owners, key=len)]
    return out


def _tensor_names(model: Any) -> list[str]:
    return [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]


def _weights_per_device(facts: Any, plan: ReplicaPlan, precision: str) -> dict[str, int]:
    sizes = {m.name: m.weight_bytes(precision) for m in model_modules(facts)}
    out: dict[str, int] = {}
    for name, dev in plan.device_map.items():
        out[str(dev)] = out.get(str(dev), 0) + sizes[name]
    return out


# ---------------------------------------------------------------- names and sizes vs meta models


@pytest.mark.parametrize("family", list(FAMILIES))
def test_module_names_and_sizes_equal_meta_model(family: str, metas: dict[str, Any]) -> None:
    model = metas[family]
    facts = facts_from_config(FAMILIES[family])
    sizes = accelerate_modeling.compute_module_sizes(model, dtype=torch.float32)
    for module in model_modules(facts):
        # a tied head's weight is counted once, under the embedding (accelerate: no entry at all)
        assert module.weight_bytes("float32") == sizes.get(module.name, 0), module.name
    plan = plan_replica(facts, SERVING, [1 * GiB])
    assert isinstance(plan, ReplicaPlan)
    keys = list(plan.device_map)
    for tensor in _tensor_names(model):
        owners = [k for k in keys if tensor.startswith(k + ".")]
        assert len(owners) == 1, (tensor, owners)
    # the top-level order is forward order: children of the model, in named_children order
    flat = [n for n, _ in model.named_modules() if n in plan.device_map]
    assert flat == keys


@pytest.mark.parametrize("model_id", REAL)
def test_real_dimensions_on_meta_device(model_id: str, meta_model: Any) -> None:
    config = dict(known_config(model_id) or {})
    model = meta_model(config)
    facts = facts_from_config(config)
    sizes = accelerate_modeling.compute_module_sizes(model, dtype=torch.bfloat16)
    for module in model_modules(facts):
        if module.buffer_bytes:  # accelerate sizes the float32 rotary buffers at the load dtype
            continue
        assert module.weight_bytes("bfloat16") == sizes.get(module.name, 0), module.name
    plan = plan_replica(facts, Workload(max_sequence_length=4096, max_batch_size=4), [24 * GiB] * 4)
    assert isinstance(plan, ReplicaPlan)
    for tensor in _tensor_names(model):
        assert sum(tensor.startswith(k + ".") for k in plan.device_map) == 1, tensor


def test_chatglm_6b_names_equal_the_published_device_map() -> None:
    """ChatGLM is remote code: its names are those of seed 001's published device_map for ChatGLM-6B."""
    published = (
        ["transformer.word_embeddings"]
        + [f"transformer.layers.{i}" for i in range(28)]
        + ["transformer.final_layernorm", "lm_head"]
    )
    facts = facts_from_config(dict(known_config("THUDM/chatglm-6b") or {}))
    plan = plan_replica(facts, Workload(weights="float16", max_sequence_length=2048), [80 * GiB])
    assert isinstance(plan, ReplicaPlan)
    assert list(plan.device_map) == published
    # the tied lm_head lives with the word embeddings, and so does the logits workspace
    assert plan.device_map["lm_head"] == plan.device_map["transformer.word_embeddings"]
    # ChatGLM2: transformer.embedding ... transformer.output_layer (untied)
    facts2 = facts_from_config(dict(known_config("THUDM/chatglm2-6b") or {}))
    plan2 = plan_replica(facts2, Workload(weights="float16"), [80 * GiB])
    assert isinstance(plan2, ReplicaPlan)
    assert list(plan2.device_map)[:2] == ["transformer.embedding", "transformer.rotary_pos_emb"]
    assert list(plan2.device_map)[-2:] == ["transformer.encoder.final_layernorm", "transformer.output_layer"]


# ---------------------------------------------------------------- partition invariants


@pytest.mark.parametrize("strategy", ["sequential", "balanced", "balanced_low_0"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_partition_invariants(family: str, strategy: str) -> None:
    facts = facts_from_config(FAMILIES[family])
    three = min_per_gpu_bytes(facts, SERVING, 3)
    gpus = [three, three * 6 // 5, three * 21 // 20, three // 2]
    plan = plan_replica(facts, SERVING, gpus, strategy=strategy)
    assert isinstance(plan, ReplicaPlan), plan
    assert len(plan.gpu_indices) == 3
    weights = _weights_per_device(facts, plan, "float32")
    modules = {m.name: m for m in model_modules(facts)}
    for g, part in enumerate(plan.per_gpu):
        free = gpus[plan.gpu_indices[g]]
        assert part["total"] <= free
        assert weights.get(str(g), 0) <= plan.max_memory[str(g)]
        assert part["weights"] == weights.get(str(g), 0)
        on_gpu = [modules[n] for n, d in plan.device_map.items() if d == g]
        kv = sum(layer_kv_bytes(facts, m.layer, SERVING) for m in on_gpu if m.layer is not None)
        assert part["kvCache"] == kv
        assert part["weights"] + part["kvCache"] <= free
        head = any(m.kind == "head" for m in on_gpu)
        assert part == gpu_bytes_for(facts, on_gpu, SERVING, with_head=head)
    # decoder blocks stay in forward order over the GPUs
    devices = [d for n, d in plan.device_map.items() if modules[n].layer is not None]
    assert devices == sorted(devices)


# ---------------------------------------------------------------- accelerate


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sequential_boundaries_equal_accelerate_on_same_budgets(family: str, metas: dict[str, Any]) -> None:
    """Weights only (no KV, activations or overhead): the budgets accelerate knows. accelerate keeps
    room for the largest remaining layer on GPU 0, so GPU 0's budget for us is that much smaller."""
    model = metas[family]
    facts = facts_from_config(FAMILIES[family])
    mods = model_modules(facts)
    layer = max(m.weight_bytes("float32") for m in mods if m.layer is not None)
    total = sum(m.weight_bytes("float32") for m in mods)
    budgets = {0: total // 3 + layer, 1: total // 3, 2: total // 4, 3: total}
    acc = accelerate_modeling.infer_auto_device_map(
        model, max_memory=dict(budgets), no_split_module_classes=model._no_split_modules, dtype=torch.float32
    )
    reserve = max(m.weight_bytes("float32") for m in mods[1:])  # largest layer after the embedding
    ours = plan_replica(
        facts, WEIGHTS_ONLY, [budgets[0] - reserve, budgets[1], budgets[2], budgets[3]],
        strategy="sequential", gpu_count=4,
    )
    assert isinstance(ours, ReplicaPlan)
    assert _expand(acc, list(ours.device_map)) == ours.device_map
    assert len(set(ours.device_map.values())) >= 3  # a real split, not everything on one GPU


@pytest.mark.parametrize("strategy", ["sequential", "balanced", "balanced_low_0"])
@pytest.mark.parametrize("family", ["llama", "llama-tied", "gemma", "gpt2", "mixtral", "falcon"])
def test_our_max_memory_gives_accelerate_our_map(family: str, strategy: str, metas: dict[str, Any]) -> None:
    model = metas[family]
    facts = facts_from_config(FAMILIES[family])
    three = min_per_gpu_bytes(facts, SERVING, 3)
    plan = plan_replica(facts, SERVING, [three * 21 // 20] * 4, strategy=strategy, gpu_count=3)
    assert isinstance(plan, ReplicaPlan)
    acc = accelerate_modeling.infer_auto_device_map(
        model,
        max_memory=accelerate_max_memory(plan.max_memory),
        no_split_module_classes=model._no_split_modules,
        dtype=torch.float32,
    )
    assert _expand(acc, list(plan.device_map)) == plan.device_map


@pytest.mark.parametrize("gpus", [1, 2])
@pytest.mark.parametrize("family", ["llama", "llama-tied", "mistral", "mixtral", "gpt2", "falcon"])
def test_offloaded_max_memory_gives_accelerate_our_map(family: str, gpus: int, metas: dict[str, Any]) -> None:
    """With cpu and disk entries too: accelerate keeps room for the largest layer on the cpu as well."""
    model = metas[family]
    facts = facts_from_config(FAMILIES[family])
    one = min_per_gpu_bytes(facts, SERVING, 1)
    layer = max(m.weight_bytes("float32") for m in model_modules(facts))
    free = [one * 3 // 4, one // 3][:gpus]
    plan = plan_replica(facts, SERVING, free, offload="disk", cpu_bytes=3 * layer + 1024, offload_folder="/o")
    assert isinstance(plan, ReplicaPlan), plan
    assert "cpu" in plan.device_map.values()
    assert plan.offload_folder == ("/o" if "disk" in plan.device_map.values() else None)
    assert plan.device_map[next(iter(plan.device_map))] == 0  # the main GPU holds the first module
    acc = accelerate_modeling.infer_auto_device_map(
        model,
        max_memory=accelerate_max_memory(plan.max_memory),
        no_split_module_classes=model._no_split_modules,
        dtype=torch.float32,
    )
    assert _expand(acc, list(plan.device_map)) == plan.device_map
    assert all(part["total"] <= f for part, f in zip(plan.per_gpu, free, strict=True))


def test_accelerate_map_runs_out_of_memory_with_the_kv_cache_where_ours_does_not(meta_model: Any) -> None:
    """Llama-3-8B, 2 x 16 GiB free, 8192 tokens x 4 rows (4 GiB of KV cache). accelerate's sequential map
    fills GPU 0 with weights up to its budget; the KV cache of those layers lands on top and GPU 0 runs
    out of memory. kubevram puts fewer layers on GPU 0 and every GPU holds what it will really hold."""
    config = dict(known_config("meta-llama/Meta-Llama-3-8B") or {})
    facts = facts_from_config(config)
    workload = Workload(weights="bfloat16", max_sequence_length=8192, max_batch_size=4)
    free = [16 * GiB, 16 * GiB]
    model = meta_model(config)
    acc = accelerate_modeling.infer_auto_device_map(
        model, max_memory={0: free[0], 1: free[1]}, no_split_module_classes=model._no_split_modules,
        dtype=torch.bfloat16,
    )
    ours = plan_replica(facts, workload, free, strategy="sequential")
    assert isinstance(ours, ReplicaPlan)
    mods = model_modules(facts)
    acc_map = _expand(acc, [m.name for m in mods])
    for g in (0, 1):
        held = [m for m in mods if acc_map[m.name] == g]
        needs = gpu_bytes_for(facts, held, workload, with_head=any(m.kind == "head" for m in held))
        if g == 0:
            assert needs["weights"] + needs["kvCache"] > free[0], "accelerate's GPU 0 must overflow"
        assert ours.per_gpu[g]["total"] <= free[g]
    acc_layers_0 = sum(1 for m in mods if m.layer is not None and acc_map[m.name] == 0)
    our_layers_0 = sum(1 for m in mods if m.layer is not None and ours.device_map[m.name] == 0)
    assert our_layers_0 < acc_layers_0


# ---------------------------------------------------------------- strategies


LLAMA70B = facts_from_config(dict(known_config("meta-llama/Meta-Llama-3-70B") or {}))
W70 = Workload(weights="bfloat16", max_sequence_length=4096, max_batch_size=4)


def _totals(plan: ReplicaPlan | NoFit) -> list[int]:
    assert isinstance(plan, ReplicaPlan), plan
    return [g["total"] for g in plan.per_gpu]


def test_balanced_is_even_and_sequential_fills_in_order() -> None:
    balanced = _totals(plan_replica(LLAMA70B, W70, [80 * GiB] * 8, strategy="balanced", gpu_count=8))
    assert max(balanced) - min(balanced) < 2.5 * GiB  # about one decoder block (1.6 GiB) plus KV
    sequential = _totals(plan_replica(LLAMA70B, W70, [80 * GiB] * 8, strategy="sequential", gpu_count=8))
    assert sequential[0] > 75 * GiB and sequential[2] < 2 * GiB  # two GPUs full, the others idle
    assert max(balanced) < max(sequential)


def test_balanced_low_0_keeps_gpu_0_lighter() -> None:
    low0 = plan_replica(LLAMA70B, W70, [80 * GiB] * 8, strategy="balanced_low_0", gpu_count=8)
    totals = _totals(low0)
    assert totals[0] < min(totals[1:])
    assert isinstance(low0, ReplicaPlan)
    assert low0.device_map["model.embed_tokens"] == 0 and low0.device_map["model.layers.0"] == 1
    # when GPUs 1.. cannot hold the rest, GPU 0 takes what it must, still lighter than the rest
    two = _totals(plan_replica(LLAMA70B, W70, [80 * GiB] * 2, strategy="balanced_low_0"))
    assert two[0] < two[1] <= 80 * GiB


def test_uneven_gpus_are_loaded_in_proportion() -> None:
    free = [80 * GiB, 40 * GiB, 80 * GiB, 40 * GiB]
    plan = plan_replica(LLAMA70B, W70, free, strategy="balanced", gpu_count=4)
    totals = _totals(plan)
    fractions = [t / f for t, f in zip(totals, free, strict=True)]
    assert max(fractions) - min(fractions) < 0.08
    assert all(t <= f for t, f in zip(totals, free, strict=True))


def test_fewest_gpus_and_a_better_subset_than_the_prefix() -> None:
    plan = plan_replica(LLAMA70B, W70, [80 * GiB] * 8)
    assert isinstance(plan, ReplicaPlan) and plan.gpu_indices == (0, 1)
    assert set(plan.max_memory) == {"0", "1"}
    # GPU 0 is nearly full: the two largest GPUs, in list order
    skewed = plan_replica(LLAMA70B, W70, [10 * GiB, 80 * GiB, 80 * GiB, 40 * GiB])
    assert isinstance(skewed, ReplicaPlan) and skewed.gpu_indices == (1, 2)
    need2 = min_per_gpu_bytes(LLAMA70B, W70, 2)
    assert isinstance(plan_replica(LLAMA70B, W70, [need2, need2], strategy="sequential"), ReplicaPlan)
    assert isinstance(plan_replica(LLAMA70B, W70, [need2, need2], strategy="balanced"), ReplicaPlan)
    assert isinstance(plan_replica(LLAMA70B, W70, [need2 - 1, need2 - 1]), NoFit)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_min_per_gpu_bytes_is_tight_for_every_strategy(family: str) -> None:
    """Placement asks for ``min_per_gpu_bytes`` on each of n GPUs: every strategy fits there, and not
    with a byte less."""
    facts = facts_from_config(FAMILIES[family])
    for n in (1, 2, 3, 5):
        need = min_per_gpu_bytes(facts, SERVING, n)
        for strategy in ("sequential", "balanced", "balanced_low_0"):
            fits = plan_replica(facts, SERVING, [need] * n, strategy=strategy, gpu_count=n)
            assert isinstance(fits, ReplicaPlan)
            short = plan_replica(facts, SERVING, [need - 1] * n, strategy=strategy, gpu_count=n)
            assert isinstance(short, NoFit)


def test_min_per_gpu_bytes_decreases_with_more_gpus() -> None:
    needed = [min_per_gpu_bytes(LLAMA70B, W70, n) for n in range(1, 9)]
    assert needed == sorted(needed, reverse=True)
    # one GPU: everything on it
    facts = LLAMA70B
    everything = gpu_bytes_for(facts, model_modules(facts), W70, with_head=True)["total"]
    assert needed[0] == everything


@settings(max_examples=150, deadline=None)
@given(
    family=st.sampled_from(["llama", "llama-tied", "mistral", "mixtral", "gpt2", "falcon"]),
    fractions=st.lists(st.floats(0.05, 1.2), min_size=1, max_size=6),
    strategy=st.sampled_from(["sequential", "balanced", "balanced_low_0"]),
    gpu_count=st.integers(0, 6),
)
def test_any_gpus_give_a_valid_plan_exactly_when_a_sequential_fill_fits(
    family: str, fractions: list[float], strategy: str, gpu_count: int
) -> None:
    facts = facts_from_config(FAMILIES[family])
    one = min_per_gpu_bytes(facts, SERVING, 1)
    free = [int(one * f) for f in fractions]
    plan = plan_replica(facts, SERVING, free, strategy=strategy, gpu_count=gpu_count)
    sequential = plan_replica(facts, SERVING, free, strategy="sequential", gpu_count=gpu_count)
    assert isinstance(plan, ReplicaPlan) == isinstance(sequential, ReplicaPlan)
    if isinstance(plan, NoFit):
        assert plan.needed_per_gpu[1] == one
        return
    modules = model_modules(facts)
    assert list(plan.device_map) == [m.name for m in modules]
    assert gpu_count == 0 or len(plan.gpu_indices) == gpu_count
    assert len(set(plan.gpu_indices)) == len(plan.gpu_indices)
    order = [plan.device_map[m.name] for m in modules if m.tied_to is None]
    assert order == sorted(order)  # contiguous runs in forward order
    weights = _weights_per_device(facts, plan, "float32")
    for g, part in enumerate(plan.per_gpu):
        assert part["total"] <= free[plan.gpu_indices[g]]
        assert weights.get(str(g), 0) <= plan.max_memory[str(g)]
    assert "cpu" not in plan.max_memory  # offload: none
    if gpu_count == 0:  # the fewest GPUs: one GPU fewer does not fit (prefix nor largest)
        n = len(plan.gpu_indices)
        assert n == 1 or min_per_gpu_bytes(facts, SERVING, n - 1) > sorted(free)[-(n - 1)] or isinstance(
            plan_replica(facts, SERVING, free, strategy="sequential", gpu_count=n - 1), NoFit
        )


# ---------------------------------------------------------------- offload


@settings(max_examples=100, deadline=None)
@given(
    family=st.sampled_from(["llama", "llama-tied", "mistral", "gpt2", "falcon"]),
    fractions=st.lists(st.floats(0.05, 1.2), min_size=1, max_size=4),
    strategy=st.sampled_from(["sequential", "balanced", "balanced_low_0"]),
    offload=st.sampled_from(["cpu", "disk"]),
    cpu_layers=st.floats(0, 8),
)
def test_offload_plans_keep_every_budget(
    family: str, fractions: list[float], strategy: str, offload: str, cpu_layers: float
) -> None:
    facts = facts_from_config(FAMILIES[family])
    one = min_per_gpu_bytes(facts, SERVING, 1)
    layer = max(m.weight_bytes("float32") for m in model_modules(facts) if m.layer is not None)
    free = [int(one * f) for f in fractions]
    cpu_bytes = int(layer * cpu_layers)
    plan = plan_replica(facts, SERVING, free, strategy=strategy, offload=offload, cpu_bytes=cpu_bytes)
    gpu_only = plan_replica(facts, SERVING, free, strategy=strategy)
    if isinstance(gpu_only, ReplicaPlan):
        assert plan == gpu_only  # offload only when the GPUs do not suffice
        return
    if isinstance(plan, NoFit):
        assert "offload" in plan.reason
        return
    devices = set(plan.device_map.values())
    assert "cpu" in devices or "disk" in devices
    assert offload == "disk" or "disk" not in devices
    assert plan.device_map[next(iter(plan.device_map))] == 0  # the main GPU holds the first module
    rank = {"cpu": 1000, "disk": 1001}
    order = [rank.get(str(d), d) for m, d in zip(model_modules(facts), plan.device_map.values(), strict=True)
             if m.tied_to is None]
    assert order == sorted(order)  # GPUs in forward order, then cpu, then disk
    weights = _weights_per_device(facts, plan, "float32")
    assert weights.get("cpu", 0) <= plan.max_memory.get("cpu", 0) <= max(cpu_bytes, weights.get("cpu", 0))
    assert weights.get("cpu", 0) <= cpu_bytes
    for g, part in enumerate(plan.per_gpu):
        assert part["total"] <= free[plan.gpu_indices[g]]
    modules = model_modules(facts)
    kv_all = sum(layer_kv_bytes(facts, m.layer, SERVING) for m in modules if m.layer is not None)
    kv_gpus = sum(part["kvCache"] for part in plan.per_gpu)
    assert kv_gpus == kv_all  # every layer's KV cache is on a GPU: offloaded layers' on GPU 0


def test_offload_only_when_allowed_and_within_node_memory() -> None:
    free = [40 * GiB]
    assert isinstance(plan_replica(LLAMA70B, W70, free, cpu_bytes=512 * GiB), NoFit)  # offload: none
    cpu = plan_replica(LLAMA70B, W70, free, offload="cpu", cpu_bytes=512 * GiB)
    assert isinstance(cpu, ReplicaPlan)
    assert "cpu" in cpu.max_memory and "disk" not in cpu.max_memory and cpu.offload_folder is None
    assert cpu.device_map["model.layers.0"] == 0 and cpu.device_map["lm_head"] == "cpu"
    # GPU 0 executes the offloaded layers: it holds their KV cache and the streamed block
    gpu0 = cpu.per_gpu[0]
    assert gpu0["kvCache"] == sum(layer_kv_bytes(LLAMA70B, i, W70) for i in range(LLAMA70B.num_layers))
    assert gpu0["offloadBuffer"] > 0 and gpu0["total"] <= free[0]
    mods = model_modules(LLAMA70B)
    on_gpu = [x for x in mods if cpu.device_map[x.name] == 0]
    offloaded = [x for x in mods if cpu.device_map[x.name] == "cpu"]
    largest = max(x.weight_bytes("bfloat16") for x in offloaded)
    assert gpu0["offloadBuffer"] == largest + sum(x.buffer_bytes for x in offloaded)  # buffers stay on GPU 0
    offloaded_layers = [x for x in offloaded if x.layer is not None]
    expected = gpu_bytes_for(LLAMA70B, on_gpu + offloaded_layers, W70, with_head=True)
    for key in ("kvCache", "activations", "overhead", "fragmentation"):
        assert gpu0[key] == expected[key], key
    assert gpu0["weights"] == sum(x.weight_bytes("bfloat16") for x in on_gpu)
    streamed_out = sum(x.weight_bytes("bfloat16") for x in offloaded_layers)
    assert gpu0["total"] == expected["total"] - streamed_out + gpu0["offloadBuffer"]
    weights = _weights_per_device(LLAMA70B, cpu, "bfloat16")
    assert weights["cpu"] <= cpu.max_memory["cpu"] <= 512 * GiB
    # not enough node memory for cpu offload alone; disk takes the rest
    assert isinstance(plan_replica(LLAMA70B, W70, free, offload="cpu", cpu_bytes=20 * GiB), NoFit)
    disk = plan_replica(LLAMA70B, W70, free, offload="disk", cpu_bytes=20 * GiB, offload_folder="/offload")
    assert isinstance(disk, ReplicaPlan)
    assert disk.offload_folder == "/offload" and disk.device_map["lm_head"] == "disk"
    assert disk.max_memory["cpu"] <= 20 * GiB
    small_disk = plan_replica(LLAMA70B, W70, free, offload="disk", cpu_bytes=20 * GiB, disk_bytes=GiB)
    assert isinstance(small_disk, NoFit)
    # offload is not used when the GPUs suffice
    assert "cpu" not in plan_replica(LLAMA70B, W70, [80 * GiB] * 2, offload="disk").to_json()["maxMemory"]


# ---------------------------------------------------------------- no fit


def test_no_fit_says_why_with_numbers() -> None:
    answer = plan_replica(LLAMA70B, W70, [40 * GiB])
    assert isinstance(answer, NoFit)
    assert "GiB" in answer.reason and "1 x up to 40.0 GiB" in answer.reason
    assert answer.needed_per_gpu[1] > answer.needed_per_gpu[2] > answer.needed_per_gpu[8]
    assert answer.needed_per_gpu[4] == min_per_gpu_bytes(LLAMA70B, W70, 4)
    assert any("offload" in s for s in answer.suggestions)
    assert any("4 GPUs" in s for s in answer.suggestions)  # 4 x 40 GiB would fit
    out = answer.to_json()
    assert set(out) == {"reason", "neededPerGpu", "suggestions"} and "4" in out["neededPerGpu"]
    too_many = plan_replica(LLAMA70B, W70, [80 * GiB] * 2, gpu_count=4)
    assert isinstance(too_many, NoFit) and "gpusPerReplica: 4" in too_many.reason


def test_bad_strategy_names_the_field() -> None:
    with pytest.raises(SpecError, match=r"spec\.placement\.strategy: 'auto' is not one of"):
        plan_replica(LLAMA70B, W70, [80 * GiB], strategy="auto")
    with pytest.raises(SpecError, match=r"spec\.placement\.offload"):
        plan_replica(LLAMA70B, W70, [80 * GiB], offload="nvme")


def test_to_json_is_the_plan_json() -> None:
    plan = plan_replica(LLAMA70B, W70, [80 * GiB] * 2)
    assert isinstance(plan, ReplicaPlan)
    out = plan.to_json()
    assert set(out) == {"maxMemory", "deviceMap", "perGpu", "offloadFolder"}
    assert all(isinstance(k, str) and isinstance(v, int) for k, v in out["maxMemory"].items())
    assert set(out["deviceMap"].values()) == {0, 1}
    assert accelerate_max_memory(out["maxMemory"]) == {0: out["maxMemory"]["0"], 1: out["maxMemory"]["1"]}


# ---------------------------------------------------------------- a real load


def test_tiny_llama_loads_and_generates_with_our_map_and_offload(tmp_path: Any, tiny_model: Any) -> None:
    """CPU only here: GPU entries of the map are loaded on "cpu" (a GPU index needs CUDA); the "cpu"
    and "disk" entries, the budgets and the offload folder are used as planned."""
    transformers = pytest.importorskip("transformers")
    config = {**FAMILIES["llama"], "num_hidden_layers": 8}
    tiny_model(config).save_pretrained(tmp_path / "model")
    facts = facts_from_config(config)
    one = min_per_gpu_bytes(facts, SERVING, 1)
    layer = max(m.weight_bytes("float32") for m in model_modules(facts))
    plan = plan_replica(
        facts, SERVING, [one // 2], offload="disk", cpu_bytes=3 * layer + 1024,
        offload_folder=str(tmp_path / "offload"),
    )
    assert isinstance(plan, ReplicaPlan), plan
    assert {0, "cpu", "disk"} <= set(plan.device_map.values())
    device_map = {k: "cpu" if isinstance(v, int) else v for k, v in plan.device_map.items()}
    budgets = accelerate_max_memory(plan.max_memory)
    max_memory = {"cpu": sum(v for k, v in budgets.items() if k != "disk") + 64 * MiB}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=device_map, max_memory=max_memory, offload_folder=plan.offload_folder,
        dtype=torch.float32,
    )
    assert model.hf_device_map == device_map
    # disk-offloaded modules stay on the meta device, brought in by accelerate's hooks at each forward
    # (without CUDA the main device is the cpu, so "cpu" entries are plainly loaded there); safetensors
    # weights offloaded to disk are read in place, so the folder is created but may stay empty
    for name, device in device_map.items():
        params = list(model.get_submodule(name).parameters())
        assert all((p.device.type == "meta") == (device == "disk") for p in params), name
    assert (tmp_path / "offload").is_dir()
    prompt = torch.tensor([[1, 5, 9, 3]])
    out = model.generate(prompt, max_new_tokens=4, do_sample=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    assert torch.equal(out, reference.generate(prompt, max_new_tokens=4, do_sample=False))
    assert out.shape == (1, 8)

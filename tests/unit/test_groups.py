"""One replica over a group of pods (``kubevram.planner.groups`` and its placement): layouts, per-rank
budgets against hand-computed figures and against transformers' own tensor-parallel plan, how the ranks
add up to the estimate, ``spec.placement.multiNode``, the nodes chosen together, the autoscaler signal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from gpu_nodes import A100_80, H100_80, L4, MiB, deployment, gfd_node

from kubevram.cli import main
from kubevram.planner.catalog import known_config
from kubevram.planner.estimate import Workload, estimate
from kubevram.planner.facts import facts_from_config
from kubevram.planner.families import FAMILIES, canonical_config
from kubevram.planner.groups import chunk, layout_for, module_share_bytes, plan_group
from kubevram.planner.modules import model_modules
from kubevram.planner.placement import plan_cluster

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "llama-3.1-405b-multi-node.yaml"
TWO_H100_NODES = ROOT / "tests" / "data" / "h100-2x8-nodes.yaml"
H100_BYTES = 81559 * MiB
L405 = "meta-llama/Llama-3.1-405B-Instruct"


def _plan_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["plan", *args, "-o", "json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert isinstance(result, dict)
    return result


# ------------------------------------------------------------------------------ the done-when


def test_405b_on_two_h100_nodes_is_one_replica_whose_ranks_sum_to_the_estimate(
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = _plan_json(capsys, "-f", str(EXAMPLE), "--cluster", str(TWO_H100_NODES))
    est = result["estimate"]
    (replica,) = result["replicas"]
    assert result["unscheduled"]["count"] == 0
    group = replica["group"]
    shape = (group["size"], group["gpusPerPod"], group["tensorParallel"], group["pipelineParallel"])
    assert shape == (2, 8, 8, 2)
    assert [(p["node"], p["gpus"]) for p in group["pods"]] == [
        ("gpu-h100-0", list(range(8))), ("gpu-h100-1", list(range(8)))
    ]
    # The leader (pod 0) is the replica's node; every pod reserves its 8 GPUs whole.
    assert (replica["node"], replica["gpus"]) == ("gpu-h100-0", list(range(8)))
    for pod in group["pods"]:
        assert pod["reservation"] == {str(i): H100_BYTES for i in range(8)}
    ranks = group["ranks"]
    assert [(r["rank"], r["pod"], r["gpu"], r["stage"], r["tpRank"]) for r in ranks] == [
        (i, i // 8, i % 8, i // 8, i % 8) for i in range(16)
    ]
    # Stages: contiguous layers, the embeddings on the first, the norm and the head on the last.
    assert [s["layers"] for s in group["stages"]] == [[0, 63], [63, 126]]
    assert [s["ends"] for s in group["stages"]] == [["model.embed_tokens"], ["model.norm", "lm_head"]]
    # How the ranks add up (docs/estimate.md): every weight byte on exactly one rank but the copies of
    # what several ranks hold whole. Llama-3.1-405B: two RMSNorm weights of 16384 per layer and the final
    # norm, bfloat16, on all 8 tensor ranks (7 copies too many); inv_freq and original_inv_freq, 64
    # float32 each, on all 16 ranks (15 too many).
    replicated = 7 * (126 * 2 * 16384 * 2 + 16384 * 2) + 15 * (2 * 64 * 4)
    totals = group["totals"]
    assert totals["replicatedWeights"] == replicated
    assert sum(r["weights"] for r in ranks) == est["weightsBytes"] + replicated == totals["weights"]
    assert sum(r["kvCache"] for r in ranks) == est["kvCacheBytes"] == totals["kvCache"]
    for r in ranks:
        assert r["overhead"] == est["overheadBytesPerGPU"]
        assert r["total"] == sum(r[k] for k in (
            "weights", "kvCache", "activations", "communication", "overhead", "fragmentation"))
        assert r["total"] <= H100_BYTES
    assert replica["perGpu"] == [{k: v for k, v in r.items() if k not in ("rank", "pod", "gpu", "stage",
                                                                           "tpRank")} for r in ranks[:8]]


def test_a_rank_holds_its_hand_computed_share() -> None:
    """Rank 0 of Llama-3.1-405B on 2 x 8 GPUs: a 1/8 share of the embedding and of each of layers 0-62,
    their norms whole, 1/8 of their KV heads, at 4096 tokens x 1 sequence in bfloat16."""
    facts = facts_from_config(dict(known_config(L405) or {}))
    plan = plan_group(facts, Workload(), H100_BYTES, 2, 8)
    assert plan is not None
    h, inter, vocab = 16384, 53248, 128256
    q, kv = 128 * 128, 8 * 128
    layer = (2 * q * h + 2 * kv * h + 3 * inter * h) // 8 * 2 + 2 * h * 2
    embedding = vocab // 8 * h * 2
    rotary = 2 * 64 * 4
    budget = plan.ranks[0].budget
    assert budget["weights"] == embedding + 63 * layer + rotary
    # K and V, 1 of the 8 KV heads of 128 values, 4096 tokens, 63 layers, 2 bytes
    assert budget["kvCache"] == 2 * 1 * 128 * 4096 * 63 * 2
    head = plan.ranks[8].budget
    assert head["weights"] == 63 * layer + h * 2 + rotary + vocab // 8 * h * 2


# ------------------------------------------------------------------ ground truth: transformers


def _tp_families() -> list[str]:
    from test_exactness import TINY

    return sorted(n for n, c in TINY.items() if FAMILIES[canonical_config(c)["model_type"]].tensor_parallel)


@pytest.mark.parametrize("name", _tp_families())
def test_tensor_parallel_shares_are_what_transformers_tp_plan_cuts(name: str) -> None:
    """Per top-level module and tensor rank, the bytes DTensor's ``Shard`` gives each rank under the
    model's own ``tp_plan`` (colwise: output features, weight and bias; rowwise: input features, the bias
    whole; embedding_rowwise: the vocabulary; unlisted: whole), for 2 and 3 ranks (uneven chunks)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_exactness import TINY, _build
    from torch.distributed.tensor.placement_types import Shard
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES
    from transformers.distributed.tensor_parallel import (
        ColwiseParallel,
        EmbeddingParallel,
        RowwiseParallel,
    )

    config = TINY[name]
    facts = facts_from_config(config)
    model = _build(config, meta=True, dtype=torch.bfloat16)
    styles = model._expand_parallel_plan(model.tp_plan)
    assert styles.get("model.embed_tokens.weight") == "embedding_rowwise"
    head = styles.get("lm_head.weight", styles.get("lm_head"))
    assert head == "colwise_gather_output" or facts.tie_word_embeddings
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())

    def shard(key: str, tensor: Any, tp: int, rank: int) -> int:
        style = ALL_PARALLEL_STYLES.get(styles.get(key, ""))
        leaf = key.rsplit(".", 1)[-1]
        if isinstance(style, ColwiseParallel):
            dim = tensor.ndim - 2 if tensor.ndim > 1 else 0
        elif isinstance(style, RowwiseParallel):
            dim = None if leaf == "bias" else tensor.ndim - 1
        elif isinstance(style, EmbeddingParallel):
            dim = style.shard_dim
        else:
            dim = None
        if dim is None:
            return int(tensor.numel() * tensor.element_size())
        pieces, _ = Shard(dim)._split_tensor(tensor, tp, with_padding=False)
        return int(pieces[rank].numel() * tensor.element_size())

    for tp in (2, 3):
        for module in model_modules(facts):
            if module.tied_to:
                continue
            under = {k: t for k, t in tensors.items() if k == module.name or k.startswith(module.name + ".")}
            for rank in range(tp):
                expected = sum(shard(k, t, tp, rank) for k, t in under.items())
                got = module_share_bytes(module, "bfloat16", tp, rank, facts.vocab_size)
                assert got == expected, (module.name, tp, rank)


def test_chunks_are_torch_chunks() -> None:
    torch = pytest.importorskip("torch")
    for n in (1, 7, 8, 9, 128256):
        for parts in (1, 2, 3, 8):
            sizes = [t.shape[0] for t in torch.empty(n, device="meta").chunk(parts)]
            sizes += [0] * (parts - len(sizes))
            assert [chunk(n, parts, i) for i in range(parts)] == sizes


# ---------------------------------------------------------------------------------- layouts


def test_layouts_follow_what_transformers_can_shard() -> None:
    llama = facts_from_config(dict(known_config(L405) or {}))
    assert layout_for(llama, 2, 8) is not None and layout_for(llama, 2, 8).tp == 8  # type: ignore[union-attr]
    assert layout_for(llama, 2, 6) is None  # 6 divides neither 128 heads nor 8 KV heads: not offered
    # Mixtral's experts are not sharded by heads: one pipeline stage per GPU.
    mixtral = facts_from_config(dict(known_config("mistralai/Mixtral-8x7B-v0.1") or {}))
    lay = layout_for(mixtral, 2, 4)
    assert lay is not None and (lay.tp, lay.pp, lay.world) == (1, 8, 8)
    group = plan_group(mixtral, Workload(), 24 * 2**30, 2, 4)
    assert group is not None and len(group.stages) == 8
    assert [r.stage for r in group.ranks] == list(range(8)) and {r.tp_rank for r in group.ranks} == {0}


def test_groups_refuse_what_they_cannot_load() -> None:
    gpt2 = facts_from_config(dict(known_config("gpt2") or {}))
    assert plan_group(gpt2, Workload(), 80 * 2**30, 2, 1) is None  # transformers cannot pipeline it
    llama = facts_from_config(dict(known_config(L405) or {}))
    assert plan_group(llama, Workload(weights="int4"), H100_BYTES, 4, 8) is None


def test_tied_embedding_is_held_by_the_first_and_the_last_stage() -> None:
    config = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1000,
              "tie_word_embeddings": True}
    facts = facts_from_config(config)
    workload = Workload(max_sequence_length=64)
    plan = plan_group(facts, workload, 4 * 2**30, 2, 2)
    assert plan is not None and [s.ends for s in plan.stages] == [
        ("model.embed_tokens",), ("model.embed_tokens", "model.norm", "lm_head")]
    est = estimate(facts, workload)
    # the embedding's two halves twice, norms and inv_freq on more than one rank
    norms = 4 * 2 * 256 * 2 + 256 * 2
    extra = 1000 * 256 * 2 + norms + 3 * (2 * 16 * 4)
    assert sum(r.budget["weights"] for r in plan.ranks) == est.weightsBytes + extra == (
        est.weightsBytes + plan.replicated_weights
    )


# --------------------------------------------------------------------------------- placement


def _l405(**placement: Any) -> Any:
    return deployment("l405", L405, **placement)


def test_multi_node_never_leaves_it_pending_with_the_reason() -> None:
    nodes = [gfd_node("h0", H100_80, 8), gfd_node("h1", H100_80, 8)]
    plan = plan_cluster([_l405(multiNode="never")], nodes)
    dp = plan.by_key()[("default", "l405")]
    assert dp.replicas == [] and dp.unscheduled == 1
    assert dp.reason is not None and "group" not in dp.reason
    grouped = plan_cluster([_l405()], nodes).by_key()[("default", "l405")]
    assert len(grouped.replicas) == 1 and grouped.replicas[0].group is not None


def test_when_needed_keeps_what_fits_one_node_on_one_node_and_always_groups_it() -> None:
    nodes = [gfd_node("a0", A100_80, 8), gfd_node("a1", A100_80, 8)]
    l70 = "meta-llama/Meta-Llama-3-70B-Instruct"
    (single,) = plan_cluster([deployment("l70", l70)], nodes).by_key()[("default", "l70")].replicas
    assert single.group is None
    (grouped,) = plan_cluster([deployment("l70", l70, multiNode="always")], nodes).by_key()[
        ("default", "l70")].replicas
    assert grouped.group is not None and {p.node for p in grouped.pods} == {"a0", "a1"}
    # the fewest GPUs: 70B in bfloat16 fits 2 pods x 1 GPU
    assert grouped.group.layout.world == sum(len(p.gpus) for p in grouped.pods) == 2


def test_a_group_takes_the_least_vram_on_nodes_with_room_and_never_shares_a_node() -> None:
    nodes = [gfd_node(f"h{i}", H100_80, 8) for i in range(3)] + [gfd_node("l4", L4, 8)]
    plan = plan_cluster([_l405(maxGroupSize=3)], nodes)
    (replica,) = plan.by_key()[("default", "l405")].replicas
    assert replica.group is not None
    # 12 GPUs: 3 pods x 4 GPUs (tensor parallel 4) beat 2 pods x 8
    assert (replica.group.layout.pods, replica.group.layout.gpus_per_pod) == (3, 4)
    assert [p.node for p in replica.pods] == ["h0", "h1", "h2"]
    # the next replica (and a group) never takes a GPU twice
    plan2 = plan_cluster([_l405(maxGroupSize=3, replicas=2)], nodes)
    replicas = plan2.by_key()[("default", "l405")].replicas
    taken = [(p.node, g) for r in replicas for p in r.pods for g in p.gpus]
    assert len(taken) == len(set(taken)) == 24


def test_pending_group_asks_the_autoscaler_for_several_nodes() -> None:
    classes = [
        {"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3", "gpuMemoryMiB": 81559, "gpusPerNode": 8}
    ]
    plan = plan_cluster([_l405(maxGroupSize=2)], [gfd_node("h0", H100_80, 8)], node_classes=classes)
    dp = plan.by_key()[("default", "l405")]
    assert dp.unscheduled == 1 and dp.autoscaling is not None
    assert dp.reason is not None and "or a group of 2 pods x 8 GPUs with >= " in dp.reason
    signal = dp.autoscaling
    assert (signal["gpuClass"], signal["nodeCount"], signal["gpuCount"]) == ("h100", 2, 8)
    assert signal["minGpuMemoryMiB"] <= 81559
    # The signal is real: a second node of the class holds the replica.
    grown = plan_cluster([_l405(maxGroupSize=2)], [gfd_node("h0", H100_80, 8), gfd_node("h1", H100_80, 8)])
    assert len(grown.by_key()[("default", "l405")].replicas) == 1


def test_table_shows_the_group_and_its_rank_budgets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "-f", str(EXAMPLE), "--cluster", str(TWO_H100_NODES)]) == 0
    out = capsys.readouterr().out
    assert "replica 0: group of 2 pods, tensor parallel 8 x 2 pipeline stages (16 ranks)" in out
    assert "pod 0 (leader) gpu-h100-0 GPU 0-7: stage 0: layers 0-62 + model.embed_tokens" in out
    assert "pod 1 (worker) gpu-h100-1 GPU 0-7: stage 1: layers 63-125 + model.norm + lm_head" in out
    assert "ranks 0-7 " in out and "ranks 8-15 " in out and "sum of the ranks: weights" in out


def test_a_deployment_of_groups_waits_rather_than_mixing_in_an_offloaded_replica() -> None:
    # Two nodes make one group; the third alone could take an offloaded replica, which would not serve
    # behind the group's Service: the second replica waits for a node instead.
    nodes = [gfd_node(f"h{i}", H100_80, 8, memory="2Ti") for i in range(3)]
    plan = plan_cluster([_l405(replicas=2, offload="cpu", maxGroupSize=2)], nodes)
    dp = plan.by_key()[("default", "l405")]
    assert [r.group is not None for r in dp.replicas] == [True] and dp.unscheduled == 1
    # No group can ever form on one node: offload, as before multi-node groups.
    alone = plan_cluster([_l405(offload="cpu")], [gfd_node("h0", H100_80, 8, memory="2Ti")])
    (replica,) = alone.by_key()[("default", "l405")].replicas
    assert replica.group is None and "cpu" in replica.plan.device_map.values()

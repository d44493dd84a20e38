"""The operator plans every covered architecture with the analytic description (its image has no torch):
the status carries the same figures as ``kubevram estimate``; model facts it cannot serve are refused
naming the field."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from kubevram_emulator import EmulatedCluster, gpu_node, llm_deployment

from kubevram.api.load import load_deployments
from kubevram.planner.report import estimate_deployment

MODELS = ["google/gemma-3-1b-it", "deepseek-ai/DeepSeek-V2-Lite", "Qwen/Qwen3-30B-A3B", "bigcode/starcoder"]


def _phase(cluster: EmulatedCluster, name: str, phase: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        obj = cluster.llmd(name)
        return obj if ((obj or {}).get("status") or {}).get("phase") == phase else None

    return cluster.wait_for(f"{name} {phase}", probe)  # type: ignore[no-any-return]


def test_new_architectures_are_planned_with_the_cli_figures(cluster: EmulatedCluster, operator: Any) -> None:
    cluster.add_node(gpu_node("h100-0", gpus=8, memory_mib=81559, product="NVIDIA-H100-80GB-HBM3"))
    for i, model_id in enumerate(MODELS):
        cluster.create_llmd(llm_deployment(f"m{i}", model_id))
    for i, model_id in enumerate(MODELS):
        obj = _phase(cluster, f"m{i}", "Planned")
        (deployment,) = load_deployments(yaml.safe_dump(llm_deployment(f"m{i}", model_id)))
        expected = estimate_deployment(deployment).to_json()
        got = obj["status"]["estimate"]
        for key in ("parameters", "weightsBytes", "kvCacheBytesPerToken", "kvCacheBytes", "activationBytes"):
            assert got[key] == expected[key], (model_id, key)


@pytest.mark.parametrize(
    ("serving", "field", "words"),
    [
        (
            {"maxSequenceLength": 1_000_000},
            "spec.serving.maxSequenceLength",
            "its max_position_embeddings 32768",
        ),
    ],
)
def test_model_facts_it_cannot_serve_are_an_invalid_spec(
    cluster: EmulatedCluster, operator: Any, serving: dict[str, Any], field: str, words: str
) -> None:
    cluster.add_node(gpu_node("h100-0", gpus=8, memory_mib=81559, product="NVIDIA-H100-80GB-HBM3"))
    cluster.create_llmd(llm_deployment("long", "Qwen/Qwen2-7B", serving=serving))
    obj = _phase(cluster, "long", "Failed")
    planned = next(c for c in obj["status"]["conditions"] if c["type"] == "Planned")
    assert (planned["status"], planned["reason"]) == ("False", "InvalidSpec")
    assert planned["message"].startswith(field) and words in planned["message"], planned["message"]
    assert obj["status"].get("autoscaling") in (None, {}) or not obj["status"]["autoscaling"].get(
        "pendingReplicas"
    )

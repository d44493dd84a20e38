"""examples/*.yaml: each one is valid twice over (the generated CRD's schema, as the API server
checks it, and the pydantic types, as the operator parses it), carries its model's published
config.json inline, and shows the capability its name promises."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT

from kubevram.api.errors import SpecError
from kubevram.api.load import load_deployments
from kubevram.cli import main
from kubevram.planner.catalog import known_config

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
BY_NAME = {p.name: p for p in EXAMPLES}


def example(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(BY_NAME[name].read_text(encoding="utf-8"))
    return doc


def test_the_six_examples_are_there() -> None:
    assert sorted(BY_NAME) == [
        "chatglm-6b-cpu-offload.yaml",
        "chinese-chat.yaml",
        "llama-3-70b-multi-gpu.yaml",
        "llama-3.1-405b-multi-node.yaml",
        "qwen2-7b.yaml",
        "shared-gpu-small.yaml",
    ]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_validates_against_the_crd_schema(path: Path, crd_validator: Any) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert len(docs) == 1
    errors = sorted(crd_validator.iter_errors(docs[0]), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_parses_with_the_api_types(path: Path) -> None:
    (deployment,) = load_deployments(path.read_text(encoding="utf-8"), path.name)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", deployment.name) and len(deployment.name) <= 40
    # Applied with `kubectl -n <namespace> apply -f`, so no namespace is baked in.
    assert "namespace" not in deployment.metadata
    config = deployment.spec.model.config
    assert config and config["model_type"], "every example plans offline from an inline config.json"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_inline_configs_agree_with_the_planners_catalogue(path: Path) -> None:
    """Two independent transcriptions of the published config.json files must agree."""
    (deployment,) = load_deployments(path.read_text(encoding="utf-8"), path.name)
    catalogue = known_config(deployment.spec.model.id)
    assert catalogue is not None, f"{deployment.spec.model.id} is not in kubevram.planner.catalog"
    inline = deployment.spec.model.config or {}
    assert {k: inline.get(k) for k in catalogue} == dict(catalogue)


@pytest.mark.parametrize(
    ("name", "parameters"),
    [
        # The parameter counts the models' safetensors index files publish.
        ("qwen2-7b.yaml", 7_615_616_512),
        ("llama-3-70b-multi-gpu.yaml", 70_553_706_496),
        ("chinese-chat.yaml", 6_738_415_616),
        ("shared-gpu-small.yaml", 494_032_768),
        # the safetensors index's total_size (811,706,777,600 bytes) over 2 bytes a bfloat16 parameter
        ("llama-3.1-405b-multi-node.yaml", 405_853_388_800),
    ],
)
def test_estimate_runs_offline_on_the_example(
    name: str, parameters: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["estimate", "-f", str(BY_NAME[name]), "-o", "json"]) == 0
    (estimate,) = json.loads(capsys.readouterr().out)
    assert estimate["parameters"] == parameters
    assert estimate["totalBytes"] > estimate["weightsBytes"] > 0


def plan(name: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """`kubevram plan -f examples/<name> -o json` on the built-in sample cluster."""
    assert main(["plan", "-f", str(BY_NAME[name]), "-o", "json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert isinstance(result, dict)
    return result


def test_plan_qwen2_7b_on_one_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    result = plan("qwen2-7b.yaml", capsys)
    (replica,) = result["replicas"]
    assert len(replica["gpus"]) == 1 and list(replica["maxMemory"]) == ["0"]
    assert set(replica["deviceMap"].values()) == {0}
    assert result["unscheduled"]["count"] == 0


def test_plan_splits_llama_3_70b_over_four_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    (replica,) = plan("llama-3-70b-multi-gpu.yaml", capsys)["replicas"]
    assert len(replica["gpus"]) == 4
    assert set(replica["deviceMap"].values()) == {0, 1, 2, 3}
    # balanced_low_0: GPU 0 gets the smallest share.
    budgets = {int(k): v for k, v in replica["maxMemory"].items()}
    assert budgets[0] == min(budgets.values()) < max(budgets.values())


def test_plan_spreads_llama_405b_over_two_nodes(capsys: pytest.CaptureFixture[str]) -> None:
    (replica,) = plan("llama-3.1-405b-multi-node.yaml", capsys)["replicas"]
    group = replica["group"]
    assert group["size"] == 2 and group["worldSize"] == 16
    assert len({pod["node"] for pod in group["pods"]}) == 2


def test_plan_offloads_chatglm_layers_to_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    (replica,) = plan("chatglm-6b-cpu-offload.yaml", capsys)["replicas"]
    placed = set(replica["deviceMap"].values())
    assert placed == {0, "cpu"}
    assert "cpu" in replica["maxMemory"]


def test_plan_puts_both_small_replicas_on_one_shared_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    replicas = plan("shared-gpu-small.yaml", capsys)["replicas"]
    assert len(replicas) == 2
    assert len({(r["node"], tuple(r["gpus"])) for r in replicas}) == 1


def test_qwen2_7b_carries_the_published_config() -> None:
    config = example("qwen2-7b.yaml")["spec"]["model"]["config"]
    assert config == config | {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "torch_dtype": "bfloat16",
        "sliding_window": 131072,
        "use_sliding_window": False,
        "max_window_layers": 28,
    }
    assert isinstance(config["rope_theta"], float) and isinstance(config["rms_norm_eps"], float)
    spec = example("qwen2-7b.yaml")["spec"]
    assert spec["model"]["id"] == "Qwen/Qwen2-7B-Instruct"
    assert spec["placement"]["gpusPerReplica"] == 1


def test_multi_gpu_example_splits_one_replica() -> None:
    placement = example("llama-3-70b-multi-gpu.yaml")["spec"]["placement"]
    assert placement["gpusPerReplica"] > 1
    assert placement["strategy"] == "balanced_low_0"
    assert placement["offload"] == "none"


def test_cpu_offload_example_is_chatglm_with_remote_code() -> None:
    spec = example("chatglm-6b-cpu-offload.yaml")["spec"]
    assert spec["placement"]["offload"] == "cpu"
    assert spec["model"]["trustRemoteCode"] is True
    assert spec["model"]["config"] == spec["model"]["config"] | {
        "model_type": "chatglm",
        "num_layers": 28,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "inner_hidden_size": 16384,
        "vocab_size": 130528,
        "max_sequence_length": 2048,
        "position_encoding_2d": True,
    }
    # Offloaded layers live in CPU memory: the pod asks for it.
    assert spec["worker"]["resources"]["requests"]["memory"]


def test_shared_gpu_example_shares() -> None:
    spec = example("shared-gpu-small.yaml")["spec"]
    assert spec["placement"]["sharing"] == "shared"
    assert spec["replicas"] > 1
    assert spec["model"]["config"]["tie_word_embeddings"] is True


def test_chinese_chat_example_steers_into_chinese() -> None:
    spec = example("chinese-chat.yaml")["spec"]
    assert spec["model"]["id"] == "meta-llama/Llama-2-7b-chat-hf"
    chinese = spec["generation"]["chinese"]
    assert chinese["enabled"] is True and chinese["alpha"] > 1


# ----------------------------------------------------------- the checks above can fail


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("spec", "placement", "stratgy"), "balanced", "Additional properties"),
        (("spec", "placement", "strategy"), "greedy", "is not one of"),
        (("spec", "precision", "weights"), "fp7", "is not one of"),
        (("spec", "replicas"), -1, "less than the minimum"),
        (("spec", "generation", "chinese", "alpha"), 0, "less than or equal to the minimum"),
        (("spec", "generation", "chinese", "ranges"), ["CJK"], "does not match"),
        (("spec", "model", "id"), "", "non-empty"),
    ],
)
def test_schema_and_types_reject_a_broken_example(
    path: tuple[str, ...], value: Any, message: str, crd_validator: Any
) -> None:
    doc = example("qwen2-7b.yaml")
    node = doc
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    errors = list(crd_validator.iter_errors(doc))
    assert errors and any(message in e.message for e in errors), [e.message for e in errors]
    with pytest.raises(SpecError):
        load_deployments(yaml.safe_dump(doc), "broken.yaml")


def test_nullable_and_int_or_string_fields_pass(crd_validator: Any) -> None:
    doc = example("qwen2-7b.yaml")
    doc["spec"]["model"]["configMapRef"] = None
    doc["spec"]["estimation"] = {"overheadPerGPU": "1Gi"}
    assert list(crd_validator.iter_errors(doc)) == []
    doc["spec"]["estimation"] = {"overheadPerGPU": 1073741824}
    assert list(crd_validator.iter_errors(doc)) == []

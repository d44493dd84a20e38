"""Done when: an install without torch, transformers and accelerate (the operator's image) gives the same
figures as a full install, for every covered architecture; the CLI's meta-device fallback no longer
guesses; bad model facts give one line and exit status 2.

The no-torch run is a real subprocess of ``kubevram`` whose ``sitecustomize`` makes importing torch,
transformers or accelerate fail, as in ``pip install ".[operator]"``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from gpu_nodes import manifest

from kubevram.api.errors import SpecError
from kubevram.cli import main
from kubevram.planner.catalog import CONFIGS
from kubevram.planner.estimate import Workload, kv_cache_bytes
from kubevram.planner.facts import facts_from_config
from kubevram.planner.families import FAMILIES, canonical_config
from kubevram.planner.modules import model_modules

BLOCKER = """
import importlib.abc, sys

class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "accelerate"):
            raise ImportError(f"No module named {name!r} (blocked: an install of .[operator] only)")
        return None

sys.meta_path.insert(0, _NoTorch())
"""

# One deployment per published config in the catalogue, by id: every covered architecture.
MODEL_IDS = sorted(CONFIGS)


def _deployments(ids: list[str], seq: int = 4096, batch: int = 2) -> str:
    return yaml.safe_dump_all(
        [
            manifest(f"m{i}", model_id, seq=min(seq, _limit(model_id)), batch=batch)
            for i, model_id in enumerate(ids)
        ]
    )


def _limit(model_id: str) -> int:
    return facts_from_config(CONFIGS[model_id]).position_limit or 4096


def _run_without_torch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "kubevram.cli", *args], capture_output=True, text=True, env=env, check=False
    )


def test_the_blocker_blocks(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "blocked" in done.stderr


@pytest.mark.parametrize("command", ["estimate", "plan"])
def test_operator_install_gives_the_same_figures_as_a_full_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    path = tmp_path / "all.yaml"
    path.write_text(_deployments(MODEL_IDS))
    assert main([command, "-f", str(path), "-o", "json"]) == 0
    in_process = json.loads(capsys.readouterr().out)
    done = _run_without_torch(tmp_path, command, "-f", str(path), "-o", "json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == in_process
    assert len(in_process) == len(MODEL_IDS)


def test_unknown_model_type_without_transformers_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text(
        "apiVersion: llm.kubevram.io/v1alpha1\nkind: LLMDeployment\nmetadata: {name: x}\n"
        "spec:\n  model: {id: x, config: {model_type: rwkv7, hidden_size: 64}}\n"
    )
    done = _run_without_torch(tmp_path, "estimate", "-f", str(path))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and len(done.stderr) < 600, done.stderr
    for key in ("num_hidden_layers", "hidden_size", "num_key_value_heads", "vocab_size", "'rwkv7'"):
        assert key in done.stderr


def test_unknown_model_type_with_transformers_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """transformers' own error lists every model type it knows (12,000 characters): not ours."""
    pytest.importorskip("transformers")
    path = tmp_path / "d.yaml"
    path.write_text(
        "apiVersion: llm.kubevram.io/v1alpha1\nkind: LLMDeployment\nmetadata: {name: x}\n"
        "spec:\n  model: {id: x, config: {model_type: foo, hidden_size: 64}}\n"
    )
    assert main(["estimate", "-f", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 600 and "'foo'" in err


@pytest.mark.parametrize(
    ("model_id", "length", "words"),
    [
        (
            "qwen/qwen2-7b",
            1_000_000,
            "1000000 is past what the model serves: its max_position_embeddings 32768",
        ),
        (
            "openai-community/gpt2",
            2048,
            "2048 is past what the model serves: its max_position_embeddings 1024",
        ),
        (
            "internlm/internlm2-chat-7b",
            70_000,
            "70000 is past what the model serves: the 65536 positions its rope scaling reaches",
        ),
    ],
)
def test_max_sequence_length_past_the_model_positions_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_id: str, length: int, words: str
) -> None:
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(manifest("x", model_id, seq=length)))
    for command in ("estimate", "plan"):
        assert main([command, "-f", str(path)]) == 2
        err = capsys.readouterr().err
        assert "spec.serving.maxSequenceLength: " + words in err and err.count("\n") == 1


def test_rope_scaling_extends_the_positions() -> None:
    qwen_yarn = {
        **CONFIGS["qwen/qwen2-7b"],
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    }
    assert facts_from_config(qwen_yarn).position_limit == 131072
    # DeepSeek-V3's max_position_embeddings is already the extended length (4096 x 40)
    assert facts_from_config(CONFIGS["deepseek-ai/deepseek-v3"]).position_limit == 163840
    assert facts_from_config(CONFIGS["meta-llama/llama-3.1-8b"]).position_limit == 131072


# ---------------------------------------------------------------- the CLI's meta-device fallback

TINY_FALLBACK = [
    "deepseek_v3",
    "gemma3_text",
    "gpt_bigcode",
    "mixtral",
    "qwen2",
    "gemma",
    "gpt2",
    "falcon-40b",
]


@pytest.mark.parametrize("name", TINY_FALLBACK)
def test_meta_fallback_equals_the_analytic_description(name: str) -> None:
    """What the CLI would do for an architecture it did not cover, on ones it does: the same module
    names, bytes, parameters and KV cache (MLA latents, sliding windows, buffers owned by the model)."""
    pytest.importorskip("transformers")
    from test_exactness import TINY

    from kubevram.introspect import meta_facts

    meta, analytic = meta_facts(TINY[name], "cfg"), facts_from_config(TINY[name])
    workload = Workload(weights="bfloat16", max_sequence_length=9, max_batch_size=2)
    got, want = model_modules(meta), model_modules(analytic)
    assert [m.name for m in got] == [m.name for m in want]
    assert [m.weight_bytes("bfloat16") for m in got] == [m.weight_bytes("bfloat16") for m in want]
    assert sum(m.params for m in got) == sum(m.params for m in want)
    assert kv_cache_bytes(meta, workload) == kv_cache_bytes(analytic, workload) > 0


def test_meta_fallback_says_when_it_cannot_know_the_kv_cache() -> None:
    pytest.importorskip("transformers")
    from kubevram.introspect import meta_facts

    hybrid = {
        "model_type": "qwen3_next",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 128,
        "head_dim": 16,
        "num_experts": 4,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
    }
    with pytest.raises(SpecError, match="layer 0 caches LinearAttentionLayer state, which kubevram cannot"):
        meta_facts(hybrid, "cfg")


def test_every_catalogue_entry_is_covered_analytically() -> None:
    for config in CONFIGS.values():
        assert canonical_config(config)["model_type"] in FAMILIES

"""``kubevram estimate``: JSON and table output, and one clear line with exit status 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kubevram.cli import main
from kubevram.planner.catalog import CONFIGS

QWEN = """
apiVersion: llm.kubevram.io/v1alpha1
kind: LLMDeployment
metadata: {name: qwen2-7b, namespace: ai}
spec:
  model: {id: Qwen/Qwen2-7B-Instruct}
  serving: {maxSequenceLength: 4096, maxBatchSize: 4}
"""
CHATGLM = """
apiVersion: llm.kubevram.io/v1alpha1
kind: LLMDeployment
metadata: {name: chatglm}
spec:
  model: {id: /models/my-glm, trustRemoteCode: true}
  precision: {weights: float16}
  serving: {maxSequenceLength: 2048}
"""
FIELDS = (
    "name",
    "parameters",
    "weightsBytes",
    "kvCacheBytesPerToken",
    "kvCacheBytes",
    "activationBytes",
    "overheadBytesPerGPU",
    "totalBytes",
)


def run(tmp_path: Path, text: str, *extra: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    path = tmp_path / "d.yaml"
    path.write_text(text)
    code = main(["estimate", "-f", str(path), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_has_the_contract_fields_for_each_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "glm.json"
    config.write_text(json.dumps(CONFIGS["thudm/chatglm-6b"]))
    glm = CHATGLM.replace(
        "{id: /models/my-glm,", "{config: " + json.dumps(CONFIGS["thudm/chatglm-6b"]) + ", id: g,"
    )
    code, out, _ = run(tmp_path, QWEN + "---\n" + glm, "-o", "json", capsys=capsys)
    assert code == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["qwen2-7b", "chatglm"]
    for row in rows:
        assert all(isinstance(row[f], int) for f in FIELDS[1:])
    assert rows[0]["parameters"] == 7_615_616_512  # from the catalogue by id; inline config not needed
    assert rows[1]["parameters"] == 6_173_286_400 and rows[1]["kvCacheBytesPerToken"] == 458_752
    # --model-config supplies the config of a model that cannot be read from here
    code, out, _ = run(tmp_path, CHATGLM, "--model-config", str(config), "-o", "json", capsys=capsys)
    assert code == 0 and json.loads(out)[0]["parameters"] == 6_173_286_400


def test_table_is_for_people(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(tmp_path, QWEN, capsys=capsys)
    assert code == 0
    assert "qwen2-7b: 7.62 B parameters" in out
    for part in ("weights", "KV cache", "activations", "CUDA context", "total on one GPU"):
        assert part in out
    assert "GiB" in out


def test_inline_config_wins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inline = QWEN.replace(
        "{id: Qwen/Qwen2-7B-Instruct}",
        "{id: x, config: " + json.dumps(CONFIGS["meta-llama/llama-2-7b-hf"]) + "}",
    )
    code, out, _ = run(tmp_path, inline, "-o", "json", capsys=capsys)
    assert code == 0 and json.loads(out)[0]["parameters"] == 6_738_415_616


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: [1, 2\nb: 3\n", "malformed YAML at line"),
        (
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
            "kind: 'ConfigMap' (v1) is not an LLMDeployment",
        ),
        (
            QWEN.replace("serving:", "precision: {weights: fp7}\n  serving:"),
            "spec.precision.weights: 'fp7' is not one of float32, float16, bfloat16, int8, int4",
        ),
        (
            QWEN.replace("serving:", "precision: {kvCache: float8}\n  serving:"),
            "spec.precision.kvCache: 'float8' is not one of auto, float32, float16, bfloat16",
        ),
        (
            QWEN.replace("serving:", "precision: {weights: bfloat16, kvCache: float32}\n  serving:"),
            "spec.precision.kvCache: 'float32' is not served: the worker keeps the KV cache in the compute "
            "dtype, bfloat16 for weights bfloat16; use auto or bfloat16",
        ),
        (
            QWEN.replace("maxSequenceLength: 4096", "maxSequenceLength: 0"),
            "spec.serving.maxSequenceLength: 0 must be >= 1",
        ),
        (QWEN.replace("maxBatchSize: 4", "maxBatchSize: -3"), "spec.serving.maxBatchSize: -3 must be >= 1"),
        (
            QWEN.replace("Qwen/Qwen2-7B-Instruct}", "x, config: {model_type: llama, hidden_size: 64}}"),
            "spec.model.config.num_hidden_layers: is required",
        ),
        (
            QWEN.replace("Qwen/Qwen2-7B-Instruct", "acme/secret-model"),
            "no config.json for model 'acme/secret-model'",
        ),
        ("", "no LLMDeployment documents found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    code, out, err = run(tmp_path, text, capsys=capsys)
    assert code == 2
    assert out == ""
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_model_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    code, _, err = run(tmp_path, QWEN, "--model-config", str(bad), capsys=capsys)
    assert code == 2 and "--model-config" in err and "is not JSON" in err
    code, _, err = run(tmp_path, QWEN, "--model-config", str(tmp_path / "missing.json"), capsys=capsys)
    assert code == 2 and "cannot read" in err


def test_unknown_architecture_is_sized_on_the_meta_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("transformers")
    config = {  # an architecture the analytic description does not cover
        "model_type": "helium",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 1000,
        "tie_word_embeddings": True,
    }
    text = QWEN.replace("Qwen/Qwen2-7B-Instruct}", "x, config: " + json.dumps(config) + "}")
    code, out, _ = run(tmp_path, text, "-o", "json", capsys=capsys)
    assert code == 0
    row = json.loads(out)[0]
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(
                "helium", **{k: v for k, v in config.items() if k != "model_type"}
            )
        )
    model.tie_weights()
    assert row["parameters"] == sum(p.numel() for p in model.parameters())
    assert row["kvCacheBytesPerToken"] == 2 * 2 * 2 * 64 * 2


def test_the_installed_command_runs(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text(QWEN)
    done = subprocess.run(
        [sys.executable, "-m", "kubevram.cli", "estimate", "-f", str(path), "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["name"] == "qwen2-7b"
    done = subprocess.run(
        [sys.executable, "-m", "kubevram.cli", "estimate", "-f", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and "cannot read" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{not json", "cfg is not JSON: Expecting property name"),
        ("[1, 2]", "cfg holds list, not a JSON object"),
    ],
)
def test_config_json_errors_name_the_source(text: str, expected: str) -> None:
    from kubevram.api.load import parse_config_json

    with pytest.raises(ValueError, match=expected):
        parse_config_json(text, "cfg")
    assert parse_config_json('{"model_type": "llama"}', "cfg") == {"model_type": "llama"}

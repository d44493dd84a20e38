"""Quantized weights: what bitsandbytes really creates (it runs on this CPU), pre-quantized checkpoints by
their ``quantization_config``, and a precision that contradicts one.

Ground truth for bitsandbytes: a tiny Llama saved to disk and loaded through the worker's loader
arguments, on the CPU; the bytes are the unique storages of its parameters, buffers and quantization
state (``SCB`` row scales, ``absmax`` and each layer's ``code`` table). For fp8, AWQ, GPTQ and
compressed-tensors, whose kernels need a GPU, the tensors of published checkpoints, as their
``model.safetensors`` index lists them, are stated below.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from gpu_nodes import manifest

from kubevram.api.errors import SpecError
from kubevram.api.workerplan import WorkerPlan
from kubevram.cli import main
from kubevram.planner.catalog import CONFIGS
from kubevram.planner.estimate import weights_bytes
from kubevram.planner.facts import facts_from_config
from kubevram.planner.modules import Linear, model_modules
from kubevram.planner.quantization import quantization_from_config

ROOT = Path(__file__).resolve().parents[2]
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}


def _plan(weights: str) -> WorkerPlan:
    return WorkerPlan.model_validate(
        {
            "deployment": {"name": "t", "namespace": "n"},
            "model": {"id": "t"},
            "precision": {"weights": weights},
        }
    )


def _held_bytes(model: Any) -> int:
    """Unique storages of parameters, buffers and bitsandbytes' quantization state."""
    storages: dict[int, int] = {}

    def add(tensor: Any) -> None:
        if tensor is not None:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()

    for tensor in [*model.parameters(), *model.buffers()]:
        add(tensor)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        add(getattr(weight, "SCB", None))
        state = getattr(weight, "quant_state", None)
        while state is not None:
            add(state.absmax)
            add(state.code)
            add(getattr(state, "offset", None))
            state = getattr(state, "state2", None)
    return sum(storages.values())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    kwargs = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_bitsandbytes_bytes_equal_the_estimate(tiny_dir: Path, weights: str) -> None:
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    from kubevram.worker.loader import from_pretrained_kwargs

    kwargs = from_pretrained_kwargs(_plan(weights), cuda=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, device_map="cpu", **kwargs)
    modules = model_modules(facts_from_config(TINY_LLAMA))
    assert weights_bytes(modules, weights) == _held_bytes(model)


def test_prequantized_bitsandbytes_checkpoint_loads_as_transformers_does(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """An NF4 checkpoint with double quantization, saved quantized: its config.json decides the bytes,
    and the loader asks for no second quantization."""
    pytest.importorskip("bitsandbytes")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from kubevram.worker.loader import from_pretrained_kwargs

    nf4 = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float16
    )
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_dir, quantization_config=nf4, dtype=torch.float16, device_map="cpu"
    )
    quantized.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    facts = facts_from_config(config)
    assert facts.quantization is not None and facts.quantization.double_quant
    kwargs = from_pretrained_kwargs(_plan("int4"), cuda=False, prequantized=True)
    assert "quantization_config" not in kwargs
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu", **kwargs)
    assert weights_bytes(model_modules(facts), "int4") == _held_bytes(model)


def test_loader_refuses_int4_in_one_line_without_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    import sys

    from kubevram.worker.loader import LoadError, from_pretrained_kwargs

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as where it is not installed
    with pytest.raises(LoadError) as info:
        from_pretrained_kwargs(_plan("int4"), cuda=False)
    assert "precision.weights int4 needs bitsandbytes, which cannot be imported here" in str(info.value)
    assert "\n" not in str(info.value)


def test_bitsandbytes_is_in_the_worker_extra() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("bitsandbytes") for req in extras["worker"])
    assert not any(req.startswith("bitsandbytes") for req in extras["operator"])


# ---------------------------------------------------------------- published pre-quantized checkpoints


def test_fp8_block_scales_of_deepseek_v3() -> None:
    """DeepSeek-V3's checkpoint stores ``model.layers.3.mlp.experts.0.down_proj.weight`` as F8_E4M3
    [7168, 2048] with ``weight_scale_inv`` F32 [56, 16] (128 x 128 blocks)."""
    quant = quantization_from_config(
        {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}, "c"
    )
    assert quant is not None
    assert quant.linear_bytes(7168, 2048, 1, False, 2) == 7168 * 2048 + 56 * 16 * 4
    config = {
        **CONFIGS["deepseek-ai/deepseek-v3"],
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
    }
    fp8, bf16 = facts_from_config(config), facts_from_config(CONFIGS["deepseek-ai/deepseek-v3"])
    fp8_bytes = weights_bytes(model_modules(fp8), "bfloat16")
    # about half the bfloat16 size: every Linear (experts included) in 1 byte, the rest in bfloat16
    assert 0.5 < fp8_bytes / weights_bytes(model_modules(bf16), "bfloat16") < 0.52


def test_awq_and_gptq_packed_int4() -> None:
    """Qwen2.5-7B-Instruct-AWQ: ``q_proj.qweight`` I32 [3584, 448], ``qzeros`` I32 [28, 448], ``scales``
    F16 [28, 3584], ``bias`` F16 [3584]. A GPTQ 4-bit (group 128) checkpoint of the same layer:
    ``qweight`` I32 [448, 3584], ``qzeros`` I32 [28, 448], ``scales`` F16 [28, 3584], ``g_idx`` I32 [3584]."""
    awq = quantization_from_config(
        {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}},
        "c",
    )
    gptq = quantization_from_config(
        {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}},
        "c",
    )
    assert awq is not None and gptq is not None
    bias = 3584 * 2
    assert awq.linear_bytes(3584, 3584, 1, True, 2) == 3584 * 448 * 4 + 28 * 448 * 4 + 28 * 3584 * 2 + bias
    assert gptq.linear_bytes(3584, 3584, 1, True, 2) == (
        448 * 3584 * 4 + 28 * 448 * 4 + 28 * 3584 * 2 + 3584 * 4 + bias
    )


def test_compressed_tensors_w4a16_and_fp8() -> None:
    """Llama-3.1-8B-Instruct quantized W4A16 (pack-quantized, group 128, symmetric): ``q_proj``
    ``weight_packed`` I32 [4096, 512], ``weight_scale`` BF16 [4096, 32], ``weight_shape`` I64 [2]. FP8
    per channel: ``weight`` F8_E4M3 [4096, 4096] and a [4096, 1] scale, float32 as vLLM's
    compressed-tensors FP8 scheme allocates it."""
    w4 = quantization_from_config(
        {
            "quantization_config": {
                "quant_method": "compressed-tensors",
                "format": "pack-quantized",
                "config_groups": {
                    "group_0": {
                        "targets": ["Linear"],
                        "weights": {
                            "num_bits": 4,
                            "type": "int",
                            "strategy": "group",
                            "group_size": 128,
                            "symmetric": True,
                        },
                    }
                },
                "ignore": ["lm_head"],
            }
        },
        "c",
    )
    fp8 = quantization_from_config(
        {
            "quantization_config": {
                "quant_method": "compressed-tensors",
                "format": "float-quantized",
                "config_groups": {
                    "group_0": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}
                },
            }
        },
        "c",
    )
    assert w4 is not None and fp8 is not None
    assert w4.linear_bytes(4096, 4096, 1, False, 2) == 4096 * 512 * 4 + 4096 * 32 * 2 + 16
    assert fp8.linear_bytes(4096, 4096, 1, False, 2) == 4096 * 4096 + 4096 * 4


def test_unquantized_layers_stay_in_the_compute_dtype() -> None:
    config = {
        **CONFIGS["qwen/qwen2-7b"],
        "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128},
    }
    modules = model_modules(facts_from_config(config))
    embed, head = modules[0], modules[-1]
    assert (
        embed.weight_bytes("float16") == 152064 * 3584 * 2
        and head.weight_bytes("float16") == 152064 * 3584 * 2
    )
    assert all(lin.quant is not None for lin in modules[1].linears)
    assert Linear(10, 128).quant is None


@pytest.mark.parametrize(
    ("weights", "words"),
    [
        (
            "int4",
            "'int4' contradicts spec.model.config.quantization_config (awq, 4-bit): the checkpoint is "
            "already quantized",
        ),
        ("int8", "'int8' contradicts spec.model.config.quantization_config (awq, 4-bit)"),
    ],
)
def test_precision_contradicting_the_checkpoint_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], weights: str, words: str
) -> None:
    config = {
        **CONFIGS["qwen/qwen2-7b"],
        "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128},
    }
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(manifest("x", "x", weights=weights, config=config)))
    assert main(["estimate", "-f", str(path)]) == 2
    err = capsys.readouterr().err
    assert "spec.precision.weights: " + words in err and err.count("\n") == 1
    # the compute dtype of the other layers is what it expects
    path.write_text(yaml.safe_dump(manifest("x", "x", weights="float16", config=config)))
    assert main(["estimate", "-f", str(path), "-o", "json"]) == 0
    capsys.readouterr()


def test_bitsandbytes_checkpoint_needs_its_own_precision() -> None:
    from kubevram.planner.quantization import check_precision

    quant = quantization_from_config(
        {"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}, "c"
    )
    with pytest.raises(
        SpecError, match=r"'bfloat16' contradicts c.quantization_config \(bitsandbytes, 8-bit\): use int8"
    ):
        check_precision(quant, "bfloat16", "c")
    with pytest.raises(SpecError, match="'marlin' is not a quantization kubevram can size"):
        quantization_from_config({"quantization_config": {"quant_method": "marlin"}}, "c")

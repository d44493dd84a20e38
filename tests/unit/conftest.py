"""Shared helpers for the planner's unit tests: meta-device models built from published configs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest


def build_meta_model(config: Mapping[str, Any]) -> Any:
    """A transformers model on the meta device (no memory), weights tied as from_pretrained would."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    hf_config = transformers.AutoConfig.for_model(config["model_type"], **kwargs)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    model.tie_weights()
    return model


def build_tiny_model(config: Mapping[str, Any]) -> Any:
    """A tiny randomly initialised transformers model on the CPU, in float32, in eval mode."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    hf_config = transformers.AutoConfig.for_model(config["model_type"], **kwargs)
    return transformers.AutoModelForCausalLM.from_config(hf_config).eval()


@pytest.fixture(scope="session")
def meta_model() -> Any:
    """Factory fixture: ``meta_model(config_dict)`` -> a transformers model on the meta device."""
    return build_meta_model


@pytest.fixture(scope="session")
def tiny_model() -> Any:
    """Factory fixture: ``tiny_model(config_dict)`` -> a tiny random CPU model in float32."""
    return build_tiny_model

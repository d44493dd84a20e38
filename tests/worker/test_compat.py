"""The engine on the transformers installed here: no deprecation warnings, inside the tested bound."""

from __future__ import annotations

import tomllib
import warnings
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from kubevram.worker.engine import Engine, SamplingParams

ROOT = Path(__file__).resolve().parents[2]


def _transformers_requirement() -> Requirement:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [spec] = [r for r in map(Requirement, extras["worker"]) if r.name == "transformers"]
    return spec


def test_transformers_has_a_tested_upper_bound_that_the_installed_version_meets():
    spec = _transformers_requirement()
    uppers = [s for s in spec.specifier if s.operator in ("<", "<=")]
    assert uppers, f"{spec}: no upper bound"
    installed = Version(version("transformers"))
    assert installed in spec.specifier, f"transformers {installed} is outside the tested {spec}"


async def test_generation_raises_no_deprecation_warning(loaded):
    engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=2, eos_token_ids=loaded.eos_token_ids)
    engine.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            prompt = loaded.tokenizer("hello world")["input_ids"]
            # A prefill, a join (a second prefill merged into the batch) and decode steps.
            first = engine.submit(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
            second = engine.submit(prompt, SamplingParams(max_tokens=3, temperature=0.7, ignore_eos=True))
            results = [await first.result(), await second.result()]
    finally:
        engine.stop()
    assert [r.completion_tokens for r in results] == [6, 3]


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_the_engine_passes_the_cache_under_the_name_the_model_takes(loaded, name):
    class OldSignature:  # a remote-code model written for transformers < 5.24
        config = loaded.model.config

        def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, **kw): ...

        def get_input_embeddings(self):
            return loaded.model.get_input_embeddings()

    model = loaded.model if name == "cache" else OldSignature()
    assert Engine(model, loaded.tokenizer)._cache_arg == name

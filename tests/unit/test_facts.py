"""Model facts and parameter counts against ground truth: published counts and transformers' own modules."""

from __future__ import annotations

import pytest

from kubevram.api.errors import SpecError
from kubevram.planner.catalog import CONFIGS, known_config
from kubevram.planner.facts import UnknownArchitecture, facts_from_config
from kubevram.planner.modules import model_modules, parameter_count

# Published parameter counts (tied weights counted once).
PUBLISHED = [
    ("meta-llama/Llama-2-7b-hf", 6_738_415_616),
    ("meta-llama/Meta-Llama-3-8B", 8_030_261_248),
    ("Qwen/Qwen2-7B", 7_615_616_512),
    ("mistralai/Mistral-7B-v0.1", 7_241_732_096),
    ("meta-llama/Llama-2-70b-hf", 68_976_648_192),
    ("THUDM/chatglm-6b", 6_173_286_400),
    ("THUDM/chatglm2-6b", 6_243_584_000),
    ("mistralai/Mixtral-8x7B-v0.1", 46_702_792_704),
    ("openai-community/gpt2", 124_439_808),
]


@pytest.mark.parametrize(("model_id", "count"), PUBLISHED)
def test_parameter_count_matches_published(model_id: str, count: int) -> None:
    config = known_config(model_id)
    assert config is not None
    assert parameter_count(facts_from_config(config)) == count


def test_chatglm_6b_facts_from_remote_code_keys() -> None:
    facts = facts_from_config(CONFIGS["thudm/chatglm-6b"])
    assert (facts.num_layers, facts.intermediate_size, facts.num_kv_heads, facts.head_dim) == (
        28,
        16384,
        32,
        128,
    )
    assert facts.tie_word_embeddings  # no tie key: the output layer shares the embedding
    names = [m.name for m in model_modules(facts)]
    assert names[0] == "transformer.word_embeddings"
    assert names[-2:] == ["transformer.final_layernorm", "lm_head"]
    assert model_modules(facts)[-1].tied_to == "transformer.word_embeddings"


def test_chatglm2_grouped_query_keys() -> None:
    facts = facts_from_config(CONFIGS["thudm/chatglm2-6b"])
    assert (facts.num_kv_heads, facts.head_dim, facts.vocab_size) == (2, 128, 65024)
    assert not facts.tie_word_embeddings
    assert model_modules(facts)[-1].name == "transformer.output_layer"


def test_explicit_head_dim_wins() -> None:
    config = dict(CONFIGS["google/gemma-7b"])
    facts = facts_from_config(config)
    assert facts.head_dim == 256 != facts.hidden_size // facts.num_attention_heads


def test_sliding_window_layers() -> None:
    mistral = facts_from_config(CONFIGS["mistralai/mistral-7b-v0.1"])
    assert mistral.sliding_window == 4096 and all(layer.window == 4096 for layer in mistral.layers)
    layer = mistral.layers[0]
    # decoding: the window; right after a prefill longer than the window: the whole prompt
    assert layer.tokens_held(10_000, prefill=100) == 4096 and layer.tokens_held(100, prefill=99) == 100
    assert layer.tokens_held(10_000, prefill=9_999) == 9_999
    qwen = facts_from_config(
        {**CONFIGS["qwen/qwen2-7b"], "use_sliding_window": True, "max_window_layers": 20}
    )
    assert [layer.window is not None for layer in qwen.layers] == [i >= 20 for i in range(28)]
    assert facts_from_config(CONFIGS["qwen/qwen2-7b"]).sliding_window is None  # use_sliding_window: false


def test_catalogue_matches_paths_ending_in_a_known_name() -> None:
    assert known_config("/models/Qwen2-7B-Instruct") is CONFIGS["qwen/qwen2-7b-instruct"]
    assert known_config("someone/unknown-model") is None


@pytest.mark.parametrize(
    ("config", "field", "words"),
    [
        ({"hidden_size": 8}, "spec.model.config.model_type", "is required"),
        ({**CONFIGS["qwen/qwen2-7b"], "hidden_size": None}, "spec.model.config.hidden_size", "is required"),
        ({**CONFIGS["qwen/qwen2-7b"], "num_hidden_layers": -2}, "spec.model.config.num_hidden_layers", "-2"),
        (
            {**CONFIGS["qwen/qwen2-7b"], "num_key_value_heads": 5},
            "spec.model.config.num_key_value_heads",
            "5",
        ),
        (
            {**CONFIGS["qwen/qwen2-7b"], "tie_word_embeddings": "yes"},
            "spec.model.config.tie_word_embeddings",
            "'yes'",
        ),
        (
            {**CONFIGS["mistralai/mistral-7b-v0.1"], "sliding_window": 1},
            "spec.model.config.sliding_window",
            "1",
        ),
    ],
)
def test_bad_configs_name_the_key_and_value(config: dict, field: str, words: str) -> None:
    with pytest.raises(SpecError) as info:
        facts_from_config(config)
    assert info.value.field == field
    assert words in str(info.value)


def test_unknown_architecture_names_the_keys_to_supply() -> None:
    with pytest.raises(UnknownArchitecture) as info:
        facts_from_config({"model_type": "rwkv", "hidden_size": 8})
    message = str(info.value)
    assert "'rwkv'" in message
    for key in ("num_hidden_layers", "hidden_size", "num_key_value_heads", "vocab_size"):
        assert key in message

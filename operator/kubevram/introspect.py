"""Model facts for architectures the analytic planner does not know, from transformers on the meta device.

Used by the CLI as the planner's fallback when transformers is installed (``kubevram[worker]``): the
model is built on the meta device (no memory, no download), its module tree read into the planner's
plain ``Module`` records, and its attention dimensions read from the config class. The result is a
``ModelFacts`` of family ``meta`` that every formula accepts. Without transformers the planner's
``UnknownArchitecture`` error stands, naming the config keys to supply.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubevram.api.errors import SpecError
from kubevram.planner.facts import ModelFacts, UnknownArchitecture
from kubevram.planner.modules import Kind, Linear, Module


def transformers_available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def meta_facts(config: Mapping[str, Any], where: str) -> ModelFacts:
    """Build the model on the meta device and read its facts; ``SpecError`` when transformers cannot."""
    model_type = str(config.get("model_type"))
    if not transformers_available():
        raise UnknownArchitecture(model_type, where)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    try:
        hf_config = AutoConfig.for_model(model_type, **kwargs)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, KeyError, TypeError) as exc:
        raise SpecError(
            f"{where}.model_type", f"{model_type!r}: transformers cannot build it: {exc}"
        ) from None
    model.tie_weights()
    modules = _top_level_modules(model)
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = int(text.num_attention_heads)
    hidden = int(text.hidden_size)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    return ModelFacts(
        model_type=model_type,
        family="meta",
        num_layers=sum(1 for m in modules if m.kind is Kind.layer),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        intermediate_size=int(getattr(text, "intermediate_size", None) or 4 * hidden),
        vocab_size=int(text.vocab_size),
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        max_position_embeddings=int(getattr(text, "max_position_embeddings", 0) or 0),
        modules=tuple(modules),
    )


def _top_level_modules(model: Any) -> list[Module]:
    """Split the tree as accelerate does: a no-split block is a unit; other modules recurse until they own
    tensors directly."""
    import torch

    no_split = set(getattr(model, "_no_split_modules", None) or ())
    input_weight = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    owners: dict[int, str] = {}
    result: list[Module] = []
    layer_index = 0

    def visit(name: str, module: torch.nn.Module) -> None:
        nonlocal layer_index
        children = list(module.named_children())
        direct = any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)
        )
        if type(module).__name__ in no_split or not children or direct:
            kind = _kind(module, no_split, out)
            layer = None
            if kind is Kind.layer:
                layer, layer_index = layer_index, layer_index + 1
            tied_to = None
            linears, other = [], 0
            for _, param in module.named_parameters(remove_duplicate=False):
                if id(param) in owners:
                    tied_to = owners[id(param)]
                    continue
                owners[id(param)] = name
                other += param.numel()
            for sub in module.modules():
                shape = _linear_shape(sub)
                weight: Any = getattr(sub, "weight", None)
                bias: Any = getattr(sub, "bias", None)
                if (
                    shape
                    and weight is not input_weight
                    and owners.get(id(weight)) == name
                    and kind is not Kind.head
                ):
                    linears.append(Linear(*shape, bias is not None))
                    other -= weight.numel() + (bias.numel() if bias is not None else 0)
            buffers = sum(b.numel() * b.element_size() for b in module.buffers())
            result.append(
                Module(
                    name,
                    kind,
                    tuple(linears),
                    other_params=other,
                    buffer_bytes=buffers,
                    layer=layer,
                    tied_to=tied_to if not other and not linears else None,
                )
            )
            return
        for child_name, child in children:
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return [m for m in result if m.params or m.buffer_bytes or m.tied_to]


def _linear_shape(module: Any) -> tuple[int, int] | None:
    """(out, in) of a module bitsandbytes quantizes: nn.Linear, or transformers' Conv1D (weight in x out)."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.out_features, module.in_features
    if type(module).__name__ == "Conv1D":
        n_in, n_out = module.weight.shape
        return int(n_out), int(n_in)
    return None


def _kind(module: Any, no_split: set[str], head: Any) -> Kind:
    import torch

    if type(module).__name__ in no_split:
        return Kind.layer
    if module is head:
        return Kind.head
    if isinstance(module, torch.nn.Embedding):
        return Kind.embedding
    if any(True for _ in module.parameters()):
        return Kind.norm
    return Kind.rotary

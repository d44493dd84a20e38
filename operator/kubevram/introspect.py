"""Model facts for architectures the analytic planner does not cover, from transformers on the meta device.

The CLI's fallback only (``kubevram estimate``/``plan`` in an install with transformers): the operator
plans with the analytic description alone, so an architecture is covered when ``planner/families.py``
has it. Here the model is built on the meta device (no memory, no download) and its module tree read
into the planner's plain ``Module`` records, split as accelerate splits it (a no-split block is one unit;
any other module recurses into its children, and tensors it owns itself become units of their own).
The KV cache is measured: transformers' own per-layer cache layout (``DynamicCache(config=...)``: full,
or sliding with the window) and the shapes a three-token forward on the meta device caches (per-head keys
and values, or MLA's latents). When the cache holds anything else (recurrent or linear-attention state)
or the meta forward cannot run (mixture-of-experts kernels need real tensors), the fallback says it
cannot know the KV cache instead of guessing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubevram.api.errors import SpecError
from kubevram.planner.facts import Attention, LayerSpec, ModelFacts, UnknownArchitecture
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
        raise UnknownArchitecture(
            model_type,
            where,
            " (kubevram estimate/plan size others on the meta device where transformers is "
            "installed: pip install 'kubevram[worker]')",
        )
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise UnknownArchitecture(model_type, where)
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    try:
        hf_config = AutoConfig.for_model(model_type, **kwargs)
        with torch.device("meta"):  # bfloat16: the experts' grouped matmul runs on meta only in it
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    except Exception as exc:  # any failure to build an arbitrary architecture is the config's
        reason = " ".join(str(exc).split())
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        raise SpecError(
            f"{where}.model_type", f"{model_type!r}: transformers cannot build it: {reason}"
        ) from None
    model.tie_weights()
    modules = _top_level_modules(model)
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = int(text.num_attention_heads)
    hidden = int(text.hidden_size)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    layers = _kv_layers(model, model_type, where)
    blocks = sum(1 for m in modules if m.kind is Kind.layer)
    if blocks != len(layers):
        raise SpecError(
            f"{where}.model_type",
            f"{model_type!r}: {blocks} decoder blocks but {len(layers)} cache layers: "
            "cannot know its KV cache",
        )
    return ModelFacts(
        model_type=model_type,
        family="meta",
        num_layers=blocks,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(getattr(text, "intermediate_size", None) or 4 * hidden),
        vocab_size=int(text.vocab_size),
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        layers=layers,
        max_position_embeddings=int(getattr(text, "max_position_embeddings", 0) or 0),
        modules=tuple(modules),
    )


def _kv_layers(model: Any, model_type: str, where: str) -> tuple[LayerSpec, ...]:
    """One ``LayerSpec`` per cache layer, measured: transformers' ``DynamicCache(config=...)`` decides each
    layer's kind (full, or sliding with its window), and a forward of three tokens on the meta device
    gives the shapes of what each layer caches (per-head keys and values, or MLA's latents)."""
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    cache = DynamicCache(config=model.config)
    for index, layer in enumerate(cache.layers):
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise SpecError(
                f"{where}.model_type",
                f"{model_type!r}: layer {index} caches {type(layer).__name__} state, which kubevram cannot "
                f"size (not a key/value cache)",
            )
    try:
        with torch.no_grad():
            hidden = model.get_input_embeddings().weight.shape[-1]
            model(
                inputs_embeds=torch.zeros((1, 3, hidden), dtype=torch.bfloat16, device="meta"),
                position_ids=torch.arange(3, device="meta")[None],
                past_key_values=cache,
                use_cache=True,
            )
    except Exception as exc:
        reason = " ".join(str(exc).split())[:160]
        raise SpecError(
            f"{where}.model_type",
            f"{model_type!r}: cannot know its KV cache (a meta-device forward failed: {reason}); give a "
            f"config of a covered architecture",
        ) from None
    specs = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        assert keys is not None and values is not None  # every layer is a key/value layer (checked above)
        per_token = keys.numel() // keys.shape[-2] + values.numel() // values.shape[-2]
        if type(layer) is DynamicSlidingWindowLayer:
            specs.append(LayerSpec(Attention.sliding, per_token, int(layer.sliding_window)))
        else:
            specs.append(LayerSpec(Attention.full, per_token))
    return tuple(specs)


def _top_level_modules(model: Any) -> list[Module]:
    """Split the tree as accelerate does: a no-split block is a unit; any other module with children
    recurses into them, the tensors it owns directly becoming units of their own."""
    import torch

    no_split = set(getattr(model, "_no_split_modules", None) or ())
    input_weight = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    owners: dict[int, str] = {}
    result: list[Module] = []
    layer_index = 0

    def unit(name: str, module: torch.nn.Module) -> None:
        nonlocal layer_index
        kind = _kind(module, no_split, out)
        layer = None
        if kind is Kind.layer:
            layer, layer_index = layer_index, layer_index + 1
        tied_to = None
        linears: list[Linear] = []
        other = 0
        for _, param in module.named_parameters(remove_duplicate=False):
            if id(param) in owners:
                tied_to = owners[id(param)]
                continue
            owners[id(param)] = name
            if param.dtype is torch.float32:  # kept in float32 (_keep_in_fp32_modules_strict)
                linears.append(Linear(param.numel(), 1, quantizable=False, fp32=True))
            else:
                other += param.numel()
        for sub in module.modules():
            shape = _linear_shape(sub)
            weight: Any = getattr(sub, "weight", None)
            bias: Any = getattr(sub, "bias", None)
            if (
                shape
                and weight is not input_weight
                and weight.dtype is not torch.float32
                and owners.get(id(weight)) == name
                and kind is not Kind.head
            ):
                linears.append(Linear(*shape, bias is not None))
                other -= weight.numel() + (bias.numel() if bias is not None else 0)
        buffers = [b for b in module.buffers() if b.dtype is not torch.bfloat16]  # their own dtype
        result.append(
            Module(
                name,
                kind,
                tuple(linears),
                other_params=other,
                buffer_bytes=sum(b.numel() * b.element_size() for b in buffers),
                dtype_buffers=sum(b.numel() for b in module.buffers() if b.dtype is torch.bfloat16),
                layer=layer,
                tied_to=tied_to if not other and not linears else None,
            )
        )

    def visit(name: str, module: torch.nn.Module) -> None:
        children = list(module.named_children())
        if type(module).__name__ in no_split or not children:
            unit(name, module)
            return
        prefix = f"{name}." if name else ""
        for tensor_name, param in module.named_parameters(recurse=False):
            owners[id(param)] = prefix + tensor_name
            result.append(Module(prefix + tensor_name, Kind.norm, other_params=param.numel()))
        for child_name, child in children:
            visit(prefix + child_name, child)
        for tensor_name, buffer in module.named_buffers(recurse=False):
            if buffer.dtype is torch.bfloat16:  # created in the model dtype
                result.append(Module(prefix + tensor_name, Kind.rotary, dtype_buffers=buffer.numel()))
            else:
                size = buffer.numel() * buffer.element_size()
                result.append(Module(prefix + tensor_name, Kind.rotary, buffer_bytes=size))

    visit("", model)
    return [m for m in result if m.params or m.buffer_bytes or m.dtype_buffers or m.tied_to]


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

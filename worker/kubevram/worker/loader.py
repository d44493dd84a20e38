"""Loading the model exactly as planned: a :class:`WorkerPlan` becomes ``from_pretrained`` arguments.

``deviceMap`` and ``maxMemory`` pass to transformers/accelerate unchanged (``maxMemory``'s ``"0"`` keys
become the integer GPU indices accelerate wants); the weights' precision becomes ``dtype`` or, for
int8/int4, a bitsandbytes ``BitsAndBytesConfig`` (LLM.int8, NF4), refused at start-up with one clear
line where bitsandbytes cannot be imported. A pre-quantized checkpoint (a ``quantization_config`` in its
``config.json``: fp8, AWQ, GPTQ, bitsandbytes, compressed-tensors) loads as transformers loads it: its
own quantization applies and the plan's precision only sets the dtype of the other layers. Without a
plan the worker runs on what it finds: every GPU with ``device_map="auto"``, else the CPU in float32.

A pod of a multi-node group (``plan.group``) loads its rank's share with transformers' own parallelism,
``DistributedConfig(tp_size, pp_size)`` (no device map: a rank's modules go to its GPU), after two small
patches where transformers 5.24 does not do what the plan says (:func:`patch_for_group`): the pipeline
stages take the plan's layer boundaries instead of an even split by count, and the tensor-parallel plan
is applied to the modules a stage keeps (transformers resolves it on the whole model, then pipeline
parallelism replaces the layers a stage does not own, and the lookup of those fails with a KeyError).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from kubevram.api.v1alpha1 import ChineseSpec
from kubevram.api.workerplan import DEFAULT_OFFLOAD_FOLDER, WorkerPlan
from kubevram.worker.logits import TokenClasses, parse_ranges, token_classes

log = logging.getLogger(__name__)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    eos_token_ids: list[int]
    token_classes: TokenClasses
    seconds: float


class LoadError(RuntimeError):
    """The model cannot be loaded as planned here (a missing library, an unusable precision)."""


def require_bitsandbytes(weights: str) -> None:
    """``LoadError`` when bitsandbytes, which int8/int4 weights need, cannot be imported here."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # an ImportError, or a library that fails to initialise
        reason = " ".join(str(exc).split())[:200]
        raise LoadError(
            f"precision.weights {weights} needs bitsandbytes, which cannot be imported here ({reason}): "
            f"run an image built with the worker extra (pip install 'kubevram[worker]'), or plan bfloat16"
        ) from None


def patch_for_group(stages: list[tuple[int, int]], tensor_parallel: int) -> None:
    """Make transformers' pipeline stages the plan's (``stages``: decoder layers ``[first, end)`` per
    stage) and, with tensor parallel too, shard only the modules a stage keeps."""
    from transformers.distributed import mixin, pipeline_parallel

    def layer_range_for_rank(self: Any, rank: int, num_layers: int) -> tuple[int, int]:
        if stages[-1][1] != num_layers:
            raise LoadError(f"the plan's stages cover {stages[-1][1]} layers, the model has {num_layers}")
        return stages[rank]

    setattr(pipeline_parallel.PipelineStage, "layer_range_for_rank", layer_range_for_rank)  # noqa: B010
    if tensor_parallel > 1 and len(stages) > 1 and not getattr(mixin, "_kubevram_patched", False):
        apply = mixin.apply_tensor_parallelism
        identity = pipeline_parallel.PipelineIdentityLayer

        def apply_kept(model: Any, mesh: Any, plan: dict[str, str]) -> Any:
            modules, params = dict(model.named_modules()), dict(model.named_parameters())
            kept = {k: v for k, v in plan.items()
                    if k in params or (k in modules and not isinstance(modules[k], identity))}
            return apply(model, mesh, kept)

        setattr(mixin, "apply_tensor_parallelism", apply_kept)  # noqa: B010
        setattr(mixin, "_kubevram_patched", True)  # noqa: B010


def from_pretrained_kwargs(
    plan: WorkerPlan | None, *, cuda: bool | None = None, prequantized: bool = False
) -> dict[str, Any]:
    """The keyword arguments of ``AutoModelForCausalLM.from_pretrained`` for ``plan``.

    ``prequantized``: the checkpoint carries its own ``quantization_config``, which transformers applies;
    no second quantization is asked for (int8/int4 keep float16 as the dtype of the other layers).
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if plan is None:
        if cuda:
            return {"dtype": "auto", "device_map": "auto"}
        return {"dtype": torch.float32}
    kwargs: dict[str, Any] = {"trust_remote_code": plan.model.trustRemoteCode}
    weights = str(plan.precision.weights)
    if weights in _DTYPES:
        kwargs["dtype"] = _DTYPES[weights]
    elif prequantized:
        require_bitsandbytes(weights)
        kwargs["dtype"] = torch.float16
    else:
        require_bitsandbytes(weights)
        from transformers import BitsAndBytesConfig

        kwargs["dtype"] = torch.float16
        if weights == "int8":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16
            )
    if plan.group is not None:
        from transformers.distributed import DistributedConfig

        group = plan.group
        kwargs["distributed_config"] = DistributedConfig(
            tp_size=group.tensorParallel, pp_size=group.pipelineParallel
        )
    elif plan.deviceMap is not None:
        kwargs["device_map"] = dict(plan.deviceMap)
    elif cuda:
        kwargs["device_map"] = "auto"
    if plan.maxMemory is not None:
        kwargs["max_memory"] = plan.accelerate_max_memory()
    offloads_to_disk = plan.deviceMap is not None and "disk" in plan.deviceMap.values()
    if plan.offloadFolder or offloads_to_disk:
        kwargs["offload_folder"] = plan.offloadFolder or DEFAULT_OFFLOAD_FOLDER
    return kwargs


def _describe(kwargs: dict[str, Any]) -> str:
    parts = [f"dtype={kwargs.get('dtype')}"]
    device_map = kwargs.get("device_map")
    if isinstance(device_map, dict):
        counts: dict[str, int] = {}
        for device in device_map.values():
            counts[str(device)] = counts.get(str(device), 0) + 1
        parts.append("device_map=" + ", ".join(f"{n} modules on {d}" for d, n in sorted(counts.items())))
    elif device_map is not None:
        parts.append(f"device_map={device_map}")
    if kwargs.get("max_memory"):
        parts.append(
            "max_memory=" + ", ".join(f"{k}: {v / 2**30:.2f} GiB" for k, v in kwargs["max_memory"].items())
        )
    if "quantization_config" in kwargs:
        parts.append(f"quantization={type(kwargs['quantization_config']).__name__}")
    if "offload_folder" in kwargs:
        parts.append(f"offload_folder={kwargs['offload_folder']}")
    config = kwargs.get("distributed_config")
    if config is not None:
        parts.append(f"tensor parallel {config.tp_size} x {config.pp_size} pipeline stages")
    return "; ".join(parts)


def is_prequantized(model_id: str, plan: WorkerPlan | None) -> bool:
    """Whether the checkpoint's ``config.json`` carries a ``quantization_config``."""
    if plan is None:
        return False
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_id, trust_remote_code=plan.model.trustRemoteCode)
    return getattr(config, "quantization_config", None) is not None


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends generation: the generation config's, the model config's and the tokenizer's."""
    found: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list | tuple):
            found.update(int(v) for v in value)
    return sorted(found)


def load_weights(model_id: str, plan: WorkerPlan | None) -> Any:
    """The model as ``plan`` says (``from_pretrained`` with :func:`from_pretrained_kwargs`), in eval
    mode, logged: at start-up, and again when a worker wakes from sleep level 2."""
    from transformers import AutoModelForCausalLM

    start = time.monotonic()
    kwargs = from_pretrained_kwargs(plan, prequantized=is_prequantized(model_id, plan))
    log.info("loading weights from %s: %s", model_id, _describe(kwargs))
    model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    placed = getattr(model, "hf_device_map", None)
    log.info(
        "weights loaded in %.1f s: %d parameters, %.1f MiB%s",
        time.monotonic() - start,
        params,
        model.get_memory_footprint() / 2**20,
        f", {len(placed)} modules placed by the device map" if placed else f" on {model.device}",
    )
    return model


def load(
    model_id: str, plan: WorkerPlan | None, chinese: ChineseSpec | None = None, group: Any = None
) -> LoadedModel:
    """Load tokenizer and model as ``plan`` says, logging each stage; compute the steering token sets.
    ``group`` (a joined :class:`kubevram.worker.group.Group`): this rank's share of a multi-node replica."""
    from transformers import AutoTokenizer

    start = time.monotonic()
    if plan is not None and plan.group is not None:
        if group is None:
            raise LoadError("the plan is a multi-node group's: join the group before loading")
        patch_for_group([(s.layers[0], s.layers[1]) for s in plan.group.stages], plan.group.tensorParallel)
    trust = bool(plan.model.trustRemoteCode) if plan is not None else False
    log.info("loading tokenizer from %s", model_id)
    tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust)
    model = load_weights(model_id, plan)
    eos = eos_ids(model, tokenizer)
    head = getattr(model.get_output_embeddings(), "weight", None)  # a pipeline stage may hold no head
    vocab = int(head.shape[0]) if head is not None else int(model.config.get_text_config().vocab_size)
    ranges = parse_ranges((chinese or ChineseSpec()).ranges)
    t0 = time.monotonic()
    classes = token_classes(tokenizer, vocab, eos, ranges)
    log.info(
        "steering token sets: %d CJK, %d punctuation, %d EOS of %d tokens (%.2f s)",
        int(classes.cjk.sum()),
        int(classes.punctuation.sum()),
        int(classes.eos.sum()),
        vocab,
        time.monotonic() - t0,
    )
    return LoadedModel(model, tokenizer, eos, classes, time.monotonic() - start)

"""One replica over a group of pods: pipeline stages across the pods, tensor parallel over each pod's GPUs.

``plan_group(facts, workload, device_bytes, pods, gpus_per_pod)`` answers whether ``pods`` pods of
``gpus_per_pod`` GPUs of ``device_bytes`` each hold one replica, and how: the layout (tensor-parallel size
``tp``, pipeline stages ``pp``; ``pods x gpus_per_pod = tp x pp`` ranks, one per GPU), the decoder layers of
each stage, and what every rank holds, in bytes. It is what the worker runs: transformers'
``DistributedConfig(tp_size=tp, pp_size=pp)`` with the stage boundaries of the plan.

Ranks follow transformers' device mesh ``(pp, tp)`` with ``tp`` innermost, and LeaderWorkerSet's pod
order: rank ``pod x gpus_per_pod + local GPU``; stage ``rank // tp``, tensor-parallel rank ``rank % tp``.
Rank 0 (pod 0, the leader) admits the requests.

Layout: tensor parallel over the GPUs of a pod (``tp = gpus_per_pod``, ``pp = pods``) where the family's
transformers tp_plan shards every Linear of a decoder block colwise/rowwise (``Family.tensor_parallel``,
``Linear.split``), for pod sizes that divide the attention heads and the KV heads (others are not offered:
a pure pipeline of one GPU per stage would serve such a model far slower); families whose blocks cannot be
sharded by heads (mixtures of experts, MLA, gathered q/k/v) run one pipeline stage per GPU (``tp = 1``,
``pp = pods x gpus_per_pod``). Groups need a family transformers' pipeline parallelism
can split (``Family.pipeline``) and float weights (no bitsandbytes, no pre-quantized checkpoint).

What rank ``(stage s, tensor rank r)`` holds:

* **weights**: its share of every module of its stage. A stage holds contiguous decoder layers (at least
  one); the first also the embeddings, the last the final norm and the head, and with a tied head the
  embedding too (transformers keeps ``embed_tokens`` on the last stage to tie ``lm_head``); every stage
  the rotary buffers. Under tensor parallel a ``col`` Linear keeps a chunk of its output features (weight
  and bias), a ``row`` Linear a chunk of its input features (its bias whole), the embedding and the head
  a chunk of the vocabulary; norms and buffers stay whole. Chunks are ``torch.chunk``'s, as DTensor's
  ``Shard`` cuts them: ``ceil(n / tp)`` each, the last ones shorter.
* **KV cache**: the layers of its stage (``estimate.layer_kv_bytes``), its ``1 / tp`` share of the KV heads.
* **activations**: the larger of a decoder block's workspace with its share of the heads and of the MLP
  width (``estimate.layer_activation_bytes`` of the sharded shape), and the logits workspace: every rank
  receives the full logits of a step (the head gathers them, the last stage broadcasts them) and samples
  (rank 0's draw is what every rank keeps), the last stage also computes them from the final norm over
  the prefill (``estimate.head_activation_bytes``, plus its local vocabulary shard before the gather).
* **communication**: NCCL's buffers, ``spec.estimation.communicationPerGPU`` per rank.
* **overhead** (CUDA context) and **fragmentation** as on one GPU (``estimate.gpu_breakdown``).

Stages are balanced: the boundaries minimise the largest rank's total (bisection on that total, then a
greedy fill, which is optimal for costs that only grow with a stage's layers).

How the ranks add up to the single-GPU estimate (``Estimate``), exactly:

* ``sum(weights) = weightsBytes + replicatedWeightsBytes``: every byte of the model is on exactly one rank
  except the copies of tensors several ranks hold whole (norms, rotary buffers and row-parallel biases on
  every tensor rank, rotary buffers on every stage, a tied embedding on the first and last stage);
  ``replicatedWeightsBytes`` is the bytes of those extra copies;
* ``sum(kvCache) = sum of layer_kv_bytes over the layers``: that is ``kvCacheBytes`` when every layer holds
  the same tokens at its peak (no mix of full and sliding layers); with a mix, each layer's own peak may
  fall at another moment and the sum passes ``kvCacheBytes`` by at most one token per full layer;
* ``activations``, ``communication``, ``overhead`` and ``fragmentation`` are per device, as
  ``overheadBytesPerGPU`` is: each rank holds its own, none is a share of a replica-wide figure.

Pure: plain data in, plain data out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from kubevram.planner.estimate import (
    SAMPLER_BYTES_PER_LOGIT,
    Workload,
    attention_mask_bytes,
    head_activation_bytes,
    layer_activation_bytes,
    layer_kv_bytes,
    weights_bytes,
)
from kubevram.planner.facts import ModelFacts
from kubevram.planner.families import FAMILIES
from kubevram.planner.modules import COMPUTE_DTYPE, FLOAT_BYTES, Kind, Linear, Module, model_modules

_BISECT_STEPS = 64


@dataclass(frozen=True)
class Layout:
    """``pods`` pods of ``gpus_per_pod`` GPUs: ``tp``-way tensor parallel, ``pp`` pipeline stages."""

    pods: int
    gpus_per_pod: int
    tp: int

    @property
    def world(self) -> int:
        return self.pods * self.gpus_per_pod

    @property
    def pp(self) -> int:
        return self.world // self.tp

    def place(self, rank: int) -> tuple[int, int, int, int]:
        """(pod, pod-local GPU, stage, tensor-parallel rank) of ``rank``."""
        return rank // self.gpus_per_pod, rank % self.gpus_per_pod, rank // self.tp, rank % self.tp


@dataclass(frozen=True)
class Stage:
    index: int
    layers: tuple[int, int]  # decoder layers [first, end)
    modules: tuple[str, ...]  # top-level modules it holds (whole or a tensor-parallel share)
    ends: tuple[str, ...] = ()  # those besides its decoder layers and the rotary buffers: embeddings, head


@dataclass(frozen=True)
class Rank:
    rank: int
    pod: int
    gpu: int  # pod-local GPU index
    stage: int
    tp_rank: int
    budget: dict[str, int]  # weights, kvCache, activations, communication, overhead, fragmentation, total

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "pod": self.pod, "gpu": self.gpu, "stage": self.stage,
                "tpRank": self.tp_rank, **self.budget}


@dataclass(frozen=True)
class GroupPlan:
    layout: Layout
    stages: tuple[Stage, ...]
    ranks: tuple[Rank, ...]
    replicated_weights: int  # bytes of the extra copies of tensors several ranks hold whole

    @property
    def peak(self) -> int:
        return max(r.budget["total"] for r in self.ranks)

    def pod_budgets(self, pod: int) -> list[dict[str, int]]:
        """The budgets of one pod's GPUs, by pod-local GPU index."""
        return [dict(r.budget) for r in self.ranks if r.pod == pod]

    def totals(self) -> dict[str, int]:
        keys = self.ranks[0].budget.keys()
        out = {k: sum(r.budget[k] for r in self.ranks) for k in keys}
        out["replicatedWeights"] = self.replicated_weights
        return out

    def to_json(self) -> dict[str, Any]:
        lay = self.layout
        return {
            "size": lay.pods,
            "gpusPerPod": lay.gpus_per_pod,
            "tensorParallel": lay.tp,
            "pipelineParallel": lay.pp,
            "worldSize": lay.world,
            "stages": [
                {"stage": s.index, "layers": list(s.layers), "ends": list(s.ends)} for s in self.stages
            ],
            "ranks": [r.to_json() for r in self.ranks],
            "totals": self.totals(),
        }


def chunk(n: int, parts: int, index: int) -> int:
    """Size of part ``index`` of ``n`` cut in ``parts`` as ``torch.chunk`` (and DTensor's ``Shard``) cuts:
    ``ceil(n / parts)`` each, the last ones shorter or empty."""
    size = -(-n // parts)
    return max(0, min(size, n - index * size))


def why_no_group(facts: ModelFacts, workload: Workload) -> str:
    """Empty when the model can run as a group of pods, else why not (naming the field)."""
    fam = FAMILIES.get(facts.family)
    if fam is None or not fam.pipeline:
        return (f"spec.placement.multiNode: model_type {facts.model_type!r} cannot be split into pipeline "
                "stages by transformers (it needs model.embed_tokens, model.layers, model.norm and lm_head)")
    if workload.weights not in FLOAT_BYTES or facts.quantization is not None:
        return (f"spec.placement.multiNode: weights {workload.weights!r}"
                f"{' (pre-quantized)' if facts.quantization is not None else ''} run on one node only; "
                "groups load float32, float16 or bfloat16 weights")
    if facts.num_layers < 2:
        return "spec.placement.multiNode: one decoder layer cannot be split into stages"
    return ""


def tensor_parallel_capable(facts: ModelFacts) -> bool:
    """Whether transformers' tp_plan shards every Linear of the model's decoder blocks by heads."""
    fam = FAMILIES.get(facts.family)
    if fam is None or not fam.tensor_parallel:
        return False
    layers = [m for m in model_modules(facts) if m.kind is Kind.layer]
    return all(lin.split for m in layers for lin in m.linears)


def layout_for(facts: ModelFacts, pods: int, gpus_per_pod: int) -> Layout | None:
    """Tensor parallel over each pod's GPUs (``tp`` must divide the attention and KV heads); for families
    whose blocks transformers cannot shard by heads, one pipeline stage per GPU. None: no such layout."""
    if not tensor_parallel_capable(facts):
        return Layout(pods, gpus_per_pod, 1)
    if facts.num_attention_heads % gpus_per_pod or facts.cache_heads % gpus_per_pod:
        return None
    return Layout(pods, gpus_per_pod, gpus_per_pod)


# --------------------------------------------------------------------------------------------------
# What one rank holds


def _linear_share(lin: Linear, tp: int, r: int) -> Linear:
    if lin.split == "col":
        return replace(lin, out_features=chunk(lin.out_features, tp, r))
    if lin.split == "row":
        return replace(lin, in_features=chunk(lin.in_features, tp, r))
    return lin


def module_share_bytes(module: Module, precision: str, tp: int, r: int, vocab: int) -> int:
    """Bytes tensor rank ``r`` of ``tp`` holds of ``module``."""
    if tp == 1:
        return module.weight_bytes(precision)
    dt = FLOAT_BYTES[COMPUTE_DTYPE[precision]]
    if module.kind in (Kind.embedding, Kind.head) and module.other_params:
        per_row = module.other_params // vocab  # hidden (+1 for a head bias)
        own = chunk(vocab, tp, r) * per_row + module.dtype_buffers
        return own * dt + module.buffer_bytes
    linear = sum(_linear_share(lin, tp, r).bytes(precision) for lin in module.linears)
    return linear + (module.other_params + module.dtype_buffers) * dt + module.buffer_bytes


@dataclass(frozen=True)
class _Ranks:
    """Per tensor rank: prefix sums of layer weights and KV; the fixed parts of each kind of stage."""

    layer_weights: tuple[tuple[int, ...], ...]  # [r][k]: weights of layers [0, k)
    layer_kv: tuple[int, ...]  # [k]: KV of layers [0, k), one tensor rank's share
    first: tuple[int, ...]  # [r]: modules before the first layer
    last: tuple[int, ...]  # [r]: modules after the last layer (norm, head)
    tied: tuple[int, ...]  # [r]: the embedding a tied head uses, held again by the last of several stages
    everywhere: int  # rotary buffers: every stage
    block_act: int
    head_act: tuple[int, ...]  # [r]: the last stage's logits workspace
    logits_act: int  # every other rank's logits workspace
    floor: int  # the residual stream passing through


@lru_cache(maxsize=256)
def _ranks(facts: ModelFacts, workload: Workload, tp: int) -> _Ranks:
    modules = model_modules(facts)
    precision = workload.weights
    vocab = facts.vocab_size
    layer_mods = [m for m in modules if m.kind is Kind.layer]
    first_layer = modules.index(layer_mods[0])
    last_layer = modules.index(layer_mods[-1])
    by_name = {m.name: m for m in modules}

    def share(m: Module, r: int) -> int:
        return module_share_bytes(m, precision, tp, r, vocab)

    rotary = [m for m in modules if m.kind is Kind.rotary]
    lead = [m for m in modules[:first_layer] if m.kind is not Kind.rotary]
    trail = [m for m in modules[last_layer + 1:] if m.kind is not Kind.rotary]
    tied = [by_name[m.tied_to] for m in trail if m.tied_to in by_name]
    layer_weights = []
    for r in range(tp):
        sums = [0]
        for m in layer_mods:
            sums.append(sums[-1] + share(m, r))
        layer_weights.append(tuple(sums))
    kv = [0]
    for m in layer_mods:
        assert m.layer is not None
        kv.append(kv[-1] + layer_kv_bytes(facts, m.layer, workload) // tp)
    sharded = replace(
        facts,
        num_attention_heads=facts.num_attention_heads // tp,
        num_kv_heads=max(1, facts.num_kv_heads // tp),
        intermediate_size=chunk(facts.intermediate_size, tp, 0),
    )
    dt = workload.compute_bytes
    rows = workload.max_batch_size
    masks = attention_mask_bytes(facts, workload)
    local_logits = [rows * chunk(vocab, tp, r) * dt if tp > 1 else 0 for r in range(tp)]
    return _Ranks(
        layer_weights=tuple(layer_weights),
        layer_kv=tuple(kv),
        first=tuple(sum(share(m, r) for m in lead) for r in range(tp)),
        last=tuple(sum(share(m, r) for m in trail) for r in range(tp)),
        tied=tuple(sum(share(m, r) for m in tied) for r in range(tp)),
        everywhere=sum(m.weight_bytes(precision) for m in rotary),
        block_act=layer_activation_bytes(sharded, workload),
        head_act=tuple(head_activation_bytes(facts, workload) + extra for extra in local_logits),
        logits_act=rows * vocab * (dt + SAMPLER_BYTES_PER_LOGIT) + masks,
        floor=workload.prefill_tokens * facts.hidden_size * dt,
    )


def _parts(p: _Ranks, stage: int, stages: int, r: int, a: int, b: int) -> tuple[int, int, int]:
    """(weights, KV cache, activations) of tensor rank ``r`` of ``stage`` (of ``stages``), layers
    ``[a, b)``."""
    weights = p.layer_weights[r][b] - p.layer_weights[r][a] + p.everywhere
    if stage == 0:
        weights += p.first[r]
    if stage == stages - 1:
        weights += p.last[r] + (p.tied[r] if stages > 1 else 0)
    act = max(p.block_act if b > a else 0, p.head_act[r] if stage == stages - 1 else p.logits_act, p.floor)
    return weights, p.layer_kv[b] - p.layer_kv[a], act


def _budget(p: _Ranks, workload: Workload, stage: int, stages: int, r: int, a: int, b: int) -> dict[str, int]:
    weights, kv, act = _parts(p, stage, stages, r, a, b)
    frag = int((kv + act) * workload.fragmentation)
    comm, overhead = workload.communication_per_gpu, workload.overhead_per_gpu
    return {
        "weights": weights,
        "kvCache": kv,
        "activations": act,
        "communication": comm,
        "overhead": overhead,
        "fragmentation": frag,
        "total": weights + kv + act + comm + overhead + frag,
    }


def _stage_cost(p: _Ranks, workload: Workload, stage: int, stages: int, a: int, b: int) -> int:
    """The largest total of the stage's tensor ranks: rank 0's, whose chunks are the largest."""
    weights, kv, act = _parts(p, stage, stages, 0, a, b)
    fixed = workload.communication_per_gpu + workload.overhead_per_gpu
    return weights + kv + act + fixed + int((kv + act) * workload.fragmentation)


def _fill(p: _Ranks, workload: Workload, layout: Layout, layers: int, cap: int) -> list[int] | None:
    """Greedy: each stage takes the most layers under ``cap`` (leaving one for each stage after it)."""
    stages = layout.pp
    bounds = [0]
    a = 0
    for s in range(stages):
        hi = layers if s == stages - 1 else layers - (stages - 1 - s)
        lo = a + 1
        if lo > hi or _stage_cost(p, workload, s, stages, a, lo) > cap:
            return None
        if s == stages - 1:
            if _stage_cost(p, workload, s, stages, a, layers) > cap:
                return None
            lo = layers
        else:
            while lo < hi:  # the largest b in [lo, hi] within cap
                mid = (lo + hi + 1) // 2
                if _stage_cost(p, workload, s, stages, a, mid) <= cap:
                    lo = mid
                else:
                    hi = mid - 1
        bounds.append(lo)
        a = lo
    return bounds


def plan_group(
    facts: ModelFacts, workload: Workload, device_bytes: int, pods: int, gpus_per_pod: int
) -> GroupPlan | None:
    """The group plan of one replica on ``pods`` pods of ``gpus_per_pod`` GPUs of ``device_bytes`` each,
    or None when it does not fit (or the model cannot run as a group: ``why_no_group``)."""
    if pods < 1 or gpus_per_pod < 1 or pods * gpus_per_pod < 2 or why_no_group(facts, workload):
        return None
    layout = layout_for(facts, pods, gpus_per_pod)
    return None if layout is None else _plan_group(facts, workload, device_bytes, layout)


@lru_cache(maxsize=1024)
def _plan_group(facts: ModelFacts, workload: Workload, device_bytes: int, layout: Layout) -> GroupPlan | None:
    layers = facts.num_layers
    if layout.pp > layers:
        return None
    p = _ranks(facts, workload, layout.tp)
    if _fill(p, workload, layout, layers, device_bytes) is None:
        return None
    lo, hi = 0, device_bytes  # the smallest peak with which every stage fits
    for _ in range(_BISECT_STEPS):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        if _fill(p, workload, layout, layers, mid) is None:
            lo = mid
        else:
            hi = mid
    bounds = _fill(p, workload, layout, layers, hi)
    assert bounds is not None
    return _result(facts, workload, layout, p, bounds)


def _result(facts: ModelFacts, workload: Workload, layout: Layout, p: _Ranks, bounds: list[int]) -> GroupPlan:
    modules = model_modules(facts)
    layer_names = [m.name for m in modules if m.kind is Kind.layer]
    first = modules.index(next(m for m in modules if m.kind is Kind.layer))
    last = max(i for i, m in enumerate(modules) if m.kind is Kind.layer)
    by_name = {m.name: m for m in modules}
    rotary = [m.name for m in modules if m.kind is Kind.rotary]
    lead = [m.name for m in modules[:first] if m.kind is not Kind.rotary]
    trail = [m.name for m in modules[last + 1:] if m.kind is not Kind.rotary]
    tied = [by_name[n].tied_to for n in trail if by_name[n].tied_to]
    stages = []
    for s in range(layout.pp):
        a, b = bounds[s], bounds[s + 1]
        ends = lead if s == 0 else []
        if s == layout.pp - 1:
            ends = ends + [n for n in tied if n and n not in ends] + trail
        stages.append(Stage(s, (a, b), tuple(layer_names[a:b] + rotary + ends), tuple(ends)))
    ranks = []
    for rank in range(layout.world):
        pod, gpu, stage, r = layout.place(rank)
        a, b = bounds[stage], bounds[stage + 1]
        budget = _budget(p, workload, stage, layout.pp, r, a, b)
        ranks.append(Rank(rank, pod, gpu, stage, r, budget))
    whole = weights_bytes(modules, workload.weights)
    replicated = sum(r.budget["weights"] for r in ranks) - whole
    return GroupPlan(layout, tuple(stages), tuple(ranks), replicated)


__all__ = [
    "GroupPlan",
    "Layout",
    "Rank",
    "Stage",
    "chunk",
    "layout_for",
    "module_share_bytes",
    "plan_group",
    "tensor_parallel_capable",
    "why_no_group",
]

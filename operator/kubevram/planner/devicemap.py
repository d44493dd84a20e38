"""Device maps and per-GPU memory budgets for one replica, without torch.

``plan_replica(facts, workload, gpus, ...)`` answers: given the free bytes of the candidate GPUs of one
node, which GPUs a replica uses, the ``device_map`` (top-level module name -> pod-local GPU index,
``"cpu"`` or ``"disk"``) and the ``max_memory`` that transformers/accelerate load as they are, sized so
that nothing runs out of memory at ``maxSequenceLength x maxBatchSize``. When it does not fit, a
``NoFit`` with the numbers (bytes needed per GPU for 1..8 GPUs, what would fit instead).

What one GPU must hold (``estimate.gpu_bytes_for``): the weights of its modules, the KV cache of exactly
its decoder layers, the activation workspace (a decoder block's, or the head's where the logits are
computed), the CUDA context and the allocator headroom. accelerate's ``infer_auto_device_map`` budgets
weights only and reserves room for the largest layer on GPU 0 only; kubevram budgets what will really
live on each GPU.

Units that are never split: a decoder block (transformers' ``_no_split_modules``) and every other
top-level module. A tied output head (``lm_head`` sharing the input embedding's weight) goes where its
embedding goes, as accelerate's ``infer_auto_device_map`` does (it places the tied modules together and
counts the shared weight once), so its logits workspace is budgeted on that GPU.

Strategies (seed 001), all contiguous in forward order:

* ``sequential``: fill GPU 0, then 1, ... each up to its free bytes.
* ``balanced``: the smallest common load fraction ``f`` such that GPU ``i`` holds at most
  ``f x free_i`` (even load on equal GPUs, proportional on uneven ones), then fill in order.
* ``balanced_low_0``: GPU 0 keeps as little as it can (the leading embedding, and with it a tied head,
  plus the generation workspace); the rest is balanced over GPUs 1..n-1 (the seed's BLOOM-176B recipe of
  a lighter GPU 0). If GPUs 1..n-1 cannot hold the rest, GPU 0 takes the fewest extra blocks needed.

Every GPU a plan uses holds at most its free bytes, its idle cost (CUDA context, the residual stream)
included; a GPU that cannot even hold that is not used.

Offload (only when ``offload`` allows it): a suffix of the model goes to ``"cpu"`` (within ``cpu_bytes``)
and then ``"disk"`` (within ``disk_bytes``; 0 = not bounded). accelerate executes offloaded modules on the
main GPU (the first GPU of the map, which always holds the first module): that GPU also holds the KV
cache of every offloaded layer, the largest offloaded block while it is streamed in, the buffers of the
offloaded modules and the logits workspace if the head is offloaded.

``max_memory`` semantics: per device, the budget that makes accelerate's ``infer_auto_device_map`` (same
module sizes, decoder blocks not split) reproduce exactly this ``device_map``: the weight bytes on that
device, plus, on the main GPU ``"0"`` and on ``"cpu"``, the room accelerate insists on keeping there for
the largest layer still to be placed. The worker passes ``device_map`` explicitly; ``max_memory`` then
only bounds what accelerate may put on each device, never the KV cache (that is in ``per_gpu``).
JSON keys are strings (``"0"``); ``accelerate_max_memory`` turns them into accelerate's int keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from kubevram.api.errors import SpecError
from kubevram.api.quantity import format_bytes
from kubevram.api.workerplan import DEFAULT_OFFLOAD_FOLDER
from kubevram.planner.estimate import Workload, gpu_breakdown, gpu_bytes_for, layer_kv_bytes
from kubevram.planner.facts import ModelFacts
from kubevram.planner.modules import Kind, Module, model_modules

STRATEGIES = ("balanced", "balanced_low_0", "sequential")
OFFLOADS = ("none", "cpu", "disk")
NEEDED_UP_TO = 8  # NoFit.needed_per_gpu covers 1..8 GPUs
_BISECT_STEPS = 60
_BISECT_TOLERANCE = 1e-5  # of the load fraction: about 0.8 MiB on an 80 GiB GPU


@dataclass(frozen=True)
class ReplicaPlan:
    """Where one replica's modules live and what each device must hold (bytes)."""

    gpu_indices: tuple[int, ...]  # which entries of ``gpus`` the replica uses, in pod-local order
    max_memory: dict[str, int]
    device_map: dict[str, int | str]
    per_gpu: list[dict[str, int]]
    offload_folder: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "maxMemory": dict(self.max_memory),
            "deviceMap": dict(self.device_map),
            "perGpu": [dict(g) for g in self.per_gpu],
            "offloadFolder": self.offload_folder,
        }


@dataclass(frozen=True)
class NoFit:
    """Why a replica does not fit, with the numbers an operator (and the autoscaler) can act on."""

    reason: str
    needed_per_gpu: dict[int, int] = field(default_factory=dict)  # n GPUs -> bytes each GPU needs
    suggestions: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "neededPerGpu": {str(n): b for n, b in self.needed_per_gpu.items()},
            "suggestions": list(self.suggestions),
        }


# --------------------------------------------------------------------------------------------------
# The model as a row of units with prefix sums: the cost of any contiguous run of units is O(1).


@dataclass(frozen=True)
class _Model:
    modules: tuple[Module, ...]
    units: tuple[tuple[int, ...], ...]  # module indices per unit, forward order
    weights: tuple[int, ...]  # prefix sums over units (len = units + 1)
    kv: tuple[int, ...]
    layers: tuple[int, ...]
    unit_weights: tuple[int, ...]
    unit_buffers: tuple[int, ...]  # buffers stay on the execution (main) GPU when their module is offloaded
    unit_kv: tuple[int, ...]
    head_unit: int  # unit holding the output head (-1: none)
    leading: int  # units before the first decoder block (embeddings, ChatGLM2's rotary)
    act: dict[tuple[bool, bool], int]  # (holds a decoder block, computes the logits) -> workspace
    overhead: int
    fragmentation: float

    def cost(
        self, a: int, b: int, *, head: bool | None = None, extra_kv: int = 0, extra_weights: int = 0
    ) -> int:
        """Total bytes of a GPU holding units ``[a, b)``, plus offload extras."""
        weights = self.weights[b] - self.weights[a] + extra_weights
        kv = self.kv[b] - self.kv[a] + extra_kv
        has_layer = self.layers[b] > self.layers[a] or extra_kv > 0
        with_head = (a <= self.head_unit < b) if head is None else head
        act = self.act[(has_layer, with_head)]
        return weights + kv + act + self.overhead + int((kv + act) * self.fragmentation)

    def breakdown(self, a: int, b: int, *, head: bool | None = None, extra_kv: int = 0) -> dict[str, int]:
        """``estimate.gpu_bytes_for`` of the modules of units ``[a, b)`` (plus the KV cache of offloaded
        layers), from the prefix sums; the tests check it against ``gpu_bytes_for`` itself."""
        weights = self.weights[b] - self.weights[a]
        kv = self.kv[b] - self.kv[a] + extra_kv
        has_layer = self.layers[b] > self.layers[a] or extra_kv > 0
        act = self.act[(has_layer, (a <= self.head_unit < b) if head is None else head)]
        return gpu_breakdown(weights, kv, act, self.overhead, self.fragmentation)


@lru_cache(maxsize=256)
def _model(facts: ModelFacts, workload: Workload) -> _Model:
    modules = tuple(model_modules(facts))
    index = {m.name: i for i, m in enumerate(modules)}
    tied_to = {i: index[m.tied_to] for i, m in enumerate(modules) if m.tied_to in index}
    tied_heads = set(tied_to)
    units: list[tuple[int, ...]] = []
    for i, _ in enumerate(modules):
        if i in tied_heads:
            continue
        units.append((i, *(h for h, e in tied_to.items() if e == i)))
    unit_w = [sum(modules[i].weight_bytes(workload.weights) for i in u) for u in units]
    unit_kv = [sum(_kv(facts, modules[i], workload) for i in u) for u in units]
    unit_layers = [sum(1 for i in u if modules[i].kind is Kind.layer) for u in units]
    head_unit = next((k for k, u in enumerate(units) if any(modules[i].kind is Kind.head for i in u)), -1)
    leading = next((k for k, n in enumerate(unit_layers) if n), len(units))
    sample_layer = [m for m in modules if m.kind is Kind.layer][:1]
    act = {
        (hl, hh): gpu_bytes_for(facts, sample_layer if hl else [], workload, with_head=hh)["activations"]
        for hl in (False, True)
        for hh in (False, True)
    }
    return _Model(
        modules=modules,
        units=tuple(units),
        weights=_prefix(unit_w),
        kv=_prefix(unit_kv),
        layers=_prefix(unit_layers),
        unit_weights=tuple(unit_w),
        unit_buffers=tuple(sum(modules[i].buffer_bytes for i in u) for u in units),
        unit_kv=tuple(unit_kv),
        head_unit=head_unit,
        leading=leading,
        act=act,
        overhead=workload.overhead_per_gpu,
        fragmentation=workload.fragmentation,
    )


def _kv(facts: ModelFacts, module: Module, workload: Workload) -> int:
    return 0 if module.layer is None else layer_kv_bytes(facts, module.layer, workload)


def _prefix(values: Sequence[int]) -> tuple[int, ...]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# Filling GPUs


@dataclass(frozen=True)
class _Main:
    """What the main GPU (pod index 0) holds for offloaded modules."""

    kv: int = 0
    weights: int = 0  # the largest offloaded unit (streamed in for its forward) + offloaded buffers
    head: bool = False  # the head is offloaded: its logits are computed on the main GPU


_NO_MAIN = _Main()


def _gpu_cost(m: _Model, a: int, b: int, gpu: int, main: _Main) -> int:
    if gpu == 0 and main is not _NO_MAIN:
        head = (a <= m.head_unit < b) or main.head
        return m.cost(a, b, head=head, extra_kv=main.kv, extra_weights=main.weights)
    return m.cost(a, b)


def _fill(
    m: _Model, caps: Sequence[int], start: int, end: int, main: _Main, first_gpu: int = 0
) -> list[int] | None:
    """Greedy: each GPU in turn takes the longest run of units that fits its cap. Returns the boundaries
    (``len(caps) + 1`` unit indices) when units ``[start, end)`` all fit, else None. Greedy is optimal
    for feasibility: the cost of a GPU only grows with the run it holds."""
    bounds = [start]
    a = start
    for k, cap in enumerate(caps):
        gpu = first_gpu + k
        if _gpu_cost(m, a, a, gpu, main) > cap:
            return None  # not even the CUDA context (or what offloaded modules leave on the main GPU)
        a = _fill_upto(m, cap, a, end, gpu, main)  # b == a: this GPU holds nothing
        bounds.append(a)
    return bounds if a >= end else None


def _balanced(
    m: _Model, caps: Sequence[int], start: int, end: int, main: _Main, first_gpu: int = 0
) -> list[int] | None:
    """Even load: the smallest common fraction ``f`` of each cap that still holds units ``[start, end)``;
    then each GPU in turn takes the run closest to its proportional share of what is left, within
    ``f x cap`` and leaving the rest placeable (so the last GPU is not left with the crumbs)."""
    if _fill(m, caps, start, end, main, first_gpu) is None:
        return None
    # bisect on f: a lower bound is the load over the capacity; a feasible fill's own peak is an upper one
    idle = m.act[(False, False)] + m.overhead  # what every GPU of the replica holds at least
    lo = (m.weights[end] - m.weights[start] + m.kv[end] - m.kv[start] + len(caps) * idle) / max(1, sum(caps))
    hi = 1.0
    limits = list(caps)  # the tightest limits a fill has been seen to fit
    for _ in range(_BISECT_STEPS):
        if hi - lo <= _BISECT_TOLERANCE * hi:
            break
        mid = (lo + hi) / 2
        trial = [int(c * mid) for c in caps]
        bounds = _fill(m, trial, start, end, main, first_gpu)
        if bounds is None:
            lo = mid
        else:
            limits = trial
            hi = min(mid, _peak(m, bounds, caps, main, first_gpu))
    earliest = _earliest_starts(m, limits, end)
    bounds = [start]
    a = start
    for k in range(len(limits)):
        b_max = _fill_upto(m, limits[k], a, end, first_gpu + k, main)
        b_lo = max(a, earliest[k + 1])  # the smallest b whose rest still fits the GPUs after this one
        if b_lo > b_max:
            return None
        share = (m.weights[end] - m.weights[a] + m.kv[end] - m.kv[a]) * caps[k] / sum(caps[k:])
        a = min(
            range(b_lo, b_max + 1),
            key=lambda b: abs(m.weights[b] - m.weights[a] + m.kv[b] - m.kv[a] - share),
        )
        bounds.append(a)
    return bounds if a >= end else None


def _fill_upto(m: _Model, cap: int, a: int, end: int, gpu: int, main: _Main) -> int:
    """The largest ``b`` in ``[a, end]`` with ``cost(a, b) <= cap`` (costs grow with ``b``)."""
    lo, hi = a, end
    if gpu == 0 and main is not _NO_MAIN:
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _gpu_cost(m, a, mid, gpu, main) <= cap:
                lo = mid
            else:
                hi = mid - 1
        return lo
    # m.cost inlined: this loop is the planner's hot path
    weights, kv, layers, act, head = m.weights, m.kv, m.layers, m.act, m.head_unit
    fixed, frag = m.overhead, m.fragmentation
    w0, k0, l0 = weights[a], kv[a], layers[a]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        k = kv[mid] - k0
        x = act[(layers[mid] > l0, a <= head < mid)]
        if weights[mid] - w0 + k + x + fixed + int((k + x) * frag) <= cap:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _earliest_starts(m: _Model, limits: Sequence[int], end: int) -> list[int]:
    """``out[k]``: the smallest unit index from which units up to ``end`` fit GPUs ``k..`` under ``limits``
    (a greedy fill from the back; GPUs after the first are never the main GPU)."""
    out = [end] * (len(limits) + 1)
    for k in range(len(limits) - 1, 0, -1):
        b = out[k + 1]
        lo, hi = 0, b  # the smallest a with cost(a, b) <= limit (costs shrink as a grows)
        if m.cost(b, b) > limits[k]:
            return [end + 1] * (len(limits) + 1)  # a GPU that cannot even idle: nothing fits
        while lo < hi:
            mid = (lo + hi) // 2
            if m.cost(mid, b) <= limits[k]:
                hi = mid
            else:
                lo = mid + 1
        out[k] = lo
    out[0] = out[1]
    return out


def _peak(m: _Model, bounds: Sequence[int], caps: Sequence[int], main: _Main, first_gpu: int) -> float:
    """The largest ``cost / cap`` over the GPUs of a fill."""
    return max(
        _gpu_cost(m, bounds[k], bounds[k + 1], first_gpu + k, main) / cap if cap > 0 else 0.0
        for k, cap in enumerate(caps)
    )


def _low_0(m: _Model, caps: Sequence[int], start: int, end: int, main: _Main) -> list[int] | None:
    """GPU 0 keeps the fewest units it can: the leading embeddings, more only if GPUs 1.. cannot hold the
    rest, fewer only if GPU 0 cannot hold them all (as the main GPU of an offload, at least one unit);
    GPUs 1.. are balanced."""
    if len(caps) == 1:
        return _fill(m, caps, start, end, main)
    first = min(max(start, m.leading), end)
    lowest = start if main is _NO_MAIN else start + 1
    candidates = [*range(first, end + 1), *range(first - 1, lowest - 1, -1)]
    for p in candidates:
        if _gpu_cost(m, start, p, 0, main) > caps[0]:
            continue
        rest = _balanced(m, caps[1:], p, end, _NO_MAIN, first_gpu=1)
        if rest is not None:
            return [start, *rest]
    return None


def _place(
    m: _Model, caps: Sequence[int], strategy: str, end: int, main: _Main = _NO_MAIN
) -> list[int] | None:
    if strategy == "sequential":
        return _fill(m, caps, 0, end, main)
    if strategy == "balanced_low_0":
        return _low_0(m, caps, 0, end, main)
    return _balanced(m, caps, 0, end, main)


# --------------------------------------------------------------------------------------------------
# Public API


def min_per_gpu_bytes(facts: ModelFacts, workload: Workload, n: int, strategy: str = "balanced") -> int:
    """The smallest uniform free size per GPU with which ``n`` GPUs hold one replica (no offload).

    On equal GPUs every strategy fits exactly when a sequential fill fits (each one falls back to
    filling GPUs in order), so the answer does not depend on ``strategy``.
    """
    _check(strategy, "none")
    return _min_per_gpu(facts, workload, max(1, n))


@lru_cache(maxsize=4096)
def _min_per_gpu(facts: ModelFacts, workload: Workload, n: int) -> int:
    m = _model(facts, workload)
    end = len(m.units)
    hi = m.cost(0, end)
    lo = max(m.cost(k, k + 1) for k in range(end)) - 1  # the largest single unit: a lower bound
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _fill(m, [mid] * n, 0, end, _NO_MAIN) is None:
            lo = mid
        else:
            hi = mid
    return hi


def plan_replica(
    facts: ModelFacts,
    workload: Workload,
    gpus: Sequence[int],
    *,
    strategy: str = "balanced",
    gpu_count: int = 0,
    offload: str = "none",
    cpu_bytes: int = 0,
    disk_bytes: int = 0,
    offload_folder: str = DEFAULT_OFFLOAD_FOLDER,
) -> ReplicaPlan | NoFit:
    """Plan one replica on candidate GPUs of one node (``gpus``: usable bytes each, in the order they
    would be taken; may be uneven).

    ``gpu_count`` 0 chooses the fewest GPUs that fit: for each count ``n`` from 1 the first ``n`` GPUs
    of the list, else the ``n`` largest (ties in list order); ``gpu_count`` N uses exactly N GPUs chosen
    the same way. Offload to ``cpu`` (then ``disk`` when ``offload == "disk"``) is used only when no
    GPU-only plan fits and ``offload`` allows it.
    """
    _check(strategy, offload)
    m = _model(facts, workload)
    free = [int(g) for g in gpus]
    if gpu_count < 0:
        raise SpecError("spec.placement.gpusPerReplica", f"{gpu_count} is not an integer >= 0")
    if gpu_count > len(free):
        why = f"spec.placement.gpusPerReplica: {gpu_count} GPUs needed, the node has {len(free)} free"
        return _no_fit(facts, workload, free, gpu_count, offload, why)
    counts = [gpu_count] if gpu_count else list(range(1, len(free) + 1))
    end = len(m.units)
    for n in counts:
        for subset in _subsets(free, n):
            bounds = _place(m, [free[i] for i in subset], strategy, end)
            if bounds is not None:
                return _result(m, subset, bounds, end, end, end, _NO_MAIN, None)
    if offload != "none":
        # as many GPUs as can take part (the largest ones), the rest of the model on cpu, then disk
        for n in [gpu_count] if gpu_count else range(len(free), 0, -1):
            subset = _subsets(free, n)[-1]
            caps = [free[i] for i in subset]
            plan = _offload(m, subset, caps, strategy, offload, cpu_bytes, disk_bytes, offload_folder)
            if plan is not None:
                return plan
    return _no_fit(facts, workload, free, gpu_count, offload, None, cpu_bytes=cpu_bytes)


def accelerate_max_memory(max_memory: Mapping[str, int]) -> dict[int | str, int]:
    """``maxMemory`` as accelerate/transformers take it: GPU indices as ints, ``cpu``/``disk`` as they are."""
    return {int(k) if k.isdigit() else k: v for k, v in max_memory.items()}


def _check(strategy: str, offload: str) -> None:
    if strategy not in STRATEGIES:
        raise SpecError("spec.placement.strategy", f"{strategy!r} is not one of {', '.join(STRATEGIES)}")
    if offload not in OFFLOADS:
        raise SpecError("spec.placement.offload", f"{offload!r} is not one of {', '.join(OFFLOADS)}")


def _subsets(free: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """Candidate GPU sets of size ``n``: the first ``n``, then the ``n`` largest (in list order)."""
    prefix = tuple(range(n))
    largest = tuple(sorted(sorted(range(len(free)), key=lambda i: -free[i])[:n]))
    return [prefix] if largest == prefix else [prefix, largest]


def _offload(
    m: _Model,
    subset: tuple[int, ...],
    caps: list[int],
    strategy: str,
    offload: str,
    cpu_bytes: int,
    disk_bytes: int,
    folder: str,
) -> ReplicaPlan | None:
    """Keep the longest prefix of units on the GPUs; the rest on cpu, then disk."""
    end = len(m.units)
    for k in range(end - 1, 0, -1):  # units [k, end) leave the GPUs
        main = _Main(
            kv=m.kv[end] - m.kv[k],
            weights=max(m.unit_weights[k:end]) + sum(m.unit_buffers[k:end]),
            head=k <= m.head_unit,
        )
        bounds = _place(m, caps, strategy, k, main)
        if bounds is not None and bounds[1] == 0:  # the main GPU must hold the first unit
            bounds = _fill(m, caps, 0, k, main)
        if bounds is None or bounds[1] == 0:
            continue
        largest = max(m.unit_weights[k:end])
        # cpu takes the longest run it holds; with disk in use it keeps room to load the largest unit
        cpu_end = k
        while cpu_end < end and m.weights[cpu_end + 1] - m.weights[k] <= cpu_bytes:
            cpu_end += 1
        if cpu_end < end:
            if offload != "disk":
                continue
            while cpu_end > k and m.weights[cpu_end] - m.weights[k] + largest > cpu_bytes:
                cpu_end -= 1
            if disk_bytes and m.weights[end] - m.weights[cpu_end] > disk_bytes:
                continue
        return _result(m, subset, bounds, k, cpu_end, end, main, folder if cpu_end < end else None)
    return None


def _result(
    m: _Model,
    subset: tuple[int, ...],
    bounds: list[int],
    gpu_end: int,
    cpu_end: int,
    end: int,
    main: _Main,
    folder: str | None,
) -> ReplicaPlan:
    device_of_unit: list[int | str] = []
    for g in range(len(subset)):
        device_of_unit += [g] * (bounds[g + 1] - bounds[g])
    device_of_unit += ["cpu"] * (cpu_end - gpu_end) + ["disk"] * (end - cpu_end)
    device_of_module: dict[int, int | str] = {}
    for unit, dev in zip(m.units, device_of_unit, strict=True):
        for i in unit:
            device_of_module[i] = dev
    device_map = {m.modules[i].name: device_of_module[i] for i in range(len(m.modules))}

    per_gpu: list[dict[str, int]] = []
    for g in range(len(subset)):
        a, b = bounds[g], bounds[g + 1]
        if g == 0 and main is not _NO_MAIN:
            part = m.breakdown(a, b, head=(a <= m.head_unit < b) or main.head, extra_kv=main.kv)
            part["offloadBuffer"] = main.weights
            part["total"] += main.weights
        else:
            part = m.breakdown(a, b)
        per_gpu.append(part)

    max_memory = _max_memory(m, device_of_unit, len(subset))
    if gpu_end < end and subset:
        # accelerate checks that the buffers of offloaded modules (rotary inv_freq...) fit on a GPU
        max_memory["0"] += sum(m.unit_buffers[gpu_end:end])
    return ReplicaPlan(
        gpu_indices=tuple(subset),
        max_memory=max_memory,
        device_map=device_map,
        per_gpu=per_gpu,
        offload_folder=folder,
    )


def _max_memory(m: _Model, device_of_unit: Sequence[int | str], n_gpus: int) -> dict[str, int]:
    """Per device: its weight bytes, plus on the main devices (GPU 0 and cpu) the room accelerate keeps
    for the largest unit still to be placed, so that its ``infer_auto_device_map`` gives this map back."""
    end = len(m.units)
    after = [0] * (end + 1)  # largest unit after k
    for k in range(end - 1, -1, -1):
        after[k] = max(after[k + 1], m.unit_weights[k])
    used: dict[str, int] = {str(g): 0 for g in range(n_gpus)}
    budget: dict[str, int] = {str(g): 0 for g in range(n_gpus)}
    main_devices = {"0", "cpu"} if n_gpus else {"cpu"}
    for k, dev in enumerate(device_of_unit):
        key = str(dev)
        used[key] = used.get(key, 0) + m.unit_weights[k]
        need = used[key] + (after[k + 1] if key in main_devices else 0)
        budget[key] = max(budget.get(key, 0), need)
    return budget


def _gib(n: int) -> str:
    return format_bytes(n)


def _no_fit(
    facts: ModelFacts,
    workload: Workload,
    free: list[int],
    gpu_count: int,
    offload: str,
    why: str | None,
    *,
    cpu_bytes: int = 0,
) -> NoFit:
    upto = max(NEEDED_UP_TO, gpu_count)
    needed = {n: _min_per_gpu(facts, workload, n) for n in range(1, upto + 1)}
    largest = max(free) if free else 0
    have = f"free: {len(free)} x up to {_gib(largest)}" if free else "no GPU free"
    options: list[int] = []
    for n in range(1, upto + 1):
        if not options or needed[n] < needed[options[-1]]:
            options.append(n)
    shown = " or ".join(f"{n} GPU{'s' if n > 1 else ''} with >= {_gib(needed[n])}" for n in options[:3])
    reason = why or (
        f"needs {shown}"
        + (f" (spec.placement.gpusPerReplica: {gpu_count})" if gpu_count else "")
        + f"; {have}"
        + (
            f"; offload to {offload} (node memory {_gib(cpu_bytes)}) does not fit either: GPU 0 still holds "
            "the KV cache of every layer, the largest offloaded block and the activations"
            if offload != "none" and free
            else ""
        )
    )
    suggestions: list[str] = []
    fits_count = next((n for n in range(1, upto + 1) if needed[n] <= largest), None)
    if fits_count is not None and fits_count > len(free):
        suggestions.append(f"more GPUs: {fits_count} GPUs with {_gib(largest)} free each would fit")
    elif fits_count is not None and gpu_count and fits_count > gpu_count:
        suggestions.append(f"more GPUs: spec.placement.gpusPerReplica: {fits_count}")
    n_now = gpu_count or max(1, len(free))
    if n_now in needed:
        suggestions.append(f"larger GPUs: {n_now} x >= {_gib(needed[n_now])} free")
    if offload == "none":
        suggestions.append("allow offload: spec.placement.offload: cpu (or disk), slower but it loads")
    elif offload == "cpu":
        suggestions.append(
            f"more node memory than {_gib(cpu_bytes)} for cpu offload, or spec.placement.offload: disk"
        )
    suggestions.append(
        f"serve less: spec.serving.maxSequenceLength {workload.max_sequence_length} x maxBatchSize "
        f"{workload.max_batch_size} sizes the KV cache"
    )
    return NoFit(reason=reason, needed_per_gpu=needed, suggestions=suggestions)


__all__ = [
    "DEFAULT_OFFLOAD_FOLDER",
    "OFFLOADS",
    "STRATEGIES",
    "NoFit",
    "ReplicaPlan",
    "accelerate_max_memory",
    "min_per_gpu_bytes",
    "plan_replica",
]

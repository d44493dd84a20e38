"""The worker's memory: allocator statistics, the in-process release, prefill samples and the watcher.

**Statistics** (:func:`device_stats`, :func:`snapshot`): per CUDA device the model uses, the essentials
of ``torch.cuda.memory_stats()`` (allocated and reserved bytes, current and peak; active bytes; inactive
split bytes, the fragmentation inside cached segments; allocation retries and OOMs) and NVML's view of
the whole device (total, used, free, through ``pynvml`` from ``nvidia-ml-py``); for the process, its
resident set size. A CPU-only worker reports the process figures and an empty device list.

**Release** (:func:`release_now`, on the engine thread between two steps, see
:meth:`kubevram.worker.engine.Engine.run_between_steps`), seed 000's recipe made safe under traffic:

1. drop what finished requests left: rows of the running batch whose client went away (their KV cache
   rows) and the last exception's traceback, whose frames hold a failed step's tensors;
2. run one tiny forward (2 tokens, no cache kept) so that whatever modules keep from their last forward
   (remote-code models cache rotary tables and buffers sized by the longest input) shrinks to that size,
   then drop its outputs;
3. collect garbage, free cuBLAS's workspaces (live allocator blocks that pin the segments they sit in),
   ``torch.cuda.empty_cache()`` (only unreferenced cached blocks are returned: the running batch keeps
   its cache), and on glibc ``malloc_trim(0)``, the CPU allocator's equivalent, which hands freed heap
   pages back to the OS.

The figures before and after (allocated, reserved, NVML used per device; process RSS) come back.

**Samples** (:class:`MemoryMonitor`, also the engine's hooks): before each prefill the peak counters are
reset; after it, the peak allocated bytes (summed over the devices) is kept with the prefill's token
count. These ``(tokens, peak)`` pairs are what the operator fits ``peak = a x tokens + b`` to
(:mod:`kubevram.planner.calibration`). Only CUDA workers have samples.

**Automatic release** (:meth:`MemoryMonitor.watch`): after ``memoryRelease.idleSeconds`` without a step
(once per idle period), and when a device's reserved bytes pass ``memoryRelease.highWatermark`` of its
budget (the plan's ``maxMemory`` for that GPU, else the device's total) with at least
``min_reclaim_bytes`` cached but unallocated (at most once per ``cooldown`` seconds).

**Sleep and wake** (:meth:`MemoryMonitor.sleep`, :meth:`MemoryMonitor.wake`; the memory work is
:mod:`kubevram.worker.sleep`, the states the engine's): on request, and after
``memoryRelease.sleepAfterIdleSeconds`` without a request (at ``memoryRelease.sleepLevel``). While the
worker sleeps nothing is released automatically: there is nothing left to release.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import datetime
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil
import torch

from kubevram.api.v1alpha1 import MemoryReleaseSpec
from kubevram.worker.engine import Engine, EngineError, EngineHooks

if TYPE_CHECKING:
    from kubevram.worker.sleep import Sleeper

log = logging.getLogger(__name__)

#: The essentials of ``torch.cuda.memory_stats()``: status field name -> memory_stats key.
TORCH_STATS: dict[str, str] = {
    "allocatedBytes": "allocated_bytes.all.current",
    "peakAllocatedBytes": "allocated_bytes.all.peak",
    "reservedBytes": "reserved_bytes.all.current",
    "peakReservedBytes": "reserved_bytes.all.peak",
    "activeBytes": "active_bytes.all.current",
    "fragmentationBytes": "inactive_split_bytes.all.current",
    "allocRetries": "num_alloc_retries",
    "ooms": "num_ooms",
}
DEFAULT_MAX_SAMPLES = 32
DEFAULT_MIN_RECLAIM_BYTES = 64 * 2**20
DEFAULT_WATERMARK_COOLDOWN = 30.0


def now_rfc3339() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------ NVML


class _Nvml:
    """NVML, initialised once on first use; ``None`` figures where there is no driver."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: bool | None = None  # None: not tried; False: unavailable

    def _ready(self) -> bool:
        with self._lock:
            if self._state is None:
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self._state = True
                except Exception as exc:  # no driver, no library: NVML is optional
                    log.info("NVML unavailable (%s): device totals come from torch", exc)
                    self._state = False
            return self._state

    def memory(self, index: int) -> dict[str, int] | None:
        """NVML's total/used/free bytes of the device torch calls ``cuda:index``."""
        if not self._ready():
            return None
        import pynvml

        try:
            handle = None
            uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
            if uuid is not None:
                try:
                    handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
                except pynvml.NVMLError:
                    handle = None
            if handle is None:  # MIG devices and old drivers: fall back to the index
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        except pynvml.NVMLError as exc:
            log.debug("NVML memory of device %d: %s", index, exc)
            return None
        return {"totalBytes": int(info.total), "usedBytes": int(info.used), "freeBytes": int(info.free)}


NVML = _Nvml()


# ------------------------------------------------------------------------------------ statistics


def process_rss() -> int:
    """Resident set size of this process, bytes."""
    return int(psutil.Process(os.getpid()).memory_info().rss)


def device_stats(index: int) -> dict[str, Any]:
    """One CUDA device: the allocator essentials, its name and NVML's total/used/free (``None`` if absent)."""
    stats = torch.cuda.memory_stats(index)
    out: dict[str, Any] = {"index": index, "name": torch.cuda.get_device_name(index)}
    out.update({name: int(stats.get(key, 0)) for name, key in TORCH_STATS.items()})
    nvml: dict[str, int | None] | None = dict(NVML.memory(index) or {}) or None
    if nvml is None:
        total = int(torch.cuda.get_device_properties(index).total_memory)
        nvml = {"totalBytes": total, "usedBytes": None, "freeBytes": None}
    out.update(nvml)
    return out


def model_devices(model: Any) -> list[int]:
    """The CUDA device indices holding any of ``model``'s parameters or buffers (empty on CPU)."""
    found: set[int] = set()
    placed = getattr(model, "hf_device_map", None)
    if isinstance(placed, Mapping):
        for where in placed.values():
            if isinstance(where, int) and not isinstance(where, bool):
                found.add(where)
            elif isinstance(where, str) and where.startswith("cuda"):
                found.add(torch.device(where).index or 0)
            elif isinstance(where, torch.device) and where.type == "cuda":
                found.add(where.index or 0)
    tensors = [*model.parameters(), *model.buffers()] if hasattr(model, "parameters") else []
    for tensor in tensors:
        if tensor.device.type == "cuda":
            found.add(tensor.device.index or 0)
    return sorted(found)


def _brief(stats: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "index": stats["index"],
        "allocatedBytes": stats["allocatedBytes"],
        "reservedBytes": stats["reservedBytes"],
        "nvmlUsedBytes": stats.get("usedBytes"),
    }


def snapshot(devices: Sequence[int]) -> dict[str, Any]:
    """Allocated, reserved and NVML used per device, plus the process RSS: a release's before/after."""
    return {"devices": [_brief(device_stats(d)) for d in devices], "rssBytes": process_rss()}


# --------------------------------------------------------------------------------------- release


def _malloc_trim() -> bool:
    """glibc's ``malloc_trim(0)``: give freed heap pages back to the OS (False where there is none)."""
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def drop_cancelled_rows(engine: Engine) -> int:
    """Remove the rows of the running batch whose client went away (their KV cache rows with them)."""
    return engine.drop_cancelled()


def tiny_forward(engine: Engine, tokens: int = 2) -> None:
    """One forward of ``tokens`` pad tokens with no cache kept; the outputs are dropped at once."""
    ids = torch.full((1, tokens), engine.pad_token_id, dtype=torch.long, device=engine.device)
    with torch.inference_mode():
        try:
            out = engine.model(input_ids=ids, use_cache=False, logits_to_keep=1)
        except TypeError:  # remote-code models without ``logits_to_keep``
            out = engine.model(input_ids=ids, use_cache=False)
    del out, ids


def forget_last_exception() -> None:
    """Drop the interpreter's last exception, whose traceback's frames may hold a failed step's tensors."""
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)


def free_caches(devices: Sequence[int]) -> bool:
    """Collect garbage, free cuBLAS's workspaces and return the CUDA allocator's unreferenced cached
    blocks (when there are ``devices``), and trim the C heap; whether ``malloc_trim`` ran.

    cuBLAS and cuBLASLt keep their workspaces (64 MiB per stream on an H100) as live blocks of the
    caching allocator, carved out of whatever segment was free at the first matrix product, often one
    of a prefill's large segments: ``empty_cache`` can return no segment that holds one (measured on an
    H100: 36 of 476 MiB cached returned with them, PyTorch issue 95668). They are allocated again,
    lazily, by the next matrix product."""
    gc.collect()
    if devices:
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:  # absent from CPU-only builds
            clear_workspaces()
        torch.cuda.empty_cache()  # every device's allocator
    return _malloc_trim()


def freed_figures(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """What two :func:`snapshot` s say was freed: reserved bytes per device and in all, and the RSS."""
    freed = {
        str(b["index"]): max(0, int(b["reservedBytes"]) - int(a["reservedBytes"]))
        for b, a in zip(before["devices"], after["devices"], strict=True)
    }
    return {
        "freedBytes": sum(freed.values()),
        "freedBytesByDevice": freed,
        "rssFreedBytes": int(before["rssBytes"]) - int(after["rssBytes"]),
    }


def release_now(engine: Engine, devices: Sequence[int], reason: str = "request") -> dict[str, Any]:
    """The release procedure (module docstring); call it on the engine thread between two steps. While
    the engine sleeps there is no model to run the tiny forward with, and nothing it would shrink."""
    started = time.perf_counter()
    steps = engine.steps
    before = snapshot(devices)
    forget_last_exception()
    dropped = drop_cancelled_rows(engine)
    if not engine.sleep_level and engine.group is None:  # a group's ranks forward only together
        tiny_forward(engine)
    trimmed = free_caches(devices)
    after = snapshot(devices)
    if engine.steps != steps:  # cannot happen on the engine thread; a guard for misuse
        raise RuntimeError("release_now ran while the engine stepped: call it through run_between_steps")
    return {
        "reason": reason,
        "time": now_rfc3339(),
        "seconds": round(time.perf_counter() - started, 6),
        "before": before,
        "after": after,
        **freed_figures(before, after),
        "droppedRequests": dropped,
        "mallocTrimmed": trimmed,
        "engineStep": steps,
    }


# --------------------------------------------------------------------------------------- monitor


@dataclass
class Sample:
    """One prefill: its tokens (prompt tokens of the batch), rows, and the peak allocated bytes."""

    tokens: int
    batch: int
    peakAllocatedBytes: int
    baseAllocatedBytes: int

    def to_json(self) -> dict[str, int]:
        return {
            "tokens": self.tokens,
            "batch": self.batch,
            "peakAllocatedBytes": self.peakAllocatedBytes,
            "baseAllocatedBytes": self.baseAllocatedBytes,
        }


@dataclass
class _Pending:
    tokens: int
    batch: int
    base: int


@dataclass
class MemoryMonitor(EngineHooks):
    """Statistics, release, samples and automatic release for one worker; the engine's hooks.

    ``inner`` receives every hook call first (the metrics). ``budgets`` maps a device index to the
    bytes the plan gave it (``maxMemory``); ``clock`` is ``time.monotonic`` (a test may pass its own).
    """

    inner: EngineHooks = field(default_factory=EngineHooks)
    policy: MemoryReleaseSpec = field(default_factory=MemoryReleaseSpec)
    budgets: dict[int, int] = field(default_factory=dict)
    max_samples: int = DEFAULT_MAX_SAMPLES
    min_reclaim_bytes: int = DEFAULT_MIN_RECLAIM_BYTES
    watermark_cooldown: float = DEFAULT_WATERMARK_COOLDOWN
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.engine: Engine | None = None
        self.devices: list[int] = []
        self.last_active = self.clock()
        self.last_release: dict[str, Any] | None = None
        self.releases: collections.Counter[str] = collections.Counter()
        self._released_idle = False
        self._last_watermark = -float("inf")
        self._samples: collections.OrderedDict[int, Sample] = collections.OrderedDict()
        self._pending: _Pending | None = None
        self._peaks: dict[int, dict[str, int]] = {}
        self._lock = threading.Lock()
        self.changed = asyncio.Event()  # set after a release, a sleep, a wake: the reporter reports early
        self.sleeper: Sleeper | None = None

    @classmethod
    def for_plan(cls, inner: EngineHooks, plan: Any | None) -> MemoryMonitor:
        """A monitor with the plan's ``memoryRelease`` policy and per-GPU ``maxMemory`` budgets."""
        if plan is None:
            return cls(inner=inner)
        budgets = {int(k): int(v) for k, v in (plan.maxMemory or {}).items() if str(k).isdigit()}
        return cls(inner=inner, policy=plan.memoryRelease, budgets=budgets)

    def bind(self, engine: Engine, reload: Callable[[], Any] | None = None) -> None:
        """Watch ``engine`` (whose hooks must be this monitor) and let it sleep: its sleeper is bound
        here, with ``reload`` (the model from its files again: what level 2 wakes with) and the
        policy's ``wakeOnRequest``."""
        from kubevram.worker.sleep import Sleeper  # it builds on this module's figures

        self.devices = model_devices(engine.model)
        if engine.group is None:  # a multi-node replica's ranks do not sleep (they step only together)
            self.sleeper = Sleeper(engine, self.devices, reload, on_wake=self._woken)
            engine.sleeper = self.sleeper
        engine.wake_on_request = self.policy.wakeOnRequest
        self.engine = engine
        self.last_active = self.clock()

    def arrived(self) -> None:
        """A request came (the event loop, before it is parsed and tokenised): the idle periods start
        again, so that ``sleepAfterIdleSeconds`` cannot put the worker to sleep under a request that
        is still being prepared (it would wait for a sleep and a wake, or be refused as if it came
        late)."""
        self.last_active = self.clock()

    def _woken(self) -> None:
        """A wake is activity: the idle periods (release, sleep) start again."""
        self.last_active = self.clock()
        self._released_idle = False

    # ---- hooks (engine thread) --------------------------------------------------------------------

    def on_prefill(self, batch_size: int, prompt_tokens: int) -> None:
        self.inner.on_prefill(batch_size, prompt_tokens)
        self.last_active = self.clock()
        self._released_idle = False
        if self.devices:
            self._fold_peaks()
            base = 0
            for index in self.devices:
                torch.cuda.reset_peak_memory_stats(index)
                base += torch.cuda.memory_allocated(index)
            self._pending = _Pending(prompt_tokens, batch_size, base)

    def on_tokens(self, count: int) -> None:
        self.inner.on_tokens(count)
        self.last_active = self.clock()
        pending, self._pending = self._pending, None
        if pending is not None:
            peak = sum(torch.cuda.max_memory_allocated(i) for i in self.devices)
            self._add_sample(Sample(pending.tokens, pending.batch, int(peak), pending.base))

    def on_finished(self, reason: str) -> None:
        self.inner.on_finished(reason)
        self.last_active = self.clock()

    def _add_sample(self, sample: Sample) -> None:
        """Keep the largest peak seen per token count; the ``max_samples`` most recent token counts."""
        with self._lock:
            old = self._samples.pop(sample.tokens, None)
            if old is not None and old.peakAllocatedBytes > sample.peakAllocatedBytes:
                sample = old
            self._samples[sample.tokens] = sample
            while len(self._samples) > self.max_samples:
                self._samples.popitem(last=False)

    def _fold_peaks(self) -> None:
        """Remember the peaks before the per-prefill reset: the lifetime peak stays reportable."""
        for index in self.devices:
            stats = torch.cuda.memory_stats(index)
            kept = self._peaks.setdefault(index, {"peakAllocatedBytes": 0, "peakReservedBytes": 0})
            for name in ("peakAllocatedBytes", "peakReservedBytes"):
                kept[name] = max(kept[name], int(stats.get(TORCH_STATS[name], 0)))

    def samples(self) -> list[dict[str, int]]:
        with self._lock:
            return [s.to_json() for s in sorted(self._samples.values(), key=lambda s: s.tokens)]

    # ---- statistics (any thread) --------------------------------------------------------------------

    def device_stats(self) -> list[dict[str, Any]]:
        out = []
        for index in self.devices:
            stats = device_stats(index)
            kept = self._peaks.get(index, {})
            for name in ("peakAllocatedBytes", "peakReservedBytes"):
                stats[name] = max(int(stats[name]), kept.get(name, 0))
            stats["budgetBytes"] = self.budgets.get(index)
            out.append(stats)
        return out

    def stats(self) -> dict[str, Any]:
        """What ``GET /v1/admin/stats`` answers and the status entry carries."""
        engine = self.engine
        return {
            "time": now_rfc3339(),
            "ready": engine is not None,
            "pid": os.getpid(),
            "rssBytes": process_rss(),
            "devices": self.device_stats(),
            "oomCount": engine.oom_count if engine is not None else 0,
            "running": engine.running if engine is not None else 0,
            "queued": engine.queue_depth if engine is not None else 0,
            "steps": engine.steps if engine is not None else 0,
            "idleSeconds": round(max(0.0, self.clock() - self.last_active), 3),
            "lastRelease": self.last_release,
            "releases": dict(self.releases),
            "sleep": self.sleeper.stats() if self.sleeper is not None else None,
            "samples": self.samples(),
        }

    # ---- release (event loop) -------------------------------------------------------------------------

    async def release(self, reason: str = "request") -> dict[str, Any]:
        """Run :func:`release_now` between two engine steps; 503 while the model loads."""
        engine = self.engine
        if engine is None:
            raise EngineError.loading()
        devices = list(self.devices)
        result = await engine.run_between_steps(lambda: release_now(engine, devices, reason))
        self.releases[reason] += 1
        self.last_release = {
            "time": result["time"],
            "reason": reason,
            "freedBytes": result["freedBytes"],
            "rssFreedBytes": result["rssFreedBytes"],
            "seconds": result["seconds"],
        }
        self.changed.set()
        log.info(
            "released memory (%s): %d bytes of GPU cache freed, RSS %+d bytes, %.3f s",
            reason,
            result["freedBytes"],
            -result["rssFreedBytes"],
            result["seconds"],
        )
        return result

    async def sleep(self, level: int = 1, reason: str = "request") -> dict[str, Any]:
        """Put the engine to sleep at ``level`` (it waits for the admitted requests); the figures. 503
        while the model loads, 400 for a level the worker cannot sleep at."""
        engine, sleeper = self.engine, self.sleeper
        if engine is not None and engine.group is not None:
            raise EngineError(
                409,
                "a multi-node replica does not sleep: its ranks step only together",
                code="group_cannot_sleep",
            )
        if engine is None or sleeper is None:
            raise EngineError.loading()
        sleeper.check_level(level)
        result = await engine.sleep(level, reason)
        self.changed.set()
        return result

    async def wake(self, reason: str = "request") -> dict[str, Any]:
        """Wake the engine (reloading the weights after level 2); the figures. 503 while loading."""
        engine = self.engine
        if engine is None:
            raise EngineError.loading()
        result = await engine.wake(reason)
        self.changed.set()
        return result

    def sleep_due(self, now: float | None = None) -> bool:
        """Whether ``memoryRelease.sleepAfterIdleSeconds`` have passed without a request."""
        engine, after = self.engine, self.policy.sleepAfterIdleSeconds
        if engine is None or after <= 0 or engine.sleeping or not engine.idle or engine.group is not None:
            return False
        now = self.clock() if now is None else now
        return now - self.last_active >= after

    def due(self, now: float | None = None) -> str | None:
        """Why an automatic release is due now (``"idle"`` or ``"watermark"``), or ``None``."""
        engine = self.engine
        if engine is None or engine.sleeping:
            return None
        now = self.clock() if now is None else now
        busy = engine.running > 0 or engine.queue_depth > 0
        idle = self.policy.idleSeconds
        if idle > 0 and not busy and not self._released_idle and now - self.last_active >= idle:
            return "idle"
        if self.devices and now - self._last_watermark >= self.watermark_cooldown:
            for stats in self.device_stats():
                budget = self.budgets.get(stats["index"]) or stats.get("totalBytes") or 0
                cached = stats["reservedBytes"] - stats["allocatedBytes"]
                if (
                    budget
                    and stats["reservedBytes"] > self.policy.highWatermark * budget
                    and cached >= self.min_reclaim_bytes
                ):
                    return "watermark"
        return None

    async def check(self, now: float | None = None) -> dict[str, Any] | None:
        """Sleep if :meth:`sleep_due` (at ``sleepLevel``; 1 where the model cannot be reloaded), else
        release if :meth:`due`; the sleep's or the release's result, else ``None``."""
        now = self.clock() if now is None else now
        if self.sleep_due(now):
            level = self.policy.sleepLevel
            if level == 2 and self.sleeper is not None and self.sleeper.reload is None:
                log.warning("memoryRelease.sleepLevel 2 needs the model files: sleeping at level 1")
                level = 1
            return await self.sleep(level, "idle")
        reason = self.due(now)
        if reason is None:
            return None
        if reason == "idle":
            self._released_idle = True
        else:
            self._last_watermark = now
        return await self.release(reason)

    async def watch(self, interval: float = 5.0) -> None:
        """Check every ``interval`` seconds until cancelled; a failed release is logged, never fatal."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("automatic memory release or sleep failed")

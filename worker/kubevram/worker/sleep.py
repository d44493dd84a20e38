"""Sleep and wake: what each level does to the worker's memory, and the figures.

The engine's loop calls :meth:`Sleeper.sleep` and :meth:`Sleeper.wake` on its thread, between two
steps, once the requests admitted before the sleep have finished (see
:mod:`kubevram.worker.engine`): the running batch, and with it the KV cache, is gone by then.

- **Level 1** moves every weight that lives on an accelerator (each parameter and buffer not on the CPU)
  into CPU memory, pinned when it comes from CUDA so that the copy back is fast; the tensor keeps its
  identity (accelerate's hooks, tied weights) and holds an empty storage until the wake copies it back.
  Weights that already live in CPU memory (a CPU worker, a device map's ``cpu`` entries) stay where
  they are: on a CPU worker level 1 frees only caches.
- **Level 2** drops the model itself (the engine keeps its tokenizer, token sets and settings); the wake
  loads the weights again from the model files, exactly as at start-up (``reload``, from
  :func:`kubevram.worker.loader.load_weights` with the same plan).

Then, as the release does, garbage is collected, ``torch.cuda.empty_cache()`` returns the allocator's
unreferenced blocks and ``malloc_trim(0)`` the C heap's free pages. Each sleep and wake is measured: the
allocated, reserved and NVML used bytes per device and the process RSS before and after
(:func:`kubevram.worker.memory.snapshot`), the reserved bytes freed, the RSS freed, the weights' bytes
moved, dropped or brought back, and the seconds it took.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kubevram.worker.engine import Engine, EngineError
from kubevram.worker.memory import forget_last_exception, free_caches, freed_figures, now_rfc3339, snapshot

log = logging.getLogger(__name__)

LEVELS = (1, 2)


@dataclass
class _Offloaded:
    """One weight moved to CPU memory: the tensor (now empty), where it lived, its CPU copy."""

    tensor: torch.Tensor
    device: torch.device
    host: torch.Tensor


def _weights(model: Any) -> list[torch.Tensor]:
    """Every parameter and buffer of ``model``, each once (tied weights are one tensor)."""
    seen: set[int] = set()
    out = []
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out.append(tensor)
    return out


def weights_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type != "meta")


def offload(model: Any) -> list[_Offloaded]:
    """Move every weight that is not in CPU memory there (pinned when it comes from CUDA); on a failure
    (pinned memory can run out) what was moved goes back and the error is raised."""
    moved: list[_Offloaded] = []
    try:
        for tensor in _weights(model):
            if tensor.device.type in ("cpu", "meta"):
                continue
            pin = tensor.device.type == "cuda"
            host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
            host.copy_(tensor.data)
            moved.append(_Offloaded(tensor, tensor.device, host))
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    except BaseException:
        restore(moved)
        raise
    return moved


def restore(moved: Sequence[_Offloaded]) -> None:
    """Copy the weights :func:`offload` moved back where they lived."""
    for item in moved:
        item.tensor.data = item.host.to(item.device, non_blocking=True)
    if any(item.device.type == "cuda" for item in moved):
        torch.cuda.synchronize()


class Sleeper:
    """Sleep and wake of one engine's memory (the module docstring); the engine's :class:`Sleeper`.

    ``devices`` are the CUDA devices the model uses (the figures' devices); ``reload`` loads the model
    from its files again (level 2 needs it); ``on_wake`` is called after each wake (the monitor counts
    it as activity).
    """

    def __init__(
        self,
        engine: Engine,
        devices: Sequence[int],
        reload: Callable[[], Any] | None = None,
        on_wake: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.devices = list(devices)
        self.reload = reload
        self.on_wake = on_wake
        self.level = 0
        self.since: str | None = None
        self.last_sleep: dict[str, Any] | None = None
        self.last_wake: dict[str, Any] | None = None
        self.sleeps: collections.Counter[tuple[int, str]] = collections.Counter()
        self.wakes: collections.Counter[str] = collections.Counter()
        self._offloaded: list[_Offloaded] = []

    def check_level(self, level: int) -> None:
        """400 for a level that is not 1 or 2, or 2 on a worker that cannot reload its model."""
        if level not in LEVELS:
            raise EngineError(400, f"level: {level!r} must be 1 or 2", param="level")
        if level == 2 and self.reload is None:
            raise EngineError(
                400,
                "level: 2 drops the weights and reloads them from the model files, which this worker "
                "was not started from; sleep at level 1",
                param="level",
            )

    # ---- the engine thread ------------------------------------------------------------------------

    def sleep(self, level: int, reason: str) -> dict[str, Any]:
        """Put the model to sleep at ``level``; the figures."""
        self.check_level(level)
        started = time.perf_counter()
        before = snapshot(self.devices)
        engine = self.engine
        if level == 1:
            self._offloaded = offload(engine.model)
            moved = sum(weights_bytes([item.host]) for item in self._offloaded)
        else:
            moved = weights_bytes(_weights(engine.model))
            engine.model = None
        forget_last_exception()
        free_caches(self.devices)
        after = snapshot(self.devices)
        self.level, self.since = level, now_rfc3339()
        record = {
            "level": level,
            "reason": reason,
            "time": self.since,
            "seconds": round(time.perf_counter() - started, 6),
            "before": before,
            "after": after,
            **freed_figures(before, after),
            "weightsBytes": moved,
        }
        self.sleeps[(level, reason)] += 1
        self.last_sleep = _brief(record)
        log.info(
            "asleep at level %d (%s): %d bytes of weights %s, %d bytes of GPU memory freed, RSS %+d "
            "bytes, %.3f s",
            level,
            reason,
            moved,
            "moved to CPU memory" if level == 1 else "dropped",
            record["freedBytes"],
            -record["rssFreedBytes"],
            record["seconds"],
        )
        return record

    def wake(self, reason: str) -> dict[str, Any]:
        """Bring the weights back (level 1) or reload them from the model files (level 2); the figures."""
        started = time.perf_counter()
        before = snapshot(self.devices)
        level = self.level
        if level == 2:
            assert self.reload is not None
            self.engine.model = self.reload()
            restored = weights_bytes(_weights(self.engine.model))
        else:
            restore(self._offloaded)
            restored = sum(weights_bytes([item.host]) for item in self._offloaded)
            self._offloaded = []
            free_caches(self.devices)  # the pinned copies
        after = snapshot(self.devices)
        self.level, self.since = 0, None
        record = {
            "level": level,
            "reason": reason,
            "time": now_rfc3339(),
            "seconds": round(time.perf_counter() - started, 6),
            "before": before,
            "after": after,
            "weightsBytes": restored,
        }
        self.wakes[reason] += 1
        self.last_wake = _brief(record)
        if self.on_wake is not None:
            self.on_wake()
        log.info("awake from level %d (%s) in %.3f s", level, reason, record["seconds"])
        return record

    # ---- any thread -------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """What ``/v1/admin/stats`` and the status entry carry as ``sleep``."""
        sleeps: dict[str, dict[str, int]] = {}
        for (level, reason), count in sorted(self.sleeps.items()):
            sleeps.setdefault(str(level), {})[reason] = count
        return {
            "level": self.engine.sleep_level,
            "since": self.since,
            "wakeOnRequest": self.engine.wake_on_request,
            "lastSleep": self.last_sleep,
            "lastWake": self.last_wake,
            "sleeps": sleeps,
            "wakes": dict(self.wakes),
        }


def _brief(record: dict[str, Any]) -> dict[str, Any]:
    """A sleep's or wake's figures without the before/after snapshots (for stats and the status)."""
    return {k: v for k, v in record.items() if k not in ("before", "after", "freedBytesByDevice")}

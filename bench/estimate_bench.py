"""Estimating one replica per model: the analytic description vs the CLI's meta-device fallback.

Analytic: ``facts_from_config`` + ``estimate`` on the published config, no torch (what the operator
runs). Meta fallback: ``kubevram.introspect.meta_facts`` (the model built on the meta device, its module
tree walked, its KV cache measured by a three-token meta forward) + ``estimate``, with transformers
already imported (its import time is printed once, apart). Each in-process, best of ``--repeat`` runs,
analytic caches cleared before each run; peak memory is tracemalloc's peak of Python allocations during
one run (meta tensors hold no storage).

    python bench/estimate_bench.py [--repeat 5] [--models ID ...]

Prints one JSON object: per model, seconds and peak MiB of each path, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

MODELS = [
    "meta-llama/meta-llama-3-8b",
    "qwen/qwen2.5-72b-instruct",
    "mistralai/mixtral-8x7b-v0.1",
    "google/gemma-3-1b-it",
    "qwen/qwen3-30b-a3b",
    "deepseek-ai/deepseek-v3",
]


def _measure(fn: Callable[[], Any], repeat: int, before: Callable[[], None]) -> tuple[float, float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        before()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    before()
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return best, peak / 2**20, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--models", nargs="*", default=MODELS)
    args = parser.parse_args()

    from kubevram.planner import modules
    from kubevram.planner.catalog import CONFIGS
    from kubevram.planner.estimate import Workload, estimate
    from kubevram.planner.facts import facts_from_config

    workload = Workload(weights="bfloat16", max_sequence_length=4096, max_batch_size=4)
    t0 = time.perf_counter()
    import transformers  # noqa: F401

    from kubevram.introspect import meta_facts

    import_seconds = time.perf_counter() - t0
    rows: dict[str, Any] = {}
    for model_id in args.models:
        config = CONFIGS[model_id]

        def clear() -> None:
            modules._modules.cache_clear()

        analytic_s, analytic_mib, a = _measure(
            lambda config=config: estimate(facts_from_config(config), workload), args.repeat, clear
        )
        meta_s, meta_mib, m = _measure(
            lambda config=config: estimate(meta_facts(config, "bench"), workload), args.repeat, clear
        )
        rows[model_id] = {
            "analytic_ms": round(analytic_s * 1e3, 3),
            "analytic_peak_mib": round(analytic_mib, 2),
            "meta_ms": round(meta_s * 1e3, 1),
            "meta_peak_mib": round(meta_mib, 1),
            "speed_up": round(meta_s / analytic_s),
            "same_figures": a.weightsBytes == m.weightsBytes and a.kvCacheBytes == m.kvCacheBytes,
        }
    print(json.dumps({"transformers_import_s": round(import_seconds, 2), "models": rows}, indent=2))


if __name__ == "__main__":
    main()

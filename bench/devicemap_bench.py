"""Planning a 70B model over 8 GPUs: kubevram's ``plan_replica`` vs accelerate on a meta-device model.

accelerate's way (seed 001, and what transformers' ``device_map="balanced"`` does): build the model on
the meta device, ``get_balanced_memory``, then ``infer_auto_device_map``. kubevram's way: formulas on the
config, no torch. Both in-process, best of ``--repeat`` runs, single thread.

    python bench/devicemap_bench.py [--model meta-llama/Meta-Llama-3-70B] [--gpus 8] [--gib 80] [--repeat 5]

Prints one JSON object: seconds per plan for each side (kubevram cold = caches cleared, i.e. the first
plan for a model and workload; warm = the same model and workload again, as placement does when it tries
node after node), the speed-up, and both maps' per-GPU layer counts.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from typing import Any


def _best(fn: Any, repeat: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="meta-llama/Meta-Llama-3-70B")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gib", type=float, default=80.0)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    import transformers
    from accelerate import init_empty_weights
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    from kubevram.planner import devicemap
    from kubevram.planner.catalog import known_config
    from kubevram.planner.estimate import Workload
    from kubevram.planner.facts import facts_from_config

    config = dict(known_config(args.model) or {})
    free = int(args.gib * 2**30)

    def accelerate_plan() -> dict[str, Any]:
        kwargs = {k: v for k, v in config.items() if k != "model_type"}
        hf_config = transformers.AutoConfig.for_model(config["model_type"], **kwargs)
        with init_empty_weights():
            model = transformers.AutoModelForCausalLM.from_config(hf_config)
        model.tie_weights()
        no_split = model._no_split_modules
        budget = get_balanced_memory(
            model, max_memory=dict.fromkeys(range(args.gpus), free), no_split_module_classes=no_split,
            dtype=torch.bfloat16,
        )
        return dict(infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split,
                                          dtype=torch.bfloat16))

    workload = Workload(weights="bfloat16", max_sequence_length=args.seq, max_batch_size=args.batch)

    def kubevram_cold() -> Any:
        devicemap._model.cache_clear()
        devicemap._min_per_gpu.cache_clear()
        return plan_for(facts_from_config(config))

    def plan_for(facts: Any) -> Any:
        gpus = [free] * args.gpus
        return devicemap.plan_replica(facts, workload, gpus, strategy="balanced", gpu_count=args.gpus)

    facts = facts_from_config(config)

    def kubevram_warm() -> Any:
        return plan_for(facts)

    acc_s, acc_map = _best(accelerate_plan, args.repeat)
    cold_s, plan = _best(kubevram_cold, args.repeat * 4)
    warm_s, _ = _best(kubevram_warm, args.repeat * 20)
    layers = {k for k in plan.device_map if k.split(".")[-1].isdigit()}
    acc_counts = Counter(str(v) for k, v in acc_map.items() if k.split(".")[-1].isdigit())
    ours_counts = Counter(str(v) for k, v in plan.device_map.items() if k in layers)
    print(json.dumps({
        "model": args.model,
        "gpus": f"{args.gpus} x {args.gib:g} GiB",
        "serving": f"{args.seq} tokens x {args.batch}",
        "accelerate_s": round(acc_s, 4),
        "kubevram_cold_s": round(cold_s, 5),
        "kubevram_warm_s": round(warm_s, 5),
        "speedup_cold": round(acc_s / cold_s, 1),
        "speedup_warm": round(acc_s / warm_s, 1),
        "accelerate_layers_per_gpu": dict(sorted(acc_counts.items())),
        "kubevram_layers_per_gpu": dict(sorted(ours_counts.items())),
        "kubevram_total_gib_per_gpu": [round(g["total"] / 2**30, 1) for g in plan.per_gpu],
    }, indent=1))


if __name__ == "__main__":
    main()

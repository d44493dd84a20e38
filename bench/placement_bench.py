"""Placement benchmarks: planning speed in-process and as a whole ``kubevram plan`` process, and packing.

    python bench/placement_bench.py inprocess [--deployments 1000] [--nodes 1000] [--repeat 5]
    python bench/placement_bench.py cli [--deployments 200] [--nodes 500]
    python bench/placement_bench.py packing [--deployments 400] [--seed 0]
    python bench/placement_bench.py all

* ``inprocess``: ``plan_cluster`` on a synthetic cluster (a mix of L4, A10G, L40S, A100 40/80 GB, H100
  nodes, some tainted or not Ready, some time-sliced) and synthetic LLMDeployments (catalogue models,
  varied serving limits, replicas 1-3, some shared, some spread). Cold = the first plan in a fresh process
  (every model's device-map tables built); warm = best of ``--repeat`` further plans (the operator's case:
  it stays up and re-plans).
* ``cli``: wall time of ``kubevram plan -f DEPLOYMENTS --cluster NODES -o json`` as a subprocess (median of
  ``--repeat`` runs), against
  a subprocess that builds the same number of device maps accelerate's way (meta-device model from the
  config with transformers, ``get_balanced_memory``, ``infer_auto_device_map``) for the GPUs the
  kubevram plan chose, one per placed replica: once building the meta model for every map (what each
  ``from_pretrained(device_map=...)`` does), once with models cached per distinct config (kinder to it).
* ``packing``: a trace of shared (VRAM-sliced) replicas of small and medium models on time-sliced
  A100-80GB nodes with room for all. GPUs used vs the lower bound ceil(sum of slices / GPU memory), and vs
  counting whole GPUs (one or more whole GPUs per replica, as operators that count ``nvidia.com/gpu`` do).

Prints one JSON object per benchmark. Data are generated from ``--seed``, so runs are reproducible.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

GiB = 2**30
MiB = 2**20

# (name, product, MiB per GPU, GPUs per node, time-slicing replicas, weight in the mix)
NODE_MIX = [
    ("l4", "NVIDIA-L4", 23034, 4, 1, 25),
    ("a10g", "NVIDIA-A10G", 23028, 4, 1, 10),
    ("l40s", "NVIDIA-L40S", 46068, 8, 1, 15),
    ("a100-40", "NVIDIA-A100-SXM4-40GB", 40960, 8, 1, 10),
    ("a100-80", "NVIDIA-A100-SXM4-80GB", 81920, 8, 1, 20),
    ("h100", "NVIDIA-H100-80GB-HBM3", 81559, 8, 1, 15),
    ("l4-ts", "NVIDIA-L4", 23034, 1, 8, 5),
]
SMALL = ["Qwen/Qwen2-0.5B-Instruct", "meta-llama/Llama-3.2-1B-Instruct", "microsoft/Phi-3-mini-4k-instruct"]
MEDIUM = ["Qwen/Qwen2-7B-Instruct", "mistralai/Mistral-7B-v0.1", "meta-llama/Meta-Llama-3-8B-Instruct",
          "meta-llama/Llama-2-7b-chat-hf", "google/gemma-7b", "tiiuae/falcon-7b"]
LARGE = ["meta-llama/Meta-Llama-3-70B-Instruct", "mistralai/Mixtral-8x7B-Instruct-v0.1",
         "meta-llama/Llama-2-70b-chat-hf"]


def node(name: str, product: str, mib: int, count: int, replicas: int = 1, *, ready: bool = True,
         taints: list[dict[str, str]] | None = None, pool: str = "a") -> dict[str, Any]:
    labels = {
        "kubernetes.io/hostname": name,
        "pool": pool,
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": product + ("-SHARED" if replicas > 1 else ""),
        "nvidia.com/gpu.memory": str(mib),
        "nvidia.com/gpu.count": str(count),
        "nvidia.com/gpu.replicas": str(replicas),
    }
    alloc = {"cpu": "96", "memory": "1000Gi", "ephemeral-storage": "2Ti",
             "nvidia.com/gpu": str(count * replicas)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"taints": taints} if taints else {},
        "status": {"allocatable": alloc, "capacity": dict(alloc),
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def synthetic_nodes(n: int, rnd: random.Random) -> list[dict[str, Any]]:
    weights = [m[-1] for m in NODE_MIX]
    out = []
    for i in range(n):
        cls, product, mib, count, replicas, _ = rnd.choices(NODE_MIX, weights)[0]
        tainted = rnd.random() < 0.1
        taints = [{"key": "team", "value": "research", "effect": "NoSchedule"}] if tainted else None
        out.append(node(f"{cls}-{i:04d}", product, mib, count, replicas, ready=rnd.random() > 0.02,
                        taints=taints, pool=rnd.choice("ab")))
    return out


def synthetic_deployments(n: int, rnd: random.Random) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        size = rnd.choices(["small", "medium", "large"], [35, 50, 15])[0]
        model = rnd.choice({"small": SMALL, "medium": MEDIUM, "large": LARGE}[size])
        placement: dict[str, Any] = {}
        if size == "small" and rnd.random() < 0.4:
            placement["sharing"] = "shared"
        if rnd.random() < 0.2:
            placement["packing"] = "spread"
        if rnd.random() < 0.1:
            placement["nodeSelector"] = {"pool": rnd.choice("ab")}
        if rnd.random() < 0.1:
            placement["tolerations"] = [{"key": "team", "operator": "Exists"}]
        out.append({
            "apiVersion": "llm.kubevram.io/v1alpha1",
            "kind": "LLMDeployment",
            "metadata": {"name": f"llm-{i:04d}", "namespace": rnd.choice(["ai", "search", "chat"])},
            "spec": {
                "replicas": rnd.choice([1, 1, 1, 2, 2, 3]),
                "model": {"id": model},
                "precision": {"weights": rnd.choices(["bfloat16", "int8", "int4"], [70, 15, 15])[0]},
                "serving": {"maxSequenceLength": rnd.choice([2048, 4096, 8192]),
                            "maxBatchSize": rnd.choice([1, 2, 4])},
                "placement": placement,
            },
        })
    return out


def _load(docs: list[dict[str, Any]]) -> list[Any]:
    from kubevram.api.load import parse_deployment

    return [parse_deployment(d) for d in docs]


def _summary(plan: Any) -> dict[str, Any]:
    placed = sum(len(d.replicas) for d in plan.deployments)
    pending = sum(d.unscheduled for d in plan.deployments)
    errors = sum(1 for d in plan.deployments if d.error is not None)
    return {"replicasPlaced": placed, "replicasPending": pending, "deploymentErrors": errors}


# ------------------------------------------------------------------------------------------ benches


def bench_inprocess(args: argparse.Namespace) -> dict[str, Any]:
    from kubevram.planner.placement import plan_cluster

    rnd = random.Random(args.seed)
    nodes = synthetic_nodes(args.nodes, rnd)
    deployments = _load(synthetic_deployments(args.deployments, rnd))
    t0 = time.perf_counter()
    plan = plan_cluster(deployments, nodes)
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        plan_cluster(deployments, nodes)
        warm.append(time.perf_counter() - t0)
    gpus = sum(len(n.devices) for n in plan.inventory.nodes)
    return {
        "bench": "inprocess",
        "deployments": args.deployments,
        "nodes": args.nodes,
        "gpus": gpus,
        **_summary(plan),
        "coldSeconds": round(cold, 3),
        "warmSecondsBest": round(min(warm), 3),
        "warmSecondsMedian": round(statistics.median(warm), 3),
        "goalSeconds": 1.0,
    }


_ACCELERATE_SCRIPT = r"""
import json, sys, time
t_start = time.perf_counter()
import torch
torch.set_num_threads(1)
import transformers
from accelerate import init_empty_weights
from accelerate.utils import get_balanced_memory, infer_auto_device_map
jobs = json.load(open(sys.argv[1]))
cache = sys.argv[2] == "cache"
models = {}
maps = 0
for job in jobs:
    config = job["config"]
    key = json.dumps(config, sort_keys=True) if cache else maps
    if key not in models:
        kwargs = {k: v for k, v in config.items() if k != "model_type"}
        hf = transformers.AutoConfig.for_model(config["model_type"], **kwargs)
        with init_empty_weights():
            model = transformers.AutoModelForCausalLM.from_config(hf)
        model.tie_weights()
        models[key] = model
    model = models[key]
    # accelerate sizes by dtype only: int8 for both quantized precisions (no 4-bit dtype in torch).
    dtype = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8,
             "int4": torch.int8}.get(job["dtype"], torch.bfloat16)
    no_split = model._no_split_modules
    budget = dict.fromkeys(range(len(job["gpus"])), 0)
    for i, b in enumerate(job["gpus"]):
        budget[i] = b
    if len(job["gpus"]) > 1:
        budget = get_balanced_memory(model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
    infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
    maps += 1
print(json.dumps({"maps": maps, "models": len(models), "seconds": time.perf_counter() - t_start}))
"""


def bench_cli(args: argparse.Namespace) -> dict[str, Any]:
    rnd = random.Random(args.seed)
    nodes = synthetic_nodes(args.nodes, rnd)
    docs = synthetic_deployments(args.deployments, rnd)
    with tempfile.TemporaryDirectory() as tmp:
        deps_path, nodes_path = Path(tmp, "deployments.yaml"), Path(tmp, "nodes.yaml")
        deps_path.write_text(yaml.safe_dump_all(docs), encoding="utf-8")
        node_list = {"apiVersion": "v1", "kind": "List", "items": nodes}
        nodes_path.write_text(yaml.safe_dump(node_list), encoding="utf-8")
        kubevram = [sys.executable, "-m", "kubevram.cli", "plan", "-f", str(deps_path),
                    "--cluster", str(nodes_path), "-o", "json"]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        runs = []
        for _ in range(args.repeat):  # the median of several runs: the machine is shared
            t0 = time.perf_counter()
            out = subprocess.run(kubevram, check=True, capture_output=True, text=True, env=env)
            runs.append(time.perf_counter() - t0)
        kubevram_s = statistics.median(runs)
        plan = json.loads(out.stdout)
        # The same number of device maps (one per placed replica), accelerate's way, for the GPUs kubevram
        # chose: their budgets as max_memory.
        from kubevram.planner.catalog import known_config

        by_name = {d["metadata"]["name"]: d for d in docs}
        jobs = []
        for d in plan:
            spec = by_name[d["name"]]["spec"]
            config = dict(known_config(spec["model"]["id"]) or {})
            for replica in d["replicas"]:
                gpus = [replica["reservation"][str(i)] for i in replica["gpus"]]
                jobs.append({"config": config, "dtype": spec["precision"]["weights"], "gpus": gpus})
        jobs_path = Path(tmp, "jobs.json")
        jobs_path.write_text(json.dumps(jobs), encoding="utf-8")
        script = Path(tmp, "accelerate_way.py")
        script.write_text(_ACCELERATE_SCRIPT, encoding="utf-8")
        accelerate: dict[str, Any] = {}
        for mode in ("cache", "rebuild"):
            t0 = time.perf_counter()
            acc = subprocess.run([sys.executable, str(script), str(jobs_path), mode], capture_output=True,
                                 text=True, env=env)
            if acc.returncode:
                raise SystemExit(f"accelerate's way failed:\n{acc.stderr[-3000:]}")
            accelerate[mode] = (time.perf_counter() - t0, json.loads(acc.stdout.strip().splitlines()[-1]))
    placed = sum(len(d["replicas"]) for d in plan)
    return {
        "bench": "cli",
        "deployments": args.deployments,
        "nodes": args.nodes,
        "replicasPlaced": placed,
        "replicasPending": sum(d["unscheduled"]["count"] for d in plan),
        "kubevramPlanSeconds": round(kubevram_s, 3),
        "kubevramPlanRuns": [round(r, 3) for r in runs],
        "accelerateDeviceMaps": accelerate["cache"][1]["maps"],
        "accelerateDistinctModels": accelerate["cache"][1]["models"],
        "accelerateModelsCachedSeconds": round(accelerate["cache"][0], 3),
        "accelerateModelPerMapSeconds": round(accelerate["rebuild"][0], 3),
        "speedupVsCached": round(accelerate["cache"][0] / kubevram_s, 1),
        "speedupVsPerMap": round(accelerate["rebuild"][0] / kubevram_s, 1),
        "goalSpeedup": 20,
    }


def bench_packing(args: argparse.Namespace) -> dict[str, Any]:
    from kubevram.planner.placement import plan_cluster

    rnd = random.Random(args.seed)
    docs = []
    for i in range(args.deployments):
        model = rnd.choice(SMALL + MEDIUM)
        docs.append({
            "apiVersion": "llm.kubevram.io/v1alpha1",
            "kind": "LLMDeployment",
            "metadata": {"name": f"svc-{i:04d}", "namespace": "default"},
            "spec": {
                "replicas": rnd.choice([1, 1, 2]),
                "model": {"id": model},
                "precision": {"weights": rnd.choices(["bfloat16", "int8", "int4"], [60, 20, 20])[0]},
                "serving": {"maxSequenceLength": rnd.choice([1024, 2048, 4096, 8192]),
                            "maxBatchSize": rnd.choice([1, 2, 4])},
                "placement": {"sharing": "shared", "gpusPerReplica": 1},
            },
        })
    deployments = _load(docs)
    gpu_mib = 81920
    # Enough room for everything: every replica could have a GPU of its own.
    replicas = sum(d["spec"]["replicas"] for d in docs)
    nodes = [node(f"a100-ts-{i:03d}", "NVIDIA-A100-SXM4-80GB", gpu_mib, 8, replicas=32)
             for i in range(math.ceil(replicas / 8))]
    t0 = time.perf_counter()
    plan = plan_cluster(deployments, nodes)
    seconds = time.perf_counter() - t0
    used = set()
    slices = 0
    whole = 0
    for d in plan.deployments:
        assert d.error is None and not d.unscheduled, (d.name, d.error, d.reason)
        for r in d.replicas:
            slices += sum(r.reservation.values())
            used.update((r.node, i) for i in r.gpus)
            # Whole-GPU counting: a replica takes the fewest whole GPUs that hold it (1 here).
            whole += len(r.gpus)
    capacity = gpu_mib * MiB
    lower = math.ceil(slices / capacity)
    return {
        "bench": "packing",
        "deployments": args.deployments,
        "replicas": replicas,
        "gpuMemoryGiB": round(capacity / GiB, 1),
        "sliceGiBTotal": round(slices / GiB, 1),
        "gpusUsed": len(used),
        "lowerBound": lower,
        "ratioToLowerBound": round(len(used) / lower, 3),
        "goalRatio": 1.05,
        "wholeGpuCounting": whole,
        "wholeGpuOverKubevram": round(whole / len(used), 2),
        "planSeconds": round(seconds, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["inprocess", "cli", "packing", "all"])
    parser.add_argument("--deployments", type=int)
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    defaults = {"inprocess": (1000, 1000), "cli": (200, 500), "packing": (400, 0)}
    for which in (["inprocess", "cli", "packing"] if args.which == "all" else [args.which]):
        d, n = defaults[which]
        ns = argparse.Namespace(**{**vars(args), "deployments": args.deployments or d,
                                   "nodes": args.nodes or n})
        fn = {"inprocess": bench_inprocess, "cli": bench_cli, "packing": bench_packing}[which]
        print(json.dumps(fn(ns)), flush=True)


if __name__ == "__main__":
    main()

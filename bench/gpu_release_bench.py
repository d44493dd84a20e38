"""In-process memory release and estimate accuracy on a real model shape with random weights.

Llama-3.2-1B from its published config (``kubevram.planner.catalog``) with random weights, saved and
loaded as a worker loads it (``load_weights``), served by the worker's own engine with the memory monitor
as its hooks: greedy generations at growing prompt lengths
(the monitor records each prefill's peak), then ``POST /v1/admin/release``'s procedure through
``MemoryMonitor.release`` (between two engine steps), then one more generation (no restart). Reports:

* per length: prompt tokens, the measured peak allocated bytes of the prefill, the estimate's prediction
  (weights + KV + activations at that many tokens, ``kubevram.planner.estimate``) and the error;
* the release: reserved, allocated and NVML-used bytes before and after, the share of the
  reserved-but-unallocated bytes returned (goal >= 95 %) and the seconds it took (goal <= 1 s);
* the refitted line ``peak = a x tokens + b`` and activation coefficient (``kubevram.planner.calibration``);
* sleep and wake (``POST /v1/admin/sleep?level=1|2``'s procedure, ``MemoryMonitor.sleep``/``wake``): per
  level the weights' bytes moved (1) or dropped (2), the reserved and NVML-used bytes before and after,
  the seconds to sleep and to wake (level 2 reloads the weights from a ``save_pretrained`` copy), and
  whether the same greedy answer comes back.

GPU: ``python bench/gpu_release_bench.py`` (defaults: cuda, bfloat16, lengths 256..8192).
CPU (the same procedure; RSS before/after instead of the allocator): ``python bench/gpu_release_bench.py
--device cpu --dtype float32 --layers 2 --lengths 64 128 256 512``. ``--out FILE`` writes the JSON.
``tests/gpu/test_release_gpu.py`` imports this module and asserts the goals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kubevram.planner.calibration import Fit, activation_bytes_per_token, fit_line
from kubevram.planner.catalog import CONFIGS
from kubevram.planner.estimate import Workload, estimate, layer_activation_bytes
from kubevram.planner.facts import facts_from_config
from kubevram.worker.engine import Engine, SamplingParams
from kubevram.worker.loader import load_weights
from kubevram.worker.memory import MemoryMonitor

MODEL = "meta-llama/llama-3.2-1b"
NEW_TOKENS = 16
MiB = 2**20


def build_tokenizer(vocab_size: int) -> Any:
    """A real word-level tokenizer over the model's whole vocabulary (``t0`` .. ``t<vocab-1>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", eos_token="t1")


def build_model(config: dict[str, Any], device: str, dtype: torch.dtype) -> Any:
    """The model from ``config`` with random weights, built directly on ``device``; tied as published."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "torch_dtype"})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.tie_weights()
    return model.eval()


@dataclass
class Run:
    config: dict[str, Any]
    device: str
    dtype: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    release: dict[str, Any] = field(default_factory=dict)
    after_release: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)
    sleep: dict[str, dict[str, Any]] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)


def predicted_peak(config: dict[str, Any], dtype: str, tokens: int) -> dict[str, int]:
    """The estimate's allocator view at a prefill of ``tokens``: weights, KV, activations (no overhead)."""
    facts = facts_from_config(config)
    workload = Workload(weights=dtype, max_sequence_length=tokens, max_batch_size=1)
    e = estimate(facts, workload)
    return {
        "weightsBytes": e.weightsBytes,
        "kvCacheBytes": e.kvCacheBytes,
        "activationBytes": e.activationBytes,
        "predictedBytes": e.weightsBytes + e.kvCacheBytes + e.activationBytes,
    }


def _cuda_figures() -> dict[str, int]:
    return {"allocatedBytes": torch.cuda.memory_allocated(), "reservedBytes": torch.cuda.memory_reserved()}


async def measure(
    lengths: list[int], *, device: str = "cuda", dtype: str = "bfloat16", layers: int | None = None
) -> Run:
    """Build, generate at each length, release, generate again; every figure in one :class:`Run`."""
    config = dict(CONFIGS[MODEL])
    if layers is not None:
        config["num_hidden_layers"] = layers
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    tokenizer = build_tokenizer(config["vocab_size"])
    # Saved, then loaded as a worker loads it (``load_weights``, no plan): sleep level 2 reloads from the
    # same files, so its answer is comparable (a model built in memory keeps e.g. rotary buffers in the
    # build dtype, one loaded from files does not).
    files = tempfile.TemporaryDirectory(prefix="kubevram-bench-")
    build_model(config, device, torch_dtype).save_pretrained(files.name)
    if device == "cuda":
        torch.cuda.empty_cache()  # the built copy is gone: start from an empty cache
    monitor = MemoryMonitor()
    engine = Engine(
        load_weights(files.name, None), tokenizer, max_batch_size=1,
        max_sequence_length=max(lengths) + 2 * NEW_TOKENS, eos_token_ids=[1], hooks=monitor,
    )
    monitor.bind(engine, reload=lambda: load_weights(files.name, None))
    engine.start()
    run = Run(config, device, dtype)
    run.environment = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "parameters": sum(p.numel() for p in engine.model.parameters()),
    }
    generator = torch.Generator().manual_seed(1)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    try:
        reference: list[int] = []
        for length in lengths:
            prompt = torch.randint(2, config["vocab_size"], (length,), generator=generator).tolist()
            reference = prompt
            started = time.perf_counter()
            out = await engine.submit(prompt, params).result()
            seconds = time.perf_counter() - started
            await engine.run_between_steps(lambda: None)  # the step that finished it is over
            row = {"tokens": length, "completionTokens": out.completion_tokens, "seconds": round(seconds, 3)}
            if device == "cuda":  # samples come from the CUDA allocator's peak counters
                sample = next(s for s in monitor.samples() if s["tokens"] == length)
                row["measuredPeakBytes"] = sample["peakAllocatedBytes"]
                row["baseAllocatedBytes"] = sample["baseAllocatedBytes"]
                row.update(predicted_peak(config, dtype, length))
                row["errorPct"] = round(100 * (row["predictedBytes"] / row["measuredPeakBytes"] - 1), 2)
                row.update(_cuda_figures())
            run.rows.append(row)
        result = await monitor.release("bench")
        before, after = result["before"], result["after"]
        release: dict[str, Any] = {
            "seconds": result["seconds"],
            "rssBeforeBytes": before["rssBytes"],
            "rssAfterBytes": after["rssBytes"],
            "rssFreedBytes": result["rssFreedBytes"],
            "mallocTrimmed": result["mallocTrimmed"],
        }
        if before["devices"]:
            b, a = before["devices"][0], after["devices"][0]
            cached = b["reservedBytes"] - b["allocatedBytes"]
            release.update(
                {
                    "before": b,
                    "after": a,
                    "cachedBeforeBytes": cached,
                    "freedBytes": result["freedBytes"],
                    "returnedShare": round(result["freedBytes"] / cached, 4) if cached else None,
                    "cachedAfterBytes": a["reservedBytes"] - a["allocatedBytes"],
                }
            )
        run.release = release
        again = await engine.submit(reference, params).result()  # also the answer sleeping must keep
        run.after_release = {"completionTokens": again.completion_tokens, "engineSteps": engine.steps}
        points = [(s["tokens"], s["peakAllocatedBytes"]) for s in monitor.samples()]
        fit = fit_line(points)
        if isinstance(fit, Fit):
            facts = facts_from_config(config)
            kv = estimate(facts, Workload(weights=dtype)).kvCacheBytesPerToken
            formula = layer_activation_bytes(facts, Workload(weights=dtype), tokens=1)
            run.fit = {
                "slopeBytesPerToken": round(fit.bytes_per_token),
                "interceptBytes": round(fit.intercept_bytes),
                "r2": round(fit.r2, 6),
                "activationBytesPerToken": activation_bytes_per_token(fit, kv),
                "formulaActivationBytesPerToken": formula,
            }
        else:
            run.fit = {"reason": fit.reason}
        for level in (1, 2):
            slept = await monitor.sleep(level, "bench")
            woke = await monitor.wake("bench")
            answer = await engine.submit(reference, params).result()
            figures: dict[str, Any] = {
                "weightsBytes": slept["weightsBytes"],
                "freedBytes": slept["freedBytes"],
                "rssFreedBytes": slept["rssFreedBytes"],
                "sleepSeconds": slept["seconds"],
                "wakeSeconds": woke["seconds"],
                "sameAnswer": answer.text == again.text,
            }
            if slept["before"]["devices"]:
                figures.update(
                    before=slept["before"]["devices"][0],
                    asleep=slept["after"]["devices"][0],
                    awake=woke["after"]["devices"][0],
                )
            run.sleep[str(level)] = figures
    finally:
        engine.stop()
        files.cleanup()
    return run


def report(run: Run) -> str:
    env = run.environment
    lines = [
        f"{MODEL} ({env.get('parameters', 0) / 1e9:.2f}B parameters, "
        f"{run.config['num_hidden_layers']} layers, random weights), {run.dtype} on {env.get('device')}",
        "| tokens | measured peak | predicted | error | prefill + 16 tokens |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in run.rows:
        measured = f"{row['measuredPeakBytes'] / MiB:.1f} MiB" if "measuredPeakBytes" in row else "-"
        predicted = f"{row['predictedBytes'] / MiB:.1f} MiB" if "predictedBytes" in row else "-"
        error = f"{row['errorPct']:+.2f} %" if "errorPct" in row else "-"
        lines.append(f"| {row['tokens']} | {measured} | {predicted} | {error} | {row['seconds']:.3f} s |")
    r = run.release
    if "cachedBeforeBytes" in r:
        b, a = r["before"], r["after"]
        lines.append(
            f"release: {r['freedBytes'] / MiB:.1f} of {r['cachedBeforeBytes'] / MiB:.1f} MiB cached returned "
            f"({100 * (r['returnedShare'] or 0):.1f} %, goal >= 95 %) in {r['seconds']:.3f} s (goal <= 1 s)"
        )
        lines.append(
            f"  reserved {b['reservedBytes'] / MiB:.1f} -> {a['reservedBytes'] / MiB:.1f} MiB, allocated "
            f"{b['allocatedBytes'] / MiB:.1f} -> {a['allocatedBytes'] / MiB:.1f} MiB, NVML used "
            f"{(b['nvmlUsedBytes'] or 0) / MiB:.0f} -> {(a['nvmlUsedBytes'] or 0) / MiB:.0f} MiB"
        )
    trimmed = "returned pages" if r["mallocTrimmed"] else "returned nothing"
    lines.append(
        f"release: RSS {r['rssBeforeBytes'] / MiB:.1f} -> {r['rssAfterBytes'] / MiB:.1f} MiB "
        f"({r['rssFreedBytes'] / MiB:+.1f} MiB freed; malloc_trim {trimmed}) in {r['seconds']:.3f} s"
    )
    lines.append(f"after the release: {run.after_release['completionTokens']} tokens generated, same process")
    lines.append(f"fit: {json.dumps(run.fit)}")
    for level, s in run.sleep.items():
        where = f"{s['freedBytes'] / MiB:.1f} MiB of GPU memory freed" if "before" in s else "RSS"
        lines.append(
            f"sleep level {level}: {s['weightsBytes'] / MiB:.1f} MiB of weights "
            f"{'moved to CPU memory' if level == '1' else 'dropped'}, {where} "
            f"({s['rssFreedBytes'] / MiB:+.1f} MiB RSS) in {s['sleepSeconds']:.3f} s; woke in "
            f"{s['wakeSeconds']:.3f} s; same answer: {s['sameAnswer']}"
        )
        if "before" in s:
            b, a, w = s["before"], s["asleep"], s["awake"]
            lines.append(
                f"  reserved {b['reservedBytes'] / MiB:.1f} -> {a['reservedBytes'] / MiB:.1f} -> "
                f"{w['reservedBytes'] / MiB:.1f} MiB, NVML used {(b['nvmlUsedBytes'] or 0) / MiB:.0f} -> "
                f"{(a['nvmlUsedBytes'] or 0) / MiB:.0f} -> {(w['nvmlUsedBytes'] or 0) / MiB:.0f} MiB "
                "(awake, asleep, awake again)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (CPU runs)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu, or on a GPU machine", file=sys.stderr)
        return 2
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    run = asyncio.run(measure(sorted(args.lengths), device=args.device, dtype=dtype, layers=args.layers))
    print(report(run))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(run.__dict__, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

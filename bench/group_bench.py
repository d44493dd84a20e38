"""The per-token cost of one replica over 1, 2 and 4 ranks on the CPU (gloo on 127.0.0.1).

A small random Llama (hidden 512, 8 layers, 8 heads, 4 KV heads, intermediate 1536, the tests' CJK
tokenizer) served three ways, each through the leader's HTTP API, greedy, one request at a time:

* 1 rank: ``kubevram worker`` alone (the single-pod path);
* 2 ranks: two pods of one rank each, as LeaderWorkerSet starts them (two pipeline stages);
* 4 ranks: two pods of two local ranks each (tensor parallel 2 x 2 pipeline stages).

Per configuration, medians of ``--repeat`` requests: the time of a one-token request (the prefill of a
20-token prompt and the first token) and the decode cost per token (a ``--tokens``-token request less
the one-token one, over the tokens after the first); and whether the text equals the one-rank text.
On a CPU the ranks share the machine's cores, so these figures are the cost of the group's machinery
(one control broadcast per step, the stages' send/receive, the tensor-parallel all-reduces), not a
speed-up.

    python bench/group_bench.py [--tokens 64] [--repeat 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path) -> ModuleType:
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_model(directory: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _load("worker_conftest", ROOT / "tests" / "worker" / "conftest.py").build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def measure(url: str, tokens: int, repeat: int) -> dict[str, Any]:
    """Median time of a 1-token request (the prefill, the first token) and the decode cost per token:
    (time of a ``tokens``-token request - time of a 1-token one) / (tokens - 1)."""
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    prompt = "the quick brown fox jumps over the lazy dog and then the model says hello world to every user"
    body = {"model": model, "prompt": prompt, "temperature": 0, "ignore_eos": True}

    def timed(n: int) -> tuple[float, str]:
        start = time.perf_counter()
        answer = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": n}, timeout=600).json()
        return time.perf_counter() - start, answer["choices"][0]["text"]

    timed(tokens)  # warm-up
    firsts = [timed(1)[0] for _ in range(repeat)]
    fulls = [timed(tokens) for _ in range(repeat)]
    first, full = statistics.median(firsts), statistics.median(t for t, _ in fulls)
    per_token = (full - first) / (tokens - 1)
    return {"ttft_ms": 1000 * first, "per_token_ms": 1000 * per_token, "text": fulls[0][1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per process (OMP_NUM_THREADS)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # every worker process inherits it
    helpers = _load("group_helpers", ROOT / "tests" / "worker" / "group_helpers.py")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        model_dir = directory / "model"
        build_model(model_dir)
        layouts = [("1 rank (one pod)", 1, 1), ("2 ranks (2 pods x 1: PP 2)", 2, 1),
                   ("4 ranks (2 pods x 2: TP 2 x PP 2)", 2, 2)]
        for label, pods, per_pod in layouts:
            work = directory / f"g{pods}x{per_pod}"
            work.mkdir()
            if pods == 1:
                group = helpers.start_single(model_dir, work, sequence=1024, batch=1)
            else:
                group = helpers.start_group(model_dir, work, pods, per_pod, sequence=1024, batch=1)
            try:
                rows.append((label, measure(group.leader.url, args.tokens, args.repeat)))
            finally:
                helpers.stop_group(group)
    reference = rows[0][1]["text"]
    print(f"{'layout':<36} {'first token':>12} {'per token':>10}  same text as 1 rank")
    for label, row in rows:
        same = row["text"] == reference
        print(f"{label:<36} {row['ttft_ms']:>9.1f} ms {row['per_token_ms']:>7.1f} ms  {same}")


if __name__ == "__main__":
    main()

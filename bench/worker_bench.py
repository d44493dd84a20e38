"""The worker's speed: steering on a 152k vocabulary, engine vs ``model.generate``, 32 concurrent clients.

A tiny random Llama with Qwen2's vocabulary size (152,064) stands in for a real model: the per-step
cost of a logits processor depends on the vocabulary, not on the model, and a small model makes any
processor overhead *more* visible, not less. The steering token sets are synthetic (no tokenizer can be
downloaded here): 25,000 "CJK" ids and 1,000 punctuation ids drawn at random, about what Qwen2's
vocabulary holds. Text is decoded by a WordLevel tokenizer over the same 152,064 ids.

    python bench/worker_bench.py [--tokens 128] [--repeat 3] [--clients 32] [--device cpu|cuda]
    python bench/worker_bench.py --only processors|steering|generate|concurrency|serve

Sections (each prints a table):
  processors   one call on (batch, 152064) logits: the seed's Python loop vs the vectorised processors
  steering     engine decode throughput, Chinese steering off vs on (alpha 5, leading punctuation
               suppressed), batch 1 and 4; goal: on is at most 10% slower
  generate     the engine vs plain ``model.generate`` on the same model, greedy, batch 1; also through
               the HTTP API; goal: the engine within 10%
  concurrency  ``--clients`` concurrent HTTP clients on a real server (max batch 8): none lost
  hostile      ``/healthz`` latency and the process's RSS while one client sends a 50 MB body and
               another the longest prompt that passes the cheap length bound (issue 14's goal:
               /healthz within 100 ms whatever a client sends)
  serve        side by side, each in a process of its own, on the same model saved to a directory:
               ``kubevram worker`` (max batch ``--clients``) and ``transformers serve`` (with and without
               its continuous batching), greedy, 1 client then ``--clients`` clients: decode tokens/s
               and whether the texts are identical
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "worker"))

from kubevram.worker.engine import Engine, SamplingParams
from kubevram.worker.logits import (
    ChineseLogitsProcessor,
    SuppressLeadingPunctuationLogitsProcessor,
    TokenClasses,
)

VOCAB = 152_064
N_CJK = 25_000
N_PUNCT = 1_000
EOS = 151_643  # Qwen2's <|endoftext|>


class SeedChineseLogitsProcessor:
    """The seed article's processor, verbatim in substance: a Python loop, and a multiplication."""

    def __init__(self, chinese_token_id_list: list[int], alpha: float = 5) -> None:
        self.chinese_token_id_list = chinese_token_id_list
        self.alpha = alpha

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for id_ in self.chinese_token_id_list:
            scores[:, id_] *= self.alpha
        return scores


def build(device: str, hidden: int, layers: int) -> tuple[Any, Any, TokenClasses]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=4096,
        eos_token_id=EOS,
        bos_token_id=EOS,
        pad_token_id=EOS,
    )
    model = LlamaForCausalLM(config).to(device).eval()
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{EOS}", pad_token=f"t{EOS}")
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(VOCAB - 1000, generator=g).tolist()
    classes = TokenClasses.from_ids(VOCAB, perm[:N_CJK], perm[N_CJK : N_CJK + N_PUNCT], [EOS])
    return model, tokenizer, classes


def _clock(fn: Callable[[], Any]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def timed(fn: Callable[[], Any], repeat: int) -> float:
    """Median seconds of ``repeat`` calls after one warm-up."""
    fn()
    return statistics.median(_clock(fn) for _ in range(repeat))


def alternating(fns: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """Median seconds of each function, called in turn ``repeat`` times (A B A B ...) after a warm-up,
    so that load from other processes on a shared machine falls on all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(_clock(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n## {title}\n")
    for i, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def bench_processors(classes: TokenClasses, device: str, repeat: int) -> None:
    rows = []
    cjk_ids = classes.cjk.nonzero().flatten().tolist()
    for batch in (1, 4):
        scores = torch.randn(batch, VOCAB, device=device)
        ids = torch.zeros(batch, 10, dtype=torch.long, device=device)
        mask = classes.to(device)
        ours = ChineseLogitsProcessor(mask.boosted, torch.full((batch, 1), 5.0))
        suppress = SuppressLeadingPunctuationLogitsProcessor(mask.punctuation, [10] * batch)
        seed = SeedChineseLogitsProcessor(cjk_ids, 5.0)
        t_ours = timed(lambda: ours(ids, scores), repeat * 20)  # noqa: B023
        t_sup = timed(lambda: suppress(ids, scores), repeat * 20)  # noqa: B023
        t_seed = timed(lambda: seed(ids, scores.clone()), max(1, repeat))  # noqa: B023
        rows.append([batch, t_seed * 1e3, t_ours * 1e3, t_sup * 1e3, f"{t_seed / t_ours:,.0f}x"])
    table(
        f"One processor call on (batch, {VOCAB}) logits, {N_CJK} CJK ids (ms)",
        ["batch", "seed loop", "ChineseLogitsProcessor", "SuppressLeadingPunctuation", "seed / ours"],
        rows,
    )


async def _engine_run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> int:
    handles = [engine.submit(p, params) for p in prompts]
    results = await asyncio.gather(*[h.result() for h in handles])
    return sum(r.completion_tokens for r in results)


def bench_steering(model: Any, tokenizer: Any, classes: TokenClasses, args: argparse.Namespace) -> None:
    engine = Engine(model, tokenizer, max_batch_size=8, token_classes=classes, eos_token_ids=[EOS])
    engine.start()
    rows = []
    try:
        for batch in (1, 4):
            prompts = [list(range(100 + i, 132 + i)) for i in range(batch)]
            base = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
            on = SamplingParams(
                max_tokens=args.tokens,
                temperature=0,
                ignore_eos=True,
                chinese_alpha=5.0,
                suppress_leading_punctuation=True,
            )
            sampled = SamplingParams(max_tokens=args.tokens, temperature=0.7, top_p=0.9, ignore_eos=True)
            sampled_on = SamplingParams(
                max_tokens=args.tokens,
                temperature=0.7,
                top_p=0.9,
                ignore_eos=True,
                chinese_alpha=5.0,
                suppress_leading_punctuation=True,
            )
            for label, off_params, on_params in (("greedy", base, on), ("top_p 0.9", sampled, sampled_on)):
                seconds = alternating(
                    {
                        "off": lambda p=off_params: asyncio.run(_engine_run(engine, prompts, p)),  # noqa: B023
                        "on": lambda p=on_params: asyncio.run(_engine_run(engine, prompts, p)),  # noqa: B023
                    },
                    args.repeat,
                )
                tokens = batch * args.tokens
                t_off, t_on = tokens / seconds["off"], tokens / seconds["on"]
                rows.append([batch, label, t_off, t_on, f"{(t_off / t_on - 1) * 100:+.1f}%"])
    finally:
        engine.stop()
    table(
        f"Engine decode, steering off vs on ({args.tokens} tokens per request, tokens/s, "
        f"median of {args.repeat})",
        ["batch", "sampling", "off", "on", "on slower by"],
        rows,
    )


def bench_seed_generate(model: Any, classes: TokenClasses, args: argparse.Namespace) -> None:
    """ms per generated token with ``model.generate``: no processor, ours, the seed's loop."""
    from transformers import LogitsProcessorList

    prompt = torch.arange(100, 132, device=args.device)[None]
    steps = 16
    cjk_ids = classes.cjk.nonzero().flatten().tolist()
    mask = classes.to(args.device)
    variants = {
        "none": LogitsProcessorList(),
        "ours": LogitsProcessorList([ChineseLogitsProcessor(mask.boosted, 5.0)]),
        "seed loop": LogitsProcessorList([SeedChineseLogitsProcessor(cjk_ids, 5.0)]),
    }

    def run(processors: Any) -> None:
        model.generate(
            prompt,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            logits_processor=processors,
            pad_token_id=EOS,
        )

    seconds = alternating({name: lambda p=p: run(p) for name, p in variants.items()}, args.repeat)
    base = seconds["none"] / steps * 1e3
    rows = [[name, s / steps * 1e3, f"{s / steps * 1e3 - base:+.1f}"] for name, s in seconds.items()]
    table(
        f"model.generate with each Chinese processor, batch 1, {steps} tokens (ms per token, median of "
        f"{args.repeat})",
        ["processor", "ms/token", "added ms/token"],
        rows,
    )


def _serve(engine: Engine, max_batch: int) -> tuple[Any, str]:
    import socket

    import uvicorn

    from kubevram.api.v1alpha1 import ServingSpec
    from kubevram.worker.api import create_app
    from kubevram.worker.service import WorkerState

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    state = WorkerState(
        model_names=["bench"],
        serving=ServingSpec(maxBatchSize=max_batch, maxSequenceLength=4096),
        engine=engine,
    )
    engine.hooks = state.metrics
    state.metrics.bind(engine)
    server = uvicorn.Server(
        uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return server, f"http://127.0.0.1:{port}"


def bench_generate(model: Any, tokenizer: Any, classes: TokenClasses, args: argparse.Namespace) -> None:
    import httpx

    n = args.tokens
    prompt = list(range(100, 132))
    prompt_tensor = torch.tensor([prompt], device=args.device)

    def generate() -> None:
        out = model.generate(
            prompt_tensor, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=EOS
        )
        assert out.shape[1] == len(prompt) + n

    engine = Engine(model, tokenizer, max_batch_size=8, token_classes=classes, eos_token_ids=[EOS])
    engine.start()
    server, url = _serve(engine, 8)
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}

    def http() -> None:
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=600).json()
        assert answer["usage"]["completion_tokens"] == n

    try:
        seconds = alternating(
            {
                "generate": generate,
                "engine": lambda: asyncio.run(_engine_run(engine, [prompt], params)),
                "http": http,
            },
            args.repeat,
        )
    finally:
        server.should_exit = True
        engine.stop()
    t_generate, t_engine, t_http = (n / seconds[k] for k in ("generate", "engine", "http"))
    table(
        f"Greedy decode, batch 1, {n} tokens (tokens/s, median of {args.repeat})",
        ["path", "tokens/s", "vs model.generate"],
        [
            ["model.generate", t_generate, "1.00"],
            ["Engine (in process)", t_engine, f"{t_engine / t_generate:.2f}"],
            ["HTTP /v1/completions", t_http, f"{t_http / t_generate:.2f}"],
        ],
    )


def bench_concurrency(model: Any, tokenizer: Any, classes: TokenClasses, args: argparse.Namespace) -> None:
    import httpx

    engine = Engine(
        model, tokenizer, max_batch_size=8, max_queue=256, token_classes=classes, eos_token_ids=[EOS]
    )
    engine.start()
    server, url = _serve(engine, 8)
    n = args.tokens

    async def client(http: httpx.AsyncClient, i: int) -> tuple[int, int, float]:
        t0 = time.perf_counter()
        response = await http.post(
            "/v1/completions",
            json={
                "prompt": list(range(100 + i, 132 + i)),
                "max_tokens": n,
                "temperature": 0.7,
                "seed": i,
                "ignore_eos": True,
                "chinese": i % 2 == 0,
                "stream": False,
            },
        )
        tokens = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0
        return response.status_code, tokens, time.perf_counter() - t0

    async def run() -> tuple[list[tuple[int, int, float]], float]:
        limits = httpx.Limits(max_connections=args.clients)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
            t0 = time.perf_counter()
            results = await asyncio.gather(*[client(http, i) for i in range(args.clients)])
            return list(results), time.perf_counter() - t0

    try:
        results, wall = asyncio.run(run())
    finally:
        server.should_exit = True
        engine.stop()
    ok = [r for r in results if r[0] == 200 and r[1] == n]
    latencies = sorted(r[2] for r in results)
    table(
        f"{args.clients} concurrent clients, {n} tokens each, max batch 8, half of them steered",
        ["answered", "lost", "wall s", "tokens/s", "latency p50 s", "latency max s"],
        [
            [
                f"{len(ok)}/{args.clients}",
                args.clients - len(ok),
                wall,
                sum(r[1] for r in ok) / wall,
                latencies[len(latencies) // 2],
                latencies[-1],
            ]
        ],
    )


def _process(command: list[str], url: str, probe: str, threads: int = 0) -> Any:
    """Start ``command`` (with ``threads`` OpenMP threads, if given); return it once ``url + probe``
    answers 200."""
    import os
    import subprocess

    import httpx

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{command[0]} exited with {proc.returncode}")
        try:
            if httpx.get(url + probe, timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{' '.join(command)} did not start")


def _clients(url: str, model: str, prompts: list[str], n: int) -> tuple[float, int, list[str], int]:
    """All ``prompts`` at once, greedy, ``n`` tokens each: (wall seconds, tokens, texts, failures)."""
    import httpx

    async def one(http: httpx.AsyncClient, prompt: str) -> tuple[int, str]:
        body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0}
        response = await http.post("/v1/completions", json=body)
        if response.status_code != 200:
            return -1, response.text[:200]
        payload = response.json()
        return int(payload["usage"]["completion_tokens"]), payload["choices"][0]["text"]

    async def run() -> tuple[float, list[tuple[int, str]]]:
        limits = httpx.Limits(max_connections=len(prompts))
        async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as http:
            t0 = time.perf_counter()
            results = await asyncio.gather(*[one(http, p) for p in prompts])
            return time.perf_counter() - t0, list(results)

    wall, results = asyncio.run(run())
    ok = [r for r in results if r[0] >= 0]
    return wall, sum(r[0] for r in ok), [r[1] for r in results], len(results) - len(ok)


def bench_serve(model: Any, tokenizer: Any, args: argparse.Namespace) -> None:
    """kubevram worker vs transformers serve, each in its own process, on one model directory."""
    import socket
    import subprocess
    import tempfile

    directory = tempfile.mkdtemp(prefix="kubevram-bench-model-")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)

    def port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    n = args.tokens
    prompts = [" ".join(f"t{100 + i + j}" for j in range(32)) for i in range(args.clients)]
    servers = {
        "kubevram worker": (
            [
                "kubevram",
                "worker",
                "--model",
                directory,
                "--max-batch-size",
                "8",
                "--max-sequence-length",
                "4096",
                "--host",
                "127.0.0.1",
                "--log-level",
                "warning",
                "--port",
            ],
            "/readyz",
        ),
        "transformers serve": (
            ["transformers", "serve", directory, "--device", args.device, "--host", "127.0.0.1", "--port"],
            "/health",
        ),
        "transformers serve --continuous-batching": (
            [
                "transformers",
                "serve",
                directory,
                "--device",
                args.device,
                "--continuous-batching",
                "--host",
                "127.0.0.1",
                "--port",
            ],
            "/health",
        ),
    }
    rows, texts = [], {}
    for name, (command, probe) in servers.items():
        p = port()
        url = f"http://127.0.0.1:{p}"
        try:
            proc = _process([*command, str(p)], url, probe, args.threads)
        except RuntimeError as exc:
            rows.append([name, str(exc), "", "", ""])
            continue
        try:
            _clients(url, directory, prompts[:1], 4)  # warm-up
            for clients in (1, args.clients):
                wall, tokens, outs, failed = _clients(url, directory, prompts[:clients], n)
                texts[(name, clients)] = outs
                rows.append([name, clients, tokens / wall, wall, failed])
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    table(
        f"Greedy decode over HTTP, {n} tokens per request, each server in its own process (tokens/s)",
        ["server", "clients", "tokens/s", "wall s", "failed"],
        rows,
    )
    base = {k[1]: v for k, v in texts.items() if k[0] == "kubevram worker"}
    for (name, clients), outs in texts.items():
        if name != "kubevram worker" and clients in base:
            same = sum(a == b for a, b in zip(outs, base[clients], strict=True))
            print(f"- {name}, {clients} client(s): {same}/{len(outs)} texts identical to kubevram's")


def bench_hostile(model: Any, tokenizer: Any, classes: TokenClasses, args: argparse.Namespace) -> None:
    """/healthz latency and RSS while hostile requests are served (max sequence 4096)."""
    import httpx
    import psutil

    engine = Engine(model, tokenizer, max_batch_size=8, token_classes=classes, eos_token_ids=[EOS])
    engine.start()
    server, url = _serve(engine, 8)
    process = psutil.Process()
    longest = max(len(piece) for piece in tokenizer.get_vocab())
    megabyte = b"t1 " * (2**20 // 3)

    def body50() -> Any:
        yield b'{"prompt": "'
        for _ in range(args.body_mb):
            yield megabyte
        yield b'"}'

    cases = {
        "idle": None,
        f"{args.body_mb} MB body": lambda: httpx.post(f"{url}/v1/completions", content=body50(), timeout=600),
        # Past the cheap bound it is refused untokenised; just under it, it is tokenised on the
        # preparation thread (then refused as too long in tokens).
        f"prompt of 4096 x {longest} characters, tokenised": lambda: httpx.post(
            f"{url}/v1/completions", json={"prompt": "t1 " * (4096 * longest // 3)}, timeout=600
        ),
    }
    rows = []
    try:
        for name, send in cases.items():
            base = process.memory_info().rss
            peak, latencies, status = base, [], None
            result: dict[str, Any] = {}
            thread = None
            if send is not None:
                thread = threading.Thread(target=lambda s=send, out=result: out.update(r=s()))
                thread.start()
            with httpx.Client(base_url=url, timeout=60) as client:
                for _ in range(200 if thread is None else 10**6):
                    t0 = time.perf_counter()
                    assert client.get("/healthz").status_code == 200
                    latencies.append(time.perf_counter() - t0)
                    peak = max(peak, process.memory_info().rss)
                    if thread is not None and not thread.is_alive():
                        break
            if thread is not None:
                thread.join()
                status = result["r"].status_code
            latencies.sort()
            rows.append(
                [
                    name,
                    status or "",
                    len(latencies),
                    latencies[len(latencies) // 2] * 1e3,
                    latencies[int(len(latencies) * 0.99)] * 1e3,
                    latencies[-1] * 1e3,
                    (peak - base) / 2**20,
                ]
            )
    finally:
        server.should_exit = True
        engine.stop()
    table(
        "/healthz while a hostile request is served (ms; RSS growth of the server's process, MiB)",
        ["request", "its status", "healthz answers", "p50 ms", "p99 ms", "max ms", "RSS peak +MiB"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--body-mb", type=int, default=50, help="hostile: the large body's size in MB")
    parser.add_argument(
        "--only", choices=["processors", "steering", "generate", "concurrency", "hostile", "serve"]
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, classes = build(args.device, args.hidden, args.layers)
    print(
        f"# worker bench: vocab {VOCAB}, hidden {args.hidden}, layers {args.layers}, device {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    with torch.inference_mode():
        if args.only in (None, "processors"):
            bench_processors(classes, args.device, args.repeat)
            bench_seed_generate(model, classes, args)
    if args.only in (None, "steering"):
        bench_steering(model, tokenizer, classes, args)
    if args.only in (None, "generate"):
        bench_generate(model, tokenizer, classes, args)
    if args.only in (None, "concurrency"):
        bench_concurrency(model, tokenizer, classes, args)
    if args.only in (None, "hostile"):
        bench_hostile(model, tokenizer, classes, args)
    if args.only in (None, "serve"):
        bench_serve(model, tokenizer, args)


if __name__ == "__main__":
    main()

"""Loading as planned, request-to-sampling translation, the engine hook and `kubevram worker` itself."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch
from http_helpers import Pause, metric, scrape, start_worker, stopping, wait_for

from kubevram.api.errors import SpecError
from kubevram.api.v1alpha1 import ChineseSpec, GenerationDefaults, GenerationSpec, ServingSpec
from kubevram.api.workerplan import WorkerPlan
from kubevram.worker.engine import Engine, EngineError, SamplingParams
from kubevram.worker.loader import from_pretrained_kwargs, load
from kubevram.worker.protocol import ChatCompletionRequest, CompletionRequest
from kubevram.worker.serve import build_state
from kubevram.worker.service import WorkerState


def plan(**fields) -> WorkerPlan:
    return WorkerPlan.parse({"deployment": {"name": "tiny"}, "model": {"id": "tiny"}, **fields})


def test_kwargs_pass_the_plan_through():
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": "cpu"}
    kwargs = from_pretrained_kwargs(
        plan(precision={"weights": "float16"}, deviceMap=device_map, maxMemory={"0": 10, "1": 20, "cpu": 30}),
        cuda=True,
    )
    assert kwargs == {
        "trust_remote_code": False,
        "dtype": torch.float16,
        "device_map": device_map,
        "max_memory": {0: 10, 1: 20, "cpu": 30},
    }


def test_kwargs_disk_offload_and_quantization():
    kwargs = from_pretrained_kwargs(
        plan(precision={"weights": "int4"}, deviceMap={"model": 0, "lm_head": "disk"}), cuda=True
    )
    assert kwargs["offload_folder"] == "/tmp/kubevram-offload"
    config = kwargs["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert from_pretrained_kwargs(plan(precision={"weights": "int8"}), cuda=True)[
        "quantization_config"
    ].load_in_8bit
    assert from_pretrained_kwargs(plan(offloadFolder="/scratch"), cuda=False)["offload_folder"] == "/scratch"


def test_kwargs_without_a_plan_use_what_is_there():
    assert from_pretrained_kwargs(None, cuda=False) == {"dtype": torch.float32}
    assert from_pretrained_kwargs(None, cuda=True) == {"dtype": "auto", "device_map": "auto"}


async def test_load_follows_an_explicit_device_map_with_disk_offload(tiny_model_dir, tmp_path):
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    the_plan = plan(
        precision={"weights": "bfloat16"},
        deviceMap=device_map,
        maxMemory={"cpu": 2**30},
        offloadFolder=str(tmp_path / "offload"),
    )
    loaded = load(str(tiny_model_dir), the_plan)
    assert loaded.model.dtype == torch.bfloat16
    assert loaded.model.hf_device_map == device_map
    assert loaded.model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # on disk
    assert loaded.eos_token_ids == [loaded.tokenizer.eos_token_id]
    assert int(loaded.token_classes.cjk.sum()) > 100
    # The engine generates through accelerate's offload hooks.
    engine = Engine(
        loaded.model, loaded.tokenizer, token_classes=loaded.token_classes, eos_token_ids=loaded.eos_token_ids
    )
    engine.start()
    try:
        handle = engine.submit(
            loaded.tokenizer("hello")["input_ids"],
            SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
        )
        assert (await handle.result()).completion_tokens == 4
    finally:
        engine.stop()


def state(**generation) -> WorkerState:
    return WorkerState(
        model_names=["m"], serving=ServingSpec(maxSequenceLength=100), generation=GenerationSpec(**generation)
    )


def test_sampling_params_defaults_and_overrides():
    st = state(
        defaults=GenerationDefaults(temperature=0.5, topP=0.8, maxNewTokens=64, repetitionPenalty=1.1),
        chinese=ChineseSpec(enabled=True, alpha=3.0),
    )
    params = st.sampling_params(CompletionRequest(prompt="x"), prompt_tokens=50)
    assert params == SamplingParams(
        max_tokens=50,
        temperature=0.5,
        top_p=0.8,
        repetition_penalty=1.1,
        chinese_alpha=3.0,
        suppress_leading_punctuation=True,
    )
    off = st.sampling_params(CompletionRequest(prompt="x", chinese=False, max_tokens=5, stop="a"), 1)
    assert (off.chinese_alpha, off.suppress_leading_punctuation, off.max_tokens, off.stop) == (
        1.0,
        False,
        5,
        ("a",),
    )
    strong = st.sampling_params(CompletionRequest(prompt="x", chinese={"alpha": 9.0}), 1)
    assert strong.chinese_alpha == 9.0
    assert strong.max_tokens == 64
    chat = ChatCompletionRequest(
        messages=[{"role": "user", "content": "hi"}],
        max_completion_tokens=7,
        chinese={"alpha": 2.0, "suppressLeadingPunctuation": False},
        temperature=0,
    )
    params = state().sampling_params(chat, 1)
    assert (params.max_tokens, params.chinese_alpha, params.suppress_leading_punctuation) == (7, 2.0, False)
    assert params.temperature == 0


def test_build_state_reads_plan_and_flags(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(
        plan(
            serving={"maxBatchSize": 8, "maxSequenceLength": 2048}, generation={"chinese": {"enabled": True}}
        ).to_json()
    )
    args = argparse.Namespace(
        model="/models/tiny",
        plan=str(path),
        deployment=None,
        max_batch_size=2,
        max_sequence_length=None,
        served_model_name=None,
    )
    st, loaded_plan = build_state(args)
    assert loaded_plan is not None
    assert (st.serving.maxBatchSize, st.serving.maxSequenceLength) == (2, 2048)
    assert st.generation.chinese.enabled
    assert st.model_names == ["tiny", "/models/tiny"]


def test_build_state_reads_a_deployment_without_a_plan():
    example = Path(__file__).resolve().parents[2] / "examples" / "chinese-chat.yaml"
    args = argparse.Namespace(
        model="meta-llama/Llama-2-7b-chat-hf",
        plan=None,
        deployment=str(example),
        max_batch_size=None,
        max_sequence_length=None,
        served_model_name="zh",
    )
    st, loaded_plan = build_state(args)
    assert loaded_plan is None
    assert st.generation.chinese.enabled
    assert st.generation.chinese.alpha == 5.0
    assert st.serving.maxBatchSize == 2
    assert st.model_names == ["zh", "meta-llama/Llama-2-7b-chat-hf"]
    missing = argparse.Namespace(**{**vars(args), "deployment": "/nonexistent.yaml"})
    with pytest.raises(SpecError, match="cannot read the deployment"):
        build_state(missing)


async def test_run_between_steps_runs_on_the_engine_thread(loaded):
    engine = Engine(
        loaded.model, loaded.tokenizer, token_classes=loaded.token_classes, eos_token_ids=loaded.eos_token_ids
    )
    engine.start()
    try:
        import threading

        assert await engine.run_between_steps(lambda: threading.current_thread().name) == "kubevram-engine"

        def boom() -> None:
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            await engine.run_between_steps(boom)
        handle = engine.submit(
            loaded.tokenizer("hello")["input_ids"], SamplingParams(max_tokens=3, temperature=0)
        )
        steps = await engine.run_between_steps(lambda: engine.steps)
        result = await handle.result()
        assert result.completion_tokens <= 3
        assert steps <= engine.steps
        with pytest.raises(EngineError, match="maximum context length is 4096"):
            engine.submit([1] * 4000, SamplingParams(max_tokens=97))
    finally:
        engine.stop()


def test_bad_plan_exits_2_naming_the_field(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(
        json.dumps({"deployment": {"name": "x"}, "model": {"id": "x"}, "precision": {"weights": "fp7"}})
    )
    done = subprocess.run(
        [sys.executable, "-m", "kubevram.cli", "worker", "--model", "x", "--plan", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "precision.weights: 'fp7' is not one of" in done.stderr


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--max-sequence-length", "-5"], "kubevram worker: --max-sequence-length: -5 must be >= 1"),
        (["--max-batch-size", "0"], "kubevram worker: --max-batch-size: 0 must be >= 1"),
        (["--max-queue", "0"], "kubevram worker: --max-queue: 0 must be >= 1"),
        (["--drain-seconds", "-1"], "kubevram worker: --drain-seconds: -1.0 must be >= 0"),
        ([], "kubevram worker: --model: '/no/such/model': no such directory"),
    ],
)
def test_bad_worker_flags_are_one_line_and_exit_2(flags, line, capsys):
    from kubevram.cli import main

    assert main(["worker", "--model", "/no/such/model" if not flags else "x", *flags]) == 2
    assert capsys.readouterr().err == line + "\n"


def _start_worker(model_dir: Path, tmp_path: Path, *flags: str, env: dict | None = None):
    """``kubevram worker`` with a plan of batch 2, sequences of 512, steering on: (process, url)."""
    path = tmp_path / "plan.json"
    path.write_text(
        plan(
            serving={"maxBatchSize": 2, "maxSequenceLength": 512},
            precision={"weights": "float32"},
            generation={"chinese": {"enabled": True, "alpha": 10000.0}},
        ).to_json()
    )
    proc, url, _ = start_worker(model_dir, "--plan", str(path), *flags, env=env)
    return proc, url


LONG_STREAM = {
    "prompt": "hello",
    "max_tokens": 160,  # long enough to be in flight while the test looks at the worker
    "temperature": 0,
    "ignore_eos": True,
    "stream": True,
    "stream_options": {"include_usage": True},
}


@pytest.mark.slow
def test_kubevram_worker_serves_then_drains_on_sigterm(tiny_model_dir, tmp_path):
    """Serve after loading; on SIGTERM let the running stream finish, remove this pod's status entry
    (kmock's emulator stands for the API server) and exit 0."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
    from kubevram_emulator import EmulatedCluster, llm_deployment

    cluster = EmulatedCluster(tmp_path).start()
    try:
        cluster.create_llmd(llm_deployment("tiny", "tiny"))
        env = {
            "KUBEVRAM_API_URL": cluster.url,
            "KUBEVRAM_POD_NAME": "tiny-0",
            "KUBEVRAM_DEPLOYMENT": "tiny",
            "KUBEVRAM_NAMESPACE": "default",
        }
        proc, url = _start_worker(tiny_model_dir, tmp_path, env=env)
        with stopping(proc) as done:
            models = httpx.get(f"{url}/v1/models").json()["data"]
            assert [m["id"] for m in models] == ["tiny", str(tiny_model_dir)]
            assert models[0]["max_model_len"] == 512
            answer = httpx.post(
                f"{url}/v1/completions",
                json={"prompt": "hello", "max_tokens": 8, "temperature": 0},
                timeout=60,
            ).json()
            assert answer["usage"]["completion_tokens"] >= 1
            text = answer["choices"][0]["text"]
            assert any("\u4e00" <= c <= "\u9fff" for c in text)  # the plan's default steering applies
            cluster.wait_for("the status entry", lambda: "tiny-0" in _workers(cluster))
            with httpx.stream("POST", f"{url}/v1/completions", json=LONG_STREAM, timeout=60) as stream:
                lines = stream.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                proc.send_signal(signal.SIGTERM)  # (the drain itself: test_drain_stops_admission_...)
                events = [first] + [line for line in lines if line.startswith("data: ")]
        out = done["out"]
        assert proc.returncode == 0, out
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] == 160
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert "tiny-0" not in _workers(cluster)
    finally:
        cluster.stop()
    assert "loading weights from" in out
    assert "ready: serving tiny" in out
    assert "drained: every request finished" in out
    assert "Traceback" not in out


@pytest.mark.slow
def test_sigterm_ends_what_cannot_finish_with_a_final_event_and_exits_0(tiny_model_dir, tmp_path):
    proc, url = _start_worker(tiny_model_dir, tmp_path, "--drain-seconds", "0")
    body = {**LONG_STREAM, "max_tokens": 480}

    async def run() -> list[list[str]]:
        async def stream(client: httpx.AsyncClient) -> list[str]:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                return [line async for line in response.aiter_lines() if line.startswith("data: ")]

        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            streams = [asyncio.ensure_future(stream(client)) for _ in range(3)]  # batch 2: one waits
            # SIGTERM once the engine holds all three (one that arrives after it is refused with a plain
            # 503, another test's subject) while a quarter of a request's tokens remain: whichever
            # reached the server last waits for a slot and then has 480 tokens to make, so that moment
            # comes, whatever order the three arrive in and however fast the first two finish.
            await asyncio.to_thread(wait_for, lambda: _all_admitted_with_work_left(url, 3, 480), "the moment")
            proc.send_signal(signal.SIGTERM)
            return list(await asyncio.gather(*streams))

    with stopping(proc) as done:
        streams = asyncio.run(run())
    out = done["out"]
    assert proc.returncode == 0, out
    cut = 0
    for events in streams:  # none is cut without a final event
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2][len("data: ") :])
        if "error" in last:
            assert last["error"]["code"] == "shutting_down"
            cut += 1
        else:
            assert last["usage"]["completion_tokens"] == 480
    assert cut >= 1
    assert f"drain time is up: {cut} request(s) ended with an error" in out


def _all_admitted_with_work_left(url: str, requests: int, tokens: int) -> bool:
    """Whether the engine has taken ``requests`` requests of ``tokens`` tokens each (running, waiting or
    finished) and more than a quarter of a request's tokens are still to come."""
    samples = scrape(url)
    gauges = ("vllm:num_requests_running", "vllm:num_requests_waiting")
    running = sum(metric(samples, name) or 0 for name in gauges)
    finished = sum(value for _, value in samples.get("kubevram_worker_sequences_finished_total", []))
    made = metric(samples, "kubevram_worker_generation_tokens_total") or 0
    return running + finished == requests and running > 0 and made < requests * tokens - tokens / 4


def test_drain_stops_admission_and_lets_the_running_request_finish(make_worker, loaded):
    from kubevram.worker.serve import drain

    worker = make_worker()
    gate, blocked = threading.Event(), threading.Event()

    def hold(module, args):
        if not gate.is_set():
            blocked.set()
            gate.wait(30)

    hook = loaded.model.model.layers[0].register_forward_pre_hook(hold)
    body = {"prompt": "hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True}

    async def run():
        async with httpx.AsyncClient(base_url=worker.url, timeout=30) as client:
            running = asyncio.ensure_future(client.post("/v1/completions", json=body))
            await asyncio.to_thread(blocked.wait, 30)  # the request is in a step
            draining = asyncio.ensure_future(drain(worker.state, 60))
            await asyncio.to_thread(wait_for, lambda: worker.state.draining, "the drain to start")
            ready = await client.get("/readyz")
            refused = await client.post("/v1/completions", json=body)
            gate.set()
            return await draining, await running, ready, refused

    try:
        ended, running, ready, refused = asyncio.run(run())
    finally:
        gate.set()
        hook.remove()
    assert (ready.status_code, ready.json()) == (503, {"status": "draining", "error": None})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "shutting_down"
    assert refused.headers["retry-after"] == "1"
    assert ended == 0
    assert running.status_code == 200
    assert running.json()["usage"]["completion_tokens"] == 5


def test_a_drain_counts_the_requests_the_engine_has_taken_but_not_yet_prefilled(make_worker):
    """A request the loop has taken from the queue and not yet prefilled (the first step of an idle
    worker, or the next one of a batch of one) is in flight: a drain of 0 s ends it with a 503. The
    drain took the worker for idle then, said every request had finished and left the request to
    uvicorn's shutdown, which cuts a stream without a final event."""
    from kubevram.worker.serve import drain

    worker = make_worker(max_batch_size=1)
    engine = worker.engine
    body = {"prompt": "hello", "max_tokens": 64, "temperature": 0, "ignore_eos": True}
    held = Pause(engine).wait()
    answers: list[httpx.Response] = []
    client = threading.Thread(
        target=lambda: answers.append(httpx.post(f"{worker.url}/v1/completions", json=body, timeout=60)),
        daemon=True,
    )
    client.start()
    ended: list[int] = []
    draining = threading.Thread(target=lambda: ended.append(asyncio.run(drain(worker.state, 0))), daemon=True)
    taking = None
    try:
        wait_for(lambda: engine.queue_depth == 1, "the request to wait")
        taking = Pause(engine)  # the next turn takes the request, then holds before prefilling it
        held.resume()
        taking.wait()
        assert engine.queue_depth == 0 and engine.requests_running == 1
        draining.start()
        # The drain either ends at once or asks the engine to end what is in flight.
        wait_for(lambda: ended or engine._callbacks, "the drain to decide")
    finally:
        held.resume()
        if taking is not None:
            taking.resume()
    draining.join(60)
    client.join(60)
    assert ended == [1]
    assert answers[0].status_code == 503, answers[0].text
    assert answers[0].json()["error"]["code"] == "shutting_down"


def test_the_rendered_pod_leaves_the_worker_time_to_drain():
    from kubevram.api.load import parse_deployment
    from kubevram.controller import render
    from kubevram.worker.serve import DEFAULT_DRAIN_SECONDS

    body = {
        "apiVersion": "llm.kubevram.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": "tiny", "namespace": "ai", "uid": "u1"},
        "spec": {"model": {"id": "tiny"}},
    }
    plan = {"name": "tiny", "replicas": [{"node": "n", "gpus": [0], "maxMemory": {"0": 1}, "deviceMap": {}}]}
    pod = render.render_workload(
        body, parse_deployment(body).spec, plan, shape="s", replica=plan["replicas"][0], count=1, image="w"
    )["spec"]["template"]["spec"]
    pause = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    margin = 5  # uvicorn's own shutdown and the status entry's removal
    assert pause + DEFAULT_DRAIN_SECONDS + margin <= pod["terminationGracePeriodSeconds"]


def _workers(cluster) -> dict:
    return ((cluster.llmd("tiny") or {}).get("status") or {}).get("workers") or {}


def test_asyncio_marker_is_active():
    # pytest-asyncio runs the async test above (asyncio_mode=auto); make sure nothing was skipped silently.
    assert asyncio.iscoroutinefunction(test_run_between_steps_runs_on_the_engine_thread)

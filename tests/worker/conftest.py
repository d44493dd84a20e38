"""A tiny random Llama with a byte-level BPE tokenizer that knows CJK, saved like a real model."""

from __future__ import annotations

import random
import threading
import time

import pytest
from http_helpers import TOKEN, free_port

CJK_TEXT = (
    "你好世界我们他们的是在有不了人这中大为上个国和地到以说时要就出会可也你对生能而子那得于着下自之年过发后作里用道"
    "行所然家种事成方多经么去法学如都同现当没动面起看定天分还进好小部其些主样理心她本前开但因只从想实日军者意无力它与"
    "长把机十民第公此已工使情明性知全三又关点正业外将两高间由问很最重并物手应战向头文体政美相见被利什二等产或新己制身"
)
ENGLISH = (
    "the quick brown fox jumps over the lazy dog and then the model says hello world to every user who "
    "asks a question about memory planning on kubernetes clusters with many gpus"
)
PUNCT = "，。？！：“”、；,.?!:;\"'()"


def build_tokenizer():
    """Byte-level BPE (like Qwen's) trained on CJK, English and punctuation: a few hundred tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    chars = list(CJK_TEXT)
    corpus = []
    for _ in range(400):
        rng.shuffle(chars)
        corpus.append("".join(chars[:30]) + rng.choice("，。？！：") + " " + ENGLISH + " " + PUNCT)
    corpus += [c * 3 for c in CJK_TEXT] + [p * 3 for p in PUNCT]
    trainer = trainers.BpeTrainer(
        vocab_size=900,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return fast


def build_model(vocab_size: int, tokenizer, seed: int = 0, hidden=64, intermediate=128, layers=2, heads=4):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Random init at std 0.02 gives near-flat logits; a larger output head gives the model opinions.
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
    return model.eval()


@pytest.fixture(scope="session")
def cjk_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A directory ``kubevram worker --model DIR`` loads: config, safetensors weights, tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama-cjk")
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def make_model_dir(tmp_path_factory, cjk_tokenizer):
    """``make_model_dir(name, hidden=64, intermediate=128, layers=2, heads=4)``: a random Llama of that
    shape with the tiny tokenizer, saved like a real model; its directory."""

    def make(name, **shape):
        path = tmp_path_factory.mktemp(name)
        build_model(len(cjk_tokenizer), cjk_tokenizer, **shape).save_pretrained(path)
        cjk_tokenizer.save_pretrained(path)
        return path

    return make


@pytest.fixture(scope="session")
def loaded(tiny_model_dir):
    """The tiny model loaded once by the worker's own loader (tokenizer, model, token sets)."""
    from kubevram.worker.loader import load

    return load(str(tiny_model_dir), None)


class Served:
    """A worker app on a real uvicorn server on 127.0.0.1, in a thread."""

    def __init__(self, state, server, thread):
        self.state = state
        self.server = server
        self.thread = thread
        self.url = f"http://127.0.0.1:{server.config.port}"

    @property
    def engine(self):
        return self.state.engine

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.state.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


@pytest.fixture(scope="session")
def serve():
    """``serve(state, token=None)`` starts a real HTTP server for ``state`` (with the admin routes when
    ``token`` is given); all are stopped at the end."""
    import threading
    import time

    import uvicorn

    from kubevram.worker.api import create_app

    started = []

    def start(state, token=None) -> Served:
        app = create_app(state)
        if token is not None:  # the admin routes on the same port, over the state's memory monitor
            from kubevram.worker.admin import install_admin

            install_admin(app, state.memory, token)
        config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        served = Served(state, server, thread)
        started.append(served)
        return served

    yield start
    for served in started:
        served.server.should_exit = True
        if served.state.engine is not None:
            served.state.engine.stop()
        served.thread.join(10)


def worker_over(
    loaded,
    serve,
    max_batch_size=4,
    max_queue=64,
    max_sequence_length=512,
    generation=None,
    kv_cache_budget_bytes=None,
):
    """A fresh engine over the shared model, its own metrics registry, served over HTTP."""
    from kubevram.api.v1alpha1 import GenerationSpec, ServingSpec
    from kubevram.worker.engine import Engine
    from kubevram.worker.metrics import WorkerMetrics
    from kubevram.worker.service import WorkerState

    metrics = WorkerMetrics()
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        max_sequence_length=max_sequence_length,
        token_classes=loaded.token_classes,
        eos_token_ids=loaded.eos_token_ids,
        hooks=metrics,
        kv_cache_budget_bytes=kv_cache_budget_bytes,
    )
    engine.start()
    metrics.bind(engine, "tiny")
    state = WorkerState(
        model_names=["tiny"],
        serving=ServingSpec(maxBatchSize=max_batch_size, maxSequenceLength=max_sequence_length),
        generation=generation or GenerationSpec(),
        metrics=metrics,
        engine=engine,
    )
    return serve(state)


@pytest.fixture
def make_worker(loaded, serve):
    """``make_worker(max_batch_size=4, max_queue=64, max_sequence_length=512, generation=None,
    kv_cache_budget_bytes=None)``: a fresh worker (:func:`worker_over`)."""

    def make(**kwargs):
        return worker_over(loaded, serve, **kwargs)

    return make


@pytest.fixture
def gate_tokenizer(loaded, monkeypatch):
    """Tokenising a text that contains ``BLOCK`` waits for ``gate``; ``blocked`` says it started."""
    gate, blocked, calls = threading.Event(), threading.Event(), []
    cls = type(loaded.tokenizer)
    original = cls.__call__

    def call(self, text, *args, **kwargs):
        calls.append(threading.current_thread().name)
        if isinstance(text, str) and "BLOCK" in text:
            blocked.set()
            assert gate.wait(60)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", call)
    yield gate, blocked, calls
    gate.set()


@pytest.fixture(scope="module")
def worker(loaded, serve):
    """One worker shared by a module's tests: max batch 4, queue 64, sequence limit 512."""
    return worker_over(loaded, serve)


class Admin:
    """A worker whose engine's hooks are a memory monitor; the admin routes on ``url`` or ``admin_url``."""

    def __init__(self, state, servers) -> None:
        self.state = state
        self.servers = servers
        self.url = f"http://127.0.0.1:{servers[0].config.port}"
        self.admin_url = f"http://127.0.0.1:{servers[-1].config.port}"

    @property
    def engine(self):
        assert self.state.engine is not None
        return self.state.engine

    @property
    def monitor(self):
        assert self.state.memory is not None
        return self.state.memory


@pytest.fixture
def make_admin(loaded):
    """``make_admin(token=TOKEN, separate=False, max_batch_size=4, policy=None, reload=None, clock=None)``:
    a served worker over the shared tiny model with the admin routes installed (``separate``: on an app
    of their own); ``policy`` is its ``memoryRelease``, ``reload`` what sleep level 2 wakes with."""
    import uvicorn

    from kubevram.api.v1alpha1 import MemoryReleaseSpec, ServingSpec
    from kubevram.worker.admin import create_admin_app, install_admin, register_metrics
    from kubevram.worker.api import create_app
    from kubevram.worker.engine import Engine
    from kubevram.worker.memory import MemoryMonitor
    from kubevram.worker.metrics import WorkerMetrics
    from kubevram.worker.service import WorkerState

    made = []

    def make(token=TOKEN, separate=False, max_batch_size=4, policy=None, reload=None, clock=None) -> Admin:
        metrics = WorkerMetrics()
        monitor = MemoryMonitor(inner=metrics, policy=policy or MemoryReleaseSpec())
        if clock is not None:
            monitor.clock = clock
        engine = Engine(
            loaded.model,
            loaded.tokenizer,
            max_batch_size=max_batch_size,
            max_queue=64,
            max_sequence_length=512,
            token_classes=loaded.token_classes,
            eos_token_ids=loaded.eos_token_ids,
            hooks=monitor,
        )
        monitor.bind(engine, reload)
        engine.start()
        metrics.bind(engine, "tiny")
        register_metrics(metrics.registry, monitor)
        state = WorkerState(
            model_names=["tiny"],
            serving=ServingSpec(maxBatchSize=max_batch_size, maxSequenceLength=512),
            metrics=metrics,
            engine=engine,
            memory=monitor,
        )
        app = create_app(state)
        apps = [app]
        if separate:
            apps.append(create_admin_app(monitor, token))
        else:
            install_admin(app, monitor, token)
        servers = [
            uvicorn.Server(uvicorn.Config(a, host="127.0.0.1", port=free_port(), log_level="warning"))
            for a in apps
        ]
        threads = [threading.Thread(target=s.run, daemon=True) for s in servers]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while not all(s.started for s in servers):
            assert time.monotonic() < deadline, "the test servers did not start"
            time.sleep(0.01)
        admin = Admin(state, servers)
        made.append((admin, threads))
        return admin

    yield make
    for admin, threads in made:
        for server in admin.servers:
            server.should_exit = True
        admin.engine.stop()
        for thread in threads:
            thread.join(10)

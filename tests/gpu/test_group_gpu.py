"""GPU tier (opt-in: KUBEVRAM_GPU_TESTS=1 on a machine with at least 2 CUDA GPUs): one replica over two
pods with NCCL, each pod given one GPU as the device plugin would (``CUDA_VISIBLE_DEVICES``), answers
through the leader what one process answers (greedy, float32), and every rank holds the weights the
planner budgeted for it."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        os.environ.get("KUBEVRAM_GPU_TESTS") != "1" or torch.cuda.device_count() < 2,
        reason="GPU tier: set KUBEVRAM_GPU_TESTS=1 on a machine with 2 or more CUDA GPUs",
    ),
]
WORKER_TESTS = Path(__file__).resolve().parents[1] / "worker"


def _bench() -> ModuleType:
    """bench/group_bench.py, whose loader this test shares (it builds nothing at import)."""
    path = Path(__file__).resolve().parents[2] / "bench" / "group_bench.py"
    spec = importlib.util.spec_from_file_location("group_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_pods_with_nccl_answer_what_one_process_answers(tmp_path: Path) -> None:
    bench = _bench()
    helpers = bench._load("group_helpers", WORKER_TESTS / "group_helpers.py")
    models = bench._load("worker_models", WORKER_TESTS / "conftest.py")
    tokenizer = models.build_tokenizer()
    model_dir = tmp_path / "model"
    models.build_model(len(tokenizer), tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    body = {"prompt": "the quick brown fox", "max_tokens": 24, "temperature": 0, "ignore_eos": True}

    def answer(url: str) -> Any:
        name = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        reply = httpx.post(f"{url}/v1/completions", json={"model": name, **body}, timeout=300)
        return reply.json()["choices"]

    (tmp_path / "single").mkdir()
    single = helpers.start_single(model_dir, tmp_path / "single")
    try:
        expected = answer(single.leader.url)
    finally:
        helpers.stop_group(single)
    (tmp_path / "group").mkdir()
    gpus = {0: {"CUDA_VISIBLE_DEVICES": "0"}, 1: {"CUDA_VISIBLE_DEVICES": "1"}}
    group = helpers.start_group(model_dir, tmp_path / "group", pods=2, gpus_per_pod=1, pod_env=gpus)
    try:
        assert answer(group.leader.url) == expected
        stats = httpx.get(f"{group.leader.admin}/v1/admin/stats",
                          headers={"Authorization": f"Bearer {helpers.TOKEN}"}, timeout=60).json()
        planned = group.replica["group"]["ranks"]
        assert [r["weightsBytes"] for r in stats["group"]["ranks"]] == [r["weights"] for r in planned]
    finally:
        helpers.stop_group(group)

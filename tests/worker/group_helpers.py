"""Starting one replica over several pods on this machine, as LeaderWorkerSet starts them: the plan the
operator renders (planned by the planner, rendered by the operator's renderer) and ``kubevram worker``
processes with only LWS_LEADER_ADDRESS, LWS_GROUP_SIZE and LWS_WORKER_INDEX set. Used by
tests/worker/test_group.py, the GPU tier (tests/gpu) and bench/group_bench.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from http_helpers import free_port, output, spawn

from kubevram.api.load import parse_deployment
from kubevram.api.workerplan import WorkerPlan
from kubevram.controller import render
from kubevram.planner.placement import plan_cluster

TOKEN = "group-token"


def _free_ports(count: int) -> list[int]:
    """``count`` consecutive free ports (the group's rendezvous port and the leader's health port)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return list(range(base, base + count))
    raise RuntimeError("no free ports")


def group_plan(
    model_dir: Path, pods: int, gpus_per_pod: int, sequence: int = 64, batch: int = 2
) -> tuple[WorkerPlan, dict[str, Any]]:
    """The plan the operator would mount: planned by the planner on ``pods`` nodes of ``gpus_per_pod``
    GPUs, rendered by the operator's renderer. Returns (worker plan, the replica's plan JSON)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    body = {"apiVersion": "llm.kubevram.io/v1alpha1", "kind": "LLMDeployment",
            "metadata": {"name": "tiny", "namespace": "ai", "uid": "u"},
            "spec": {"model": {"id": str(model_dir), "config": config}, "precision": {"weights": "float32"},
                     "serving": {"maxSequenceLength": sequence, "maxBatchSize": batch},
                     "generation": {"chinese": {"enabled": False}},
                     "placement": {"multiNode": "always", "maxGroupSize": pods,
                                   "gpusPerReplica": pods * gpus_per_pod}}}
    deployment = parse_deployment(body)
    nodes = [{"apiVersion": "v1", "kind": "Node",
              "metadata": {"name": f"n{i}", "labels": {"nvidia.com/gpu.memory": "8192",
                                                      "nvidia.com/gpu.count": str(gpus_per_pod)}},
              "status": {"allocatable": {"nvidia.com/gpu": str(gpus_per_pod)},
                         "conditions": [{"type": "Ready", "status": "True"}]}} for i in range(pods)]
    (replica,) = plan_cluster([deployment], nodes).to_json()[0]["replicas"]
    return render.worker_plan(body, deployment.spec, replica), replica


@dataclass
class Pod:
    proc: subprocess.Popen[str]
    url: str
    admin: str


@dataclass
class Group:
    pods: list[Pod]
    plan: WorkerPlan
    replica: dict[str, Any]

    @property
    def leader(self) -> Pod:
        return self.pods[0]


def start_group(
    model_dir: Path, directory: Path, pods: int, gpus_per_pod: int, *, sequence: int = 64, batch: int = 2,
    pod_env: Mapping[int, Mapping[str, str]] | None = None,
) -> Group:
    """The pods of one group as LeaderWorkerSet starts them, once every pod's /readyz answers 200.
    ``pod_env``: more variables per pod index (what a node gives its pod, e.g. its GPUs)."""
    plan, replica = group_plan(model_dir, pods, gpus_per_pod, sequence, batch)
    group_port, _health = _free_ports(2)
    assert plan.group is not None
    plan = plan.model_copy(update={"group": plan.group.model_copy(update={"port": group_port})})
    lws = [{"LWS_LEADER_ADDRESS": "127.0.0.1", "LWS_GROUP_SIZE": str(pods), "LWS_WORKER_INDEX": str(i),
            **(pod_env or {}).get(i, {})} for i in range(pods)]
    return _start(model_dir, directory, plan, replica, lws)


def start_single(model_dir: Path, directory: Path, *, sequence: int = 64, batch: int = 2) -> Group:
    """The same model as a single-pod replica (no group), for comparison."""
    plan = WorkerPlan.model_validate({
        "deployment": {"name": "tiny", "namespace": "ai"}, "model": {"id": str(model_dir)},
        "precision": {"weights": "float32"},
        "serving": {"maxSequenceLength": sequence, "maxBatchSize": batch},
    })
    return _start(model_dir, directory, plan, {}, [{}])


def _start(
    model_dir: Path, directory: Path, plan: WorkerPlan, replica: dict[str, Any], pod_env: list[dict[str, str]]
) -> Group:
    """``kubevram worker`` per pod (each its own process group, like a pod: its local ranks go with it)."""
    path = directory / "plan.json"
    path.write_text(plan.to_json(), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LWS_")}
    started = []
    for extra in pod_env:
        http, admin = free_port(), free_port()
        proc = spawn(
            [sys.executable, "-m", "kubevram.cli", "worker", "--model", str(model_dir), "--plan", str(path),
             "--host", "127.0.0.1", "--port", str(http), "--admin-port", str(admin)],
            {**env, **extra, "PYTHONUNBUFFERED": "1", "KUBEVRAM_ADMIN_TOKEN": TOKEN},
            start_new_session=True,
        )
        started.append(Pod(proc, f"http://127.0.0.1:{http}", f"http://127.0.0.1:{admin}"))
    group = Group(started, plan, replica)
    deadline = time.monotonic() + 240
    while not all(status(pod) == 200 for pod in started):
        for pod in started:
            if pod.proc.poll() is not None:
                stop_group(group)
                raise AssertionError(output(pod.proc))
        if time.monotonic() > deadline:
            stop_group(group)
            raise AssertionError("the group did not turn ready")
        time.sleep(0.1)
    return group


def status(pod: Pod) -> int | None:
    try:
        return httpx.get(f"{pod.url}/readyz", timeout=5).status_code
    except httpx.TransportError:
        return None


def stop_group(group: Group) -> None:
    for pod in group.pods:
        if pod.proc.poll() is None:
            os.killpg(pod.proc.pid, signal.SIGKILL)
        pod.proc.wait(timeout=30)

"""A worker pod asks its node for more than GPUs: ephemeral storage for the checkpoint it downloads (the
root filesystem is read-only, so the weights land in a sized emptyDir) and host memory. A node whose
allocatable ephemeral-storage or memory is below what the pod requests never runs it: kube-scheduler
leaves it Pending. The planner must not choose such a node, and must say why.

The figures come from a real EKS node list (g5.12xlarge: 4 x A10G, 95,491,944,840 B of allocatable
ephemeral storage on the default 100 GB root volume) and Llama-3-70B (70,553,706,496 parameters, a
141 GB bfloat16 checkpoint), which fits the node's 4 x 22.5 GiB of VRAM once loaded in 4-bit.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import pytest
import yaml
from gpu_nodes import A10G, GiB, MiB, deployment, gfd_node, manifest

from kubevram.api.quantity import parse_quantity
from kubevram.api.v1alpha1 import LLMDeployment
from kubevram.cli import main
from kubevram.controller import render
from kubevram.planner.catalog import CONFIGS
from kubevram.planner.placement import plan_cluster

LLAMA3_70B = "meta-llama/Meta-Llama-3-70B-Instruct"
LLAMA3_70B_PARAMETERS = 70_553_706_496  # transformers' meta model (tests/unit/test_exactness.py)
EKS_NODES = Path(__file__).resolve().parents[1] / "data" / "eks-gpu-nodes.yaml"
T4 = ("Tesla-T4", 15360)
G5_DISK = "95491944840"  # allocatable ephemeral-storage of the EKS list's g5.12xlarge nodes

QWEN2_7B = CONFIGS["qwen/qwen2-7b"]
INT4_70B: dict[str, Any] = {"seq": 4096, "batch": 2, "weights": "int4"}


def int4_70b(**spec: Any) -> LLMDeployment:
    """Llama-3-70B loaded in 4-bit from its bfloat16 checkpoint; ``spec`` keys merge into the spec."""
    raw = manifest("l70", LLAMA3_70B, **INT4_70B)
    for key, value in spec.items():
        raw["spec"][key] = {**raw["spec"].get(key, {}), **value}
    return LLMDeployment.model_validate(raw)


def worker_pod(dep: LLMDeployment, plan: dict[str, Any]) -> dict[str, Any]:
    """The rendered worker pod's spec."""
    body = {"metadata": {"name": dep.name, "namespace": dep.namespace, "uid": "u1"}, "spec": {}}
    (workload,) = [w for w in render.render_workloads(body, dep.spec, plan, image="img")
                   if w["kind"] == "Deployment"]
    pod: dict[str, Any] = workload["spec"]["template"]["spec"]
    return pod


def pod_requests(dep: LLMDeployment, plan: dict[str, Any]) -> dict[str, str]:
    """What the rendered worker pod asks the scheduler for."""
    requests: dict[str, str] = worker_pod(dep, plan)["containers"][0]["resources"]["requests"]
    return requests


def test_a_node_whose_disk_cannot_take_the_checkpoint_is_not_chosen() -> None:
    small_disk = gfd_node("g5-small-disk", A10G, 4, disk=G5_DISK)
    (plan,) = plan_cluster([int4_70b()], [small_disk]).deployments
    assert plan.replicas == [] and plan.unscheduled == 1
    assert plan.reason is not None
    assert "ephemeral-storage" in plan.reason and "g5-small-disk" in plan.reason, plan.reason
    assert "spec.model.volume" in plan.reason, plan.reason
    # The same node with a 1 TiB disk holds it: VRAM was never the problem.
    (plan,) = plan_cluster([int4_70b()], [small_disk, gfd_node("g5-big-disk", A10G, 4)]).deployments
    assert [r.node for r in plan.replicas] == ["g5-big-disk"]


def test_what_the_planner_checks_is_what_the_pod_requests() -> None:
    """The planner's figure and the rendered pod's ephemeral-storage request are one number: the pod
    placed on a node fits that node's disk, and the checkpoint part is the bfloat16 checkpoint's size."""
    dep = int4_70b()
    (plan,) = plan_cluster([dep], [gfd_node("g5-big-disk", A10G, 4)]).deployments
    as_json = plan.to_json()
    disk = parse_quantity(pod_requests(dep, as_json)["ephemeral-storage"])
    assert disk == -(-as_json["host"]["diskBytes"] // MiB) * MiB
    assert LLAMA3_70B_PARAMETERS * 2 < as_json["host"]["checkpointBytes"] < LLAMA3_70B_PARAMETERS * 2 * 1.1
    assert disk > parse_quantity(G5_DISK)  # why the g5's 100 GB root volume cannot run it


@pytest.mark.parametrize(
    ("case", "spec"),
    [
        ("weights on a volume", {"model": {"volume": {"persistentVolumeClaim": {"claimName": "llama-70b"}}}}),
        ("the spec's own request", {"worker": {"resources": {"requests": {"ephemeral-storage": "20Gi"}}}}),
        ("the spec's own limit", {"worker": {"resources": {"limits": {"ephemeral-storage": "20Gi"}}}}),
    ],
)
def test_what_the_pod_will_not_write_is_not_asked_of_the_node(case: str, spec: dict[str, Any]) -> None:
    dep = int4_70b(**spec)
    (plan,) = plan_cluster([dep], [gfd_node("g5", A10G, 4, disk=G5_DISK)]).deployments
    assert [r.node for r in plan.replicas] == ["g5"], (case, plan.reason)
    assert parse_quantity(pod_requests(dep, plan.to_json())["ephemeral-storage"]) <= parse_quantity(G5_DISK)


def test_a_node_that_does_not_say_its_disk_is_not_refused_for_it() -> None:
    (plan,) = plan_cluster([int4_70b()], [gfd_node("no-disk-figure", A10G, 4, disk=None)]).deployments
    assert [r.node for r in plan.replicas] == ["no-disk-figure"]


def test_a_node_without_the_memory_the_worker_asks_is_not_chosen() -> None:
    small = gfd_node("tiny-memory", memory="2Gi")
    (plan,) = plan_cluster([deployment("q7")], [small, gfd_node("roomy")]).deployments
    assert [r.node for r in plan.replicas] == ["roomy"]
    (plan,) = plan_cluster([deployment("q7")], [small]).deployments
    assert plan.unscheduled == 1 and plan.reason is not None
    assert "memory" in plan.reason and "tiny-memory" in plan.reason, plan.reason


def test_cpu_offload_leaves_the_worker_its_own_memory() -> None:
    """Layers offloaded to CPU memory share the pod's memory with the worker itself (4 GiB): Qwen2-7B on
    a 15 GiB T4 puts 1.9 GiB of layers on the CPU, a 5.9 GiB pod a node of 5 GiB can never run."""
    dep = deployment("q7", seq=1024, batch=1, gpusPerReplica=1, offload="cpu")
    (plan,) = plan_cluster([dep], [gfd_node("t4-5g", T4, 1, memory="5Gi")]).deployments
    assert plan.replicas == [] and plan.unscheduled == 1
    (plan,) = plan_cluster([dep], [gfd_node("t4-8g", T4, 1, memory="8Gi")]).deployments
    (replica,) = plan.replicas
    assert replica.plan.max_memory.get("cpu", 0) > 1 * GiB  # offloaded, and the pod still fits the node
    assert parse_quantity(pod_requests(dep, plan.to_json())["memory"]) <= 8 * GiB


def test_kubevram_plan_on_the_eks_node_list_says_why_the_g5s_cannot_run_it(tmp_path: Path) -> None:
    """`kubevram plan` on the EKS node list: a 4-bit 70B pinned to the A10G nodes does not fit their disk."""
    raw = manifest("l70", LLAMA3_70B, namespace="ai", **INT4_70B,
                   nodeSelector={"nvidia.com/gpu.product": "NVIDIA-A10G"})
    path = tmp_path / "l70.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["plan", "-f", str(path), "--cluster", str(EKS_NODES)])
    assert code == 0, err.getvalue()
    text = out.getvalue()
    assert "0/1 placed" in text, text
    assert "ephemeral-storage 88.9 GiB" in text, text


def test_a_pre_quantized_checkpoint_takes_its_stored_size_on_disk() -> None:
    """Qwen2.5-7B-Instruct-AWQ's safetensors files total 5.58 GB on the hub (4-bit layers, bfloat16
    embeddings and head), not the 15.2 GB of its parameters in bfloat16: the model cache's size limit,
    and what the node must have free, follow the checkpoint."""
    config = {**QWEN2_7B, "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128,
                                                  "zero_point": True, "version": "gemm"}}
    dep = LLMDeployment.model_validate(
        manifest("awq", "Qwen/Qwen2.5-7B-Instruct-AWQ", weights="float16", config=config)
    )
    (plan,) = plan_cluster([dep], [gfd_node("l4")]).deployments
    as_json = plan.to_json()
    assert 5.3e9 < as_json["host"]["checkpointBytes"] < 5.58e9 * 1.1
    (cache,) = [v for v in worker_pod(dep, as_json)["volumes"] if v["name"] == "model-cache"]
    assert parse_quantity(cache["emptyDir"]["sizeLimit"]) < 8 * GiB

"""Node lists labelled exactly as NVIDIA GPU Feature Discovery (GFD) labels them, through the inventory
and `kubevram plan --cluster`.

The label sets follow GFD's own labelers and their tests (NVIDIA/k8s-device-plugin,
``internal/lm/mig-strategy.go``, ``resource.go``, ``nvml.go``): with the device plugin's MIG strategy
``single`` every GPU node carries ``nvidia.com/mig.strategy=single``, MIG or not; MIG devices served
by ``single`` show as ``nvidia.com/gpu.product=<GPU>-MIG-<profile>`` with the MIG device's memory and
count in ``gpu.memory``/``gpu.count``; under ``mixed`` each profile has its own
``nvidia.com/mig-<profile>.*`` labels and resource, and MIG-enabled GPUs keep ``gpu.*`` labels with
``gpu.replicas=0``; sharing adds ``-SHARED`` to the product, ``gpu.replicas`` and
``gpu.sharing-strategy``. ``tests/data/eks-gpu-nodes.yaml`` is a whole EKS node list in that form.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from gpu_nodes import manifest

from kubevram.cli import main
from kubevram.planner.inventory import build_inventory

MiB = 2**20
EKS_NODES = Path(__file__).resolve().parents[1] / "data" / "eks-gpu-nodes.yaml"

# Labels GFD writes on every GPU node, whatever its GPUs (driver and CUDA versions, GPU mode, ...).
COMMON = {
    "nvidia.com/cuda.driver-version.full": "550.127.05",
    "nvidia.com/cuda.driver-version.major": "550",
    "nvidia.com/cuda.driver-version.minor": "127",
    "nvidia.com/cuda.driver-version.revision": "05",
    "nvidia.com/cuda.driver.major": "550",
    "nvidia.com/cuda.driver.minor": "127",
    "nvidia.com/cuda.driver.rev": "05",
    "nvidia.com/cuda.runtime-version.full": "12.4",
    "nvidia.com/cuda.runtime-version.major": "12",
    "nvidia.com/cuda.runtime-version.minor": "4",
    "nvidia.com/cuda.runtime.major": "12",
    "nvidia.com/cuda.runtime.minor": "4",
    "nvidia.com/gfd.timestamp": "1733412345",
    "nvidia.com/gpu.mode": "compute",
    "nvidia.com/gpu.present": "true",
    "nvidia.com/mps.capable": "false",
}

H100_SINGLE_MIG_OFF = {
    **COMMON,
    "nvidia.com/gpu.compute.major": "9",
    "nvidia.com/gpu.compute.minor": "0",
    "nvidia.com/gpu.count": "8",
    "nvidia.com/gpu.family": "hopper",
    "nvidia.com/gpu.machine": "p5.48xlarge",
    "nvidia.com/gpu.memory": "81559",
    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
    "nvidia.com/gpu.replicas": "1",
    "nvidia.com/gpu.sharing-strategy": "none",
    "nvidia.com/mig.capable": "true",
    "nvidia.com/mig.config": "all-disabled",
    "nvidia.com/mig.config.state": "success",
    "nvidia.com/mig.strategy": "single",
}

A100_SINGLE_MIG_OFF = {
    **H100_SINGLE_MIG_OFF,
    "nvidia.com/gpu.compute.major": "8",
    "nvidia.com/gpu.family": "ampere",
    "nvidia.com/gpu.machine": "p4de.24xlarge",
    "nvidia.com/gpu.memory": "81920",
    "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
}

# MIG on, all-1g.5gb, served by the single strategy: 7 MIG devices per GPU, each labelled as "the GPU".
A100_SINGLE_MIG_ON = {
    **COMMON,
    "nvidia.com/gpu.compute.major": "8",
    "nvidia.com/gpu.compute.minor": "0",
    "nvidia.com/gpu.count": "56",
    "nvidia.com/gpu.engines.copy": "1",
    "nvidia.com/gpu.engines.decoder": "0",
    "nvidia.com/gpu.engines.encoder": "0",
    "nvidia.com/gpu.engines.jpeg": "0",
    "nvidia.com/gpu.engines.ofa": "0",
    "nvidia.com/gpu.family": "ampere",
    "nvidia.com/gpu.machine": "p4d.24xlarge",
    "nvidia.com/gpu.memory": "4864",
    "nvidia.com/gpu.multiprocessors": "14",
    "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb",
    "nvidia.com/gpu.replicas": "1",
    "nvidia.com/gpu.sharing-strategy": "none",
    "nvidia.com/gpu.slices.ci": "1",
    "nvidia.com/gpu.slices.gi": "1",
    "nvidia.com/mig.capable": "true",
    "nvidia.com/mig.config": "all-1g.5gb",
    "nvidia.com/mig.config.state": "success",
    "nvidia.com/mig.strategy": "single",
}


def _mig_profile(profile: str, count: int, mib: int, product: str, sms: int, gi: int) -> dict[str, str]:
    key = f"nvidia.com/mig-{profile}"
    return {
        f"{key}.count": str(count),
        f"{key}.engines.copy": str(gi),
        f"{key}.engines.decoder": "0",
        f"{key}.engines.encoder": "0",
        f"{key}.engines.jpeg": "0",
        f"{key}.engines.ofa": "0",
        f"{key}.memory": str(mib),
        f"{key}.multiprocessors": str(sms),
        f"{key}.product": f"{product}-MIG-{profile}",
        f"{key}.replicas": "1",
        f"{key}.slices.ci": str(gi),
        f"{key}.slices.gi": str(gi),
    }


# MIG on under mixed, all-balanced on 8 x A100 80GB (2 x 1g.10gb, 1 x 2g.20gb, 1 x 3g.40gb per GPU): the
# MIG-enabled GPUs keep gpu.* labels, unshared (replicas 0), and serve no nvidia.com/gpu.
A100_MIXED_ALL_MIG = {
    **COMMON,
    "nvidia.com/gpu.compute.major": "8",
    "nvidia.com/gpu.compute.minor": "0",
    "nvidia.com/gpu.count": "8",
    "nvidia.com/gpu.family": "ampere",
    "nvidia.com/gpu.machine": "p4de.24xlarge",
    "nvidia.com/gpu.memory": "81920",
    "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
    "nvidia.com/gpu.replicas": "0",
    "nvidia.com/gpu.sharing-strategy": "none",
    "nvidia.com/mig.capable": "true",
    "nvidia.com/mig.config": "all-balanced",
    "nvidia.com/mig.config.state": "success",
    "nvidia.com/mig.strategy": "mixed",
    **_mig_profile("1g.10gb", 16, 9856, "NVIDIA-A100-SXM4-80GB", 14, 1),
    **_mig_profile("2g.20gb", 8, 19968, "NVIDIA-A100-SXM4-80GB", 28, 2),
    **_mig_profile("3g.40gb", 8, 40192, "NVIDIA-A100-SXM4-80GB", 42, 3),
}

# Mixed, and no GPU in MIG mode: plain GPUs.
H100_MIXED_MIG_OFF = {**H100_SINGLE_MIG_OFF, "nvidia.com/mig.strategy": "mixed"}

# Time-slicing, 4 replicas per L4 (GFD appends -SHARED to the product).
L4_TIME_SLICED = {
    **COMMON,
    "nvidia.com/gpu.compute.major": "8",
    "nvidia.com/gpu.compute.minor": "9",
    "nvidia.com/gpu.count": "2",
    "nvidia.com/gpu.family": "ada-lovelace",
    "nvidia.com/gpu.machine": "g6.12xlarge",
    "nvidia.com/gpu.memory": "23034",
    "nvidia.com/gpu.product": "NVIDIA-L4-SHARED",
    "nvidia.com/gpu.replicas": "4",
    "nvidia.com/gpu.sharing-strategy": "time-slicing",
    "nvidia.com/mig.capable": "false",
    "nvidia.com/mig.strategy": "single",
}

# MPS, 4 replicas per L4: the device plugin caps each client at a quarter of the GPU's memory.
L4_MPS = {**L4_TIME_SLICED, "nvidia.com/gpu.sharing-strategy": "mps", "nvidia.com/mps.capable": "true"}

# A10G not shared: replicas "1" (time-slicing configured with one replica is no sharing).
A10G_REPLICAS_ONE = {
    **COMMON,
    "nvidia.com/gpu.compute.major": "8",
    "nvidia.com/gpu.compute.minor": "6",
    "nvidia.com/gpu.count": "4",
    "nvidia.com/gpu.family": "ampere",
    "nvidia.com/gpu.machine": "g5.12xlarge",
    "nvidia.com/gpu.memory": "23028",
    "nvidia.com/gpu.product": "NVIDIA-A10G",
    "nvidia.com/gpu.replicas": "1",
    "nvidia.com/gpu.sharing-strategy": "none",
    "nvidia.com/mig.capable": "false",
    "nvidia.com/mig.strategy": "single",
}


def node(name: str, labels: dict[str, str], allocatable: dict[str, str]) -> dict[str, Any]:
    alloc = {"cpu": "96", "memory": "1000Gi", "ephemeral-storage": "1Ti", "pods": "110", **allocatable}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **labels}},
        "spec": {},
        "status": {
            "allocatable": alloc,
            "capacity": dict(alloc),
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        },
    }


def devices(
    labels: dict[str, str], allocatable: dict[str, str]
) -> tuple[str, list[tuple[str, str, int]], list[str]]:
    """(sharing, [(kind, resource, MiB)], warnings) of one node."""
    inv = build_inventory([node("n", labels, allocatable)])
    if not inv.nodes:
        return "", [], inv.warnings
    (n,) = inv.nodes
    return n.sharing, [(d.kind, d.resource, d.memory_bytes // MiB) for d in n.devices], inv.warnings


@pytest.mark.parametrize(
    ("labels", "product"),
    [(H100_SINGLE_MIG_OFF, "H100"), (A100_SINGLE_MIG_OFF, "A100"), (H100_MIXED_MIG_OFF, "H100 mixed")],
)
def test_mig_capable_gpus_with_mig_off_are_whole_gpus(labels: dict[str, str], product: str) -> None:
    sharing, found, warnings = devices(labels, {"nvidia.com/gpu": "8"})
    assert warnings == []
    assert sharing == "none", product
    assert found == [("gpu", "nvidia.com/gpu", int(labels["nvidia.com/gpu.memory"]))] * 8


def test_mig_on_under_single_is_one_device_per_mig_instance() -> None:
    sharing, found, warnings = devices(A100_SINGLE_MIG_ON, {"nvidia.com/gpu": "56"})
    assert warnings == []
    assert sharing == "mig-single"
    assert found == [("mig", "nvidia.com/gpu", 4864)] * 56


def test_mig_on_under_mixed_is_per_profile_resources() -> None:
    alloc = {
        "nvidia.com/gpu": "0",
        "nvidia.com/mig-1g.10gb": "16",
        "nvidia.com/mig-2g.20gb": "8",
        "nvidia.com/mig-3g.40gb": "8",
    }
    sharing, found, warnings = devices(A100_MIXED_ALL_MIG, alloc)
    assert warnings == []
    assert sharing == "mig-mixed"
    assert found == [
        *[("mig", "nvidia.com/mig-1g.10gb", 9856)] * 16,
        *[("mig", "nvidia.com/mig-2g.20gb", 19968)] * 8,
        *[("mig", "nvidia.com/mig-3g.40gb", 40192)] * 8,
    ]


def test_mixed_with_some_gpus_out_of_mig_keeps_them_whole() -> None:
    labels = {**A100_MIXED_ALL_MIG, **_mig_profile("3g.40gb", 2, 40192, "NVIDIA-A100-SXM4-80GB", 42, 3)}
    for profile in ("1g.10gb", "2g.20gb"):
        labels = {k: v for k, v in labels.items() if not k.startswith(f"nvidia.com/mig-{profile}.")}
    labels["nvidia.com/gpu.replicas"] = "1"  # the full GPUs' labels win over the MIG-enabled one's
    sharing, found, _ = devices(labels, {"nvidia.com/gpu": "7", "nvidia.com/mig-3g.40gb": "2"})
    assert sharing == "mig-mixed"
    assert found == [*[("mig", "nvidia.com/mig-3g.40gb", 40192)] * 2, *[("gpu", "nvidia.com/gpu", 81920)] * 7]


def test_media_extension_profiles_are_mig_devices() -> None:
    # The device plugin turns the profile's "+" into "." in resource and label names.
    labels = {**H100_MIXED_MIG_OFF, **_mig_profile("1g.10gb.me", 1, 9856, "NVIDIA-H100-80GB-HBM3", 16, 1)}
    sharing, found, _ = devices(labels, {"nvidia.com/gpu": "7", "nvidia.com/mig-1g.10gb.me": "1"})
    assert sharing == "mig-mixed"
    assert found[0] == ("mig", "nvidia.com/mig-1g.10gb.me", 9856)
    assert found[1:] == [("gpu", "nvidia.com/gpu", 81559)] * 7


def test_time_slicing_shares_and_one_replica_does_not() -> None:
    sharing, found, warnings = devices(L4_TIME_SLICED, {"nvidia.com/gpu": "8"})
    assert (sharing, warnings) == ("time-slicing", [])
    assert found == [("timeslice", "nvidia.com/gpu", 23034)] * 2
    sharing, found, warnings = devices(A10G_REPLICAS_ONE, {"nvidia.com/gpu": "4"})
    assert (sharing, warnings) == ("none", [])
    assert found == [("gpu", "nvidia.com/gpu", 23028)] * 4


def test_mps_clients_get_an_equal_share_of_the_gpu() -> None:
    sharing, found, warnings = devices(L4_MPS, {"nvidia.com/gpu": "8"})
    assert (sharing, warnings) == ("mps", [])
    assert found == [("mps", "nvidia.com/gpu", 23034 // 4)] * 8


@pytest.mark.parametrize(
    ("labels", "allocatable", "planned"),
    [
        (H100_SINGLE_MIG_OFF, {"nvidia.com/gpu": "7"}, 7),  # one GPU went unhealthy
        (L4_TIME_SLICED, {"nvidia.com/gpu": "4"}, 1),  # 4 replicas per GPU: one GPU left
    ],
)
def test_stale_count_labels_yield_to_allocatable(
    labels: dict[str, str], allocatable: dict[str, str], planned: int
) -> None:
    _, found, warnings = devices(labels, allocatable)
    assert len(found) == planned
    (warning,) = warnings
    assert f"label nvidia.com/gpu.count='{labels['nvidia.com/gpu.count']}'" in warning
    assert f"allocatable nvidia.com/gpu={allocatable['nvidia.com/gpu']}" in warning
    assert f"planning with {planned} GPU(s)" in warning


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (
            {
                **A100_SINGLE_MIG_ON,
                "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB-MIG-INVALID",
                "nvidia.com/gpu.count": "0",
                "nvidia.com/gpu.memory": "0",
                "nvidia.com/gpu.replicas": "0",
            },
            "NVIDIA-A100-SXM4-40GB-MIG-INVALID",
        ),
        (
            {
                **A100_SINGLE_MIG_OFF,
                "nvidia.com/mig.config": "all-1g.10gb",
                "nvidia.com/mig.config.state": "pending",
            },
            "nvidia.com/mig.config.state=pending",
        ),
    ],
)
def test_mig_in_flux_or_invalid_leaves_the_node_out_with_a_warning(
    labels: dict[str, str], expected: str
) -> None:
    _, found, warnings = devices(labels, {"nvidia.com/gpu": "0"})
    assert found == []
    (warning,) = warnings
    assert warning.startswith("node n: skipped") and expected in warning


# ------------------------------------------------------------------------ an EKS cluster, by the CLI

QWEN25_72B_CONFIG = {  # Qwen/Qwen2.5-72B-Instruct's published config.json (the planning facts)
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 8192,
    "intermediate_size": 29568,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

BIG = {"replicas": 2, "namespace": "ai", "seq": 8192, "batch": 4}
EKS_DEPLOYMENTS = [
    manifest("qwen25-72b", "Qwen/Qwen2.5-72B-Instruct", config=QWEN25_72B_CONFIG, **BIG),
    manifest("mixtral", "mistralai/Mixtral-8x7B-Instruct-v0.1", **BIG),
    manifest("qwen-small", "Qwen/Qwen2-7B-Instruct", namespace="ai", sharing="shared"),
]


@pytest.fixture(scope="module")
def eks_plan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`kubevram plan -f deployments.yaml --cluster eks-gpu-nodes.yaml -o json`, by the CLI."""
    path = tmp_path_factory.mktemp("eks") / "deployments.yaml"
    path.write_text(yaml.safe_dump_all(EKS_DEPLOYMENTS), encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["plan", "-f", str(path), "--cluster", str(EKS_NODES), "-o", "json"])
    assert code == 0, err.getvalue()
    return {"plans": {p["name"]: p for p in json.loads(out.getvalue())}, "stderr": err.getvalue()}


H100_NODES = {"ip-10-0-17-41.ec2.internal", "ip-10-0-18-203.ec2.internal"}
A10G_NODES = {"ip-10-0-33-12.ec2.internal", "ip-10-0-34-77.ec2.internal"}


def test_eks_node_list_is_read_without_warnings() -> None:
    docs = yaml.safe_load(EKS_NODES.read_text(encoding="utf-8"))
    inv = build_inventory(docs["items"])
    assert inv.warnings == []
    kinds = {n.name: (n.sharing, len(n.devices)) for n in inv.nodes}
    assert kinds == {
        **dict.fromkeys(H100_NODES, ("none", 8)),
        **dict.fromkeys(A10G_NODES, ("none", 4)),
        "ip-10-0-35-150.ec2.internal": ("none", 1),
        "ip-10-0-49-8.ec2.internal": ("mig-single", 56),
    }


def test_big_models_go_on_the_idle_h100s(eks_plan: dict[str, Any]) -> None:
    for name in ("qwen25-72b", "mixtral"):
        plan = eks_plan["plans"][name]
        assert plan["unscheduled"]["count"] == 0, plan["unscheduled"]
        assert len(plan["replicas"]) == 2
        for replica in plan["replicas"]:
            assert replica["node"] in H100_NODES
            assert len(replica["gpus"]) >= 2  # neither fits one 80 GB GPU
    booked = [(r["node"], g) for p in eks_plan["plans"].values() for r in p["replicas"] for g in r["gpus"]]
    assert len(booked) == len(set(booked))


def test_shared_replica_is_not_sliced_onto_unshared_a10gs(eks_plan: dict[str, Any]) -> None:
    plan = eks_plan["plans"]["qwen-small"]
    assert not any(r["node"] in A10G_NODES for r in plan["replicas"])
    # No node of this cluster shares GPUs (time-slicing, MPS); the MIG node, whose devices (4.8 GiB) could
    # not hold a 7B model anyway, has 7 GiB of ephemeral storage for a 15 GiB checkpoint.
    assert plan["unscheduled"]["count"] == 1
    reason = plan["unscheduled"]["reason"]
    assert "needs a VRAM slice" in reason
    assert "ephemeral-storage 7.0 GiB < 18.9 GiB the worker writes" in reason and "ip-10-0-49-8" in reason

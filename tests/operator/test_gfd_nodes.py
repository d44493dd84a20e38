"""The operator on nodes labelled as GPU Feature Discovery really labels them (an EKS node list, the
device plugin's MIG strategy `single` on every GPU node): big models land on idle whole GPUs, and a
`shared` replica is never sliced onto GPUs that are not shared."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from kubevram_emulator import EmulatedCluster, llm_deployment

from kubevram.controller import render

EKS_NODES = Path(__file__).resolve().parents[1] / "data" / "eks-gpu-nodes.yaml"
H100 = "ip-10-0-17-41.ec2.internal"
A10G = "ip-10-0-33-12.ec2.internal"


def eks_node(name: str) -> dict[str, Any]:
    docs = yaml.safe_load(EKS_NODES.read_text(encoding="utf-8"))
    (node,) = [n for n in docs["items"] if n["metadata"]["name"] == name]
    return {k: v for k, v in node.items() if k != "status"} | {"status": node["status"]}


def test_mig_strategy_single_nodes_take_big_models_whole_and_refuse_slices(
    cluster: EmulatedCluster, operator: Any
) -> None:
    cluster.add_node(eks_node(H100))
    cluster.add_node(eks_node(A10G))
    cluster.create_llmd(llm_deployment("mixtral", "mistralai/Mixtral-8x7B-Instruct-v0.1"))
    cluster.create_llmd(llm_deployment("small", placement={"sharing": "shared"}))

    def status(name: str, phase: str) -> dict[str, Any] | None:
        obj = cluster.llmd(name)
        return obj if ((obj or {}).get("status") or {}).get("phase") == phase else None

    mixtral = cluster.wait_for("mixtral Planned", lambda: status("mixtral", "Planned"))
    (placement,) = mixtral["status"]["placements"]
    assert placement["node"] == H100 and len(placement["gpus"]) >= 2  # 94 GB of weights: two H100s or more
    (workload,) = [
        d for d in cluster.deployments() if d["metadata"]["labels"].get(render.LABEL_DEPLOYMENT) == "mixtral"
    ]
    container = workload["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(len(placement["gpus"]))

    def observed(name: str) -> dict[str, Any] | None:
        obj = cluster.llmd(name)
        return obj if ((obj or {}).get("status") or {}).get("observedGeneration") == 1 else None

    # Whatever the status says about a replica no node can take (the A10Gs advertise gpu.replicas "1":
    # not shared), nothing of it is put on them.
    small = cluster.wait_for("small observed", lambda: observed("small"))
    assert small["status"].get("placements") == []
    for d in cluster.deployments():
        annotations = d["spec"]["template"]["metadata"].get("annotations") or {}
        mine = d["metadata"]["labels"].get(render.LABEL_DEPLOYMENT) == "small"
        if mine and render.RESERVATION in annotations:
            reservation = json.loads(annotations[render.RESERVATION])  # placeholders reserve nothing
            assert reservation["node"] != A10G, reservation


def test_a_node_whose_disk_cannot_take_the_checkpoint_gets_no_replica(
    cluster: EmulatedCluster, operator: Any
) -> None:
    """Llama-3-70B in 4-bit fits a g5.12xlarge's 4 x A10G, but its worker downloads the 141 GB bfloat16
    checkpoint into an emptyDir the node's 89 GiB of allocatable ephemeral storage cannot hold:
    kube-scheduler would leave the pod Pending forever. The replica waits, and the status says why."""
    cluster.add_node(eks_node(A10G))
    cluster.create_llmd(llm_deployment(
        "llama70", "meta-llama/Meta-Llama-3-70B-Instruct",
        precision={"weights": "int4"}, serving={"maxSequenceLength": 4096, "maxBatchSize": 2},
    ))

    def scheduled() -> dict[str, Any] | None:
        obj = cluster.llmd("llama70")
        conditions = ((obj or {}).get("status") or {}).get("conditions") or []
        found = [c for c in conditions if c["type"] == "Scheduled"]
        return found[0] if found and found[0]["status"] == "False" else None

    condition = cluster.wait_for("Scheduled=False", scheduled)
    assert "ephemeral-storage" in condition["message"] and A10G in condition["message"], condition
    assert "spec.model.volume" in condition["message"], condition
    pinned = [d for d in cluster.deployments()
              if A10G in json.dumps(d["spec"]["template"]["spec"].get("affinity") or {})]
    assert pinned == []

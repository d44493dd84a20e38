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

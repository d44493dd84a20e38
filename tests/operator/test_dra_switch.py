"""A deployment that moves between DRA and the device plugin keeps no trace of the other mode.

With ``resourceAPI: auto`` the mode follows the cluster: installing or removing NVIDIA's DRA driver (or
an edit of ``spec.placement.resourceAPI``) re-plans the same replica on the same GPUs, so its worker
Deployment keeps its name and is patched in place. A JSON merge patch only removes what it sets to null:
a pod template that kept ``resourceClaims`` naming a claim template the operator deleted could never
create its pods.
"""

from __future__ import annotations

from typing import Any

from dra_cluster import A100_80, gpu_device, resource_slice, serve
from kubevram_emulator import EmulatedCluster, gpu_node, llm_deployment

from kubevram.controller import render


def worker_templates(cluster: EmulatedCluster) -> list[dict[str, Any]]:
    return [
        d["spec"]["template"]["spec"]
        for d in cluster.deployments()
        if d["metadata"]["labels"].get(render.LABEL_DEPLOYMENT) == "qwen"
        and d["metadata"]["labels"].get(render.LABEL_SHAPE) != render.PLACEHOLDER
    ]


def test_a_switch_from_dra_to_the_device_plugin_drops_the_pod_claims(
    cluster: EmulatedCluster, operator: Any
) -> None:
    # A node both ways: GFD labels and nvidia.com/gpu (the device plugin), and the DRA driver's slice.
    cluster.add_node(gpu_node("a100-0", gpus=4))
    serve(cluster, [resource_slice("a100-0", [gpu_device(i, A100_80) for i in range(4)])], [])
    cluster.create_llmd(llm_deployment("qwen", placement={"resourceAPI": "dra"}))

    def claiming() -> list[dict[str, Any]]:
        return [t for t in worker_templates(cluster) if t.get("resourceClaims")]

    (dra,) = cluster.wait_for("a worker claiming its GPU", claiming)
    assert "nvidia.com/gpu" not in dra["containers"][0]["resources"].get("limits", {})
    cluster.patch(cluster.llmd_path("qwen"), {"spec": {"placement": {"resourceAPI": "devicePlugin"}}})

    def counting() -> list[dict[str, Any]]:
        return [t for t in worker_templates(cluster)
                if "nvidia.com/gpu" in t["containers"][0]["resources"].get("limits", {})]

    (plugin,) = cluster.wait_for("a worker asking for nvidia.com/gpu", counting)
    assert "resourceClaims" not in plugin, plugin["resourceClaims"]
    assert "claims" not in plugin["containers"][0]["resources"]

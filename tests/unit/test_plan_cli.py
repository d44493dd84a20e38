"""`kubevram plan`: the table with per-GPU bars, JSON, the built-in sample cluster and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from gpu_nodes import L4, gfd_node, kubevram_pod, other_pod

from kubevram.api.errors import SpecError
from kubevram.cli import main
from kubevram.planner.plan_cli import BAR_WIDTH, bar, load_nodes, plan_command

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

QWEN = """
apiVersion: llm.kubevram.io/v1alpha1
kind: LLMDeployment
metadata: {name: qwen, namespace: ai}
spec:
  replicas: 2
  model: {id: Qwen/Qwen2-7B-Instruct}
  serving: {maxSequenceLength: 4096, maxBatchSize: 2}
---
apiVersion: llm.kubevram.io/v1alpha1
kind: LLMDeployment
metadata: {name: llama-70b, namespace: ai}
spec:
  replicas: 3
  model: {id: meta-llama/Meta-Llama-3-70B-Instruct}
  serving: {maxSequenceLength: 8192, maxBatchSize: 8}
"""


def _plan(text: str = QWEN, cluster: str | None = None, output: str = "table") -> tuple[str, list[str]]:
    warnings: list[str] = []
    out = plan_command(text, "test.yaml", None, cluster, "nodes.yaml", output, warn=warnings.append)
    return out, warnings


def test_table_on_the_sample_cluster() -> None:
    out, warnings = _plan()
    assert warnings == []
    assert out.startswith("Plan on sample cluster")
    assert re.search(r"ai/qwen +\d+\.\d GiB +2/2 placed", out)
    assert re.search(r"ai/llama-70b +\d+\.\d GiB +\d/3 placed", out)
    assert "legend: █ weights  ▓ KV cache  ▒ activations" in out
    bars = re.findall(r"GPU \d+ +\[(.*?)\]", out)
    assert bars and all(len(b) == BAR_WIDTH for b in bars)
    assert any("█" in b and "▓" in b for b in bars)
    assert re.search(r"gpu-l4-0 +NVIDIA-L4 +4 x 22\.5 GiB", out)


def test_pending_replicas_show_the_reason_and_the_autoscaler_hint() -> None:
    cluster = yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [gfd_node("gpu-l4-0", L4, 2)]})
    out, _ = _plan(cluster=cluster)
    assert "3 pending: needs " in out
    assert "largest free: " in out
    assert re.search(r"autoscaler: grow node class \S+ \(\S+\), \d GPU\(s\) with >= \d+ MiB; "
                     r"pending pods carry \[nvidia\.com/gpu\.memory Gt \d+", out)


def test_json_output_is_the_plan() -> None:
    out, _ = _plan(output="json")
    data = json.loads(out)
    assert [d["name"] for d in data] == ["qwen", "llama-70b"]
    qwen = data[0]
    assert qwen["namespace"] == "ai" and qwen["estimate"]["totalBytes"] > 0
    assert len(qwen["replicas"]) == 2 and qwen["unscheduled"]["count"] == 0
    replica = qwen["replicas"][0]
    assert replica["node"].startswith("gpu-") and replica["gpus"] and replica["deviceMap"]
    assert set(replica["maxMemory"]) == {str(i) for i in range(len(replica["gpus"]))}


def test_malformed_nodes_warn_with_node_and_label() -> None:
    bad = gfd_node("gpu-broken", L4, 4)
    bad["metadata"]["labels"]["nvidia.com/gpu.memory"] = "twenty-four gigs"
    service = {"kind": "Service", "metadata": {"name": "s"}}
    cluster = yaml.safe_dump_all([bad, gfd_node("gpu-ok", L4, 4), service])
    out, warnings = _plan(cluster=cluster, output="json")
    assert json.loads(out)
    assert any("gpu-broken" in w and "nvidia.com/gpu.memory" in w for w in warnings)
    assert any("skipped a Service, not a Node or Pod" in w for w in warnings)


@pytest.mark.parametrize(
    ("cluster", "message"),
    [
        ("items: [", "malformed YAML at line"),
        ("kind: ConfigMap\nmetadata: {name: x}\n", "no Node objects found"),
    ],
)
def test_unusable_cluster_files_are_spec_errors(cluster: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        _plan(cluster=cluster)


def test_a_deployment_without_config_names_the_field() -> None:
    text = QWEN.replace("Qwen/Qwen2-7B-Instruct", "acme/secret-model")
    with pytest.raises(SpecError) as info:
        _plan(text)
    assert info.value.field == "spec.model.config" and "test.yaml: qwen" in str(info.value)


def test_pods_in_the_cluster_file_hold_their_gpus() -> None:
    running = kubevram_pod("chat-0", "chat", "gpu-l4-0", {0: 23034 * 2**20}, namespace="prod")
    cluster = yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [
        gfd_node("gpu-l4-0", L4, 3), running, other_pod("train-0", "gpu-l4-0", 1)]})
    out, warnings = _plan(QWEN.split("---")[0], cluster=cluster)
    assert warnings == []
    assert "1/2 placed" in out  # of 3 GPUs, one is reserved by a kubevram pod, one requested by another pod
    assert re.search(r"GPU 0 +\[▪{40}\] +22\.5/22\.5 GiB  running pods", out)
    assert "gpu-l4-0  NVIDIA-L4  3 x 22.5 GiB; 1 requested by other pods" in out


def test_bar_is_fixed_width_and_proportional() -> None:
    assert bar(100, [("█", 50), ("▓", 25)], width=8) == "████▓▓··"
    assert bar(100, [("█", 1)], width=8) == "█·······"  # a small part stays visible
    assert bar(100, [("█", 100), ("▓", 10)], width=8) == "████████"  # never wider
    assert len(bar(0, [], width=8)) == 8


def test_list_nodelist_documents_and_json_load() -> None:
    nodes = [gfd_node("a"), gfd_node("b")]
    node_list = {"apiVersion": "v1", "kind": "List", "items": nodes}
    texts = (yaml.safe_dump({"kind": "NodeList", "items": nodes}), yaml.safe_dump_all(nodes),
             json.dumps(node_list))
    for text in texts:
        loaded, warnings = load_nodes(text, "x")
        assert [n["metadata"]["name"] for n in loaded] == ["a", "b"] and warnings == []


def test_cli_plan_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "d.yaml"
    manifest.write_text(QWEN, encoding="utf-8")
    assert main(["plan", "-f", str(manifest), "-o", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {d["name"] for d in data} == {"qwen", "llama-70b"}
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text("items: [", encoding="utf-8")
    assert main(["plan", "-f", str(manifest), "--cluster", str(nodes)]) == 2
    assert "malformed YAML" in capsys.readouterr().err


def test_every_example_plans_on_the_sample_cluster() -> None:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        out, warnings = _plan(path.read_text(encoding="utf-8"), output="json")
        for d in json.loads(out):
            assert d["replicas"], f"{path.name}: {d['unscheduled']}"
        assert warnings == []


def test_one_per_replica_figure_in_the_table_the_json_and_the_status(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A Llama-3-70B replica over 4 GPUs: the table's PER REPLICA, the GPUs' totals in the JSON and the
    operator's status (VRAM column, Planned message) say the same."""
    from kubevram.controller.status import gib, planned_status

    example = str(EXAMPLES / "llama-3-70b-multi-gpu.yaml")
    assert main(["plan", "-f", example, "-o", "json"]) == 0
    (plan,) = json.loads(capsys.readouterr().out)
    (replica,) = plan["replicas"]
    assert len(replica["gpus"]) > 1
    gpu_total = sum(g["total"] for g in replica["perGpu"])
    assert gpu_total > plan["estimate"]["totalBytes"]  # every GPU has its own CUDA context and headroom
    assert main(["plan", "-f", example]) == 0
    table = capsys.readouterr().out
    shown = re.search(r"default/llama-3-70b +(\d+\.\d) GiB", table)
    assert shown is not None and shown.group(1) == f"{gpu_total / 2**30:.1f}"
    status = planned_status(
        "llama-3-70b", plan, desired=1, ready=0, generation=1, old_conditions=None, now="T"
    )
    assert status["vramPerReplica"] == gib(gpu_total) == f"{shown.group(1)}Gi"
    assert status["conditions"][0]["message"].startswith(f"1 replica(s) of {gib(gpu_total)} GPU memory each")


def test_cpu_offload_shows_in_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    example = str(EXAMPLES / "chatglm-6b-cpu-offload.yaml")
    assert main(["plan", "-f", example, "-o", "json"]) == 0
    (plan,) = json.loads(capsys.readouterr().out)
    cpu = plan["replicas"][0]["maxMemory"]["cpu"]
    assert main(["plan", "-f", example]) == 0
    table = capsys.readouterr().out
    assert re.search(rf"GPU 0 \(exclusive\) \+ offload to cpu: {cpu / 2**30:.1f} GiB", table), table

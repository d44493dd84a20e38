"""``kubevram top`` through the command, against the emulated cluster the operator planned on: the table,
``-o json``, ``--watch`` (a process, stopped with Ctrl-C) and no cluster (one line, exit 2)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from kubevram_emulator import EmulatedCluster
from test_metrics import MiB, populate, reserved_by_annotations

from kubevram.cli import main
from kubevram.controller import render

NAMES = ("extra", "llama", "qwen")
CAPACITY = 23034 * MiB  # an L4, as GFD labels it


def run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["top", *args])
    return code, out.getvalue(), err.getvalue()


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def test_top_shows_the_cluster_the_operator_planned(cluster: EmulatedCluster, operator: Any) -> None:
    reports = populate(cluster)
    objs = {n: cluster.llmd(n) or {} for n in NAMES}
    reserved, by_deployment = reserved_by_annotations(cluster, NAMES)
    pods = {p["metadata"]["name"]: p for p in cluster.items("/api/v1/namespaces/default/pods")}
    used: dict[tuple[str, int], int] = {}  # what each report says, on its pod's GPU
    for entries in reports.values():
        for pod, entry in entries.items():
            held = json.loads(pods[pod]["metadata"]["annotations"][render.RESERVATION])
            (index,) = held["gpus"]
            used[(held["node"], int(index))] = entry["devices"][0]["reservedBytes"]

    code, out, err = run("-o", "json")
    assert (code, err) == (0, "")
    shown = json.loads(out)
    assert [n["name"] for n in shown["nodes"]] == ["gpu-l4-0", "gpu-l4-1"]
    for node in shown["nodes"]:
        assert node["otherPodsBytes"] == (CAPACITY if node["name"] == "gpu-l4-1" else 0)
        assert node["freeBytes"] == 0  # three GPUs reserved, the fourth the notebook's
        for gpu in node["gpus"]:
            key = (node["name"], gpu["index"])
            assert gpu["capacityBytes"] == CAPACITY
            assert gpu["reservedBytes"] == min(reserved.get(key, 0), CAPACITY)
            assert gpu["usedBytes"] == used.get(key)
            assert gpu["freeBytes"] == (0 if key in reserved else CAPACITY)
    deployments = {d["name"]: d for d in shown["deployments"]}
    assert sorted(deployments) == sorted(NAMES)
    for name, d in deployments.items():
        st = objs[name]["status"]
        assert d["estimateBytes"]["total"] == st["estimate"]["totalBytes"]
        assert d["replicas"] == {
            "desired": objs[name]["spec"]["replicas"],
            "placed": len(st["placements"]),
            "ready": 0,
            "pending": st["autoscaling"]["pendingReplicas"],
        }
        assert d["reservedBytes"] == by_deployment.get(name, 0)
    assert deployments["extra"]["pendingReason"] == "InsufficientGPUMemory"
    assert deployments["extra"]["gpuClass"] == objs["extra"]["status"]["autoscaling"]["gpuClass"]
    (row,) = objs["llama"]["status"]["calibration"]["perGpu"]
    assert deployments["llama"]["estimateErrorRatio"] == row["errorPct"] / 100
    assert deployments["qwen"]["measuredPeakBytes"] == max(
        e["devices"][0]["peakReservedBytes"] for e in reports["qwen"].values()
    )

    code, out, err = run()
    assert (code, err) == (0, "")
    lines = out.splitlines()
    total_used = sum(used.values())
    assert (
        f"{'NVIDIA-L4':<34} {4:>4} {gib(4 * CAPACITY):>11} {gib(3 * CAPACITY):>11} {gib(total_used):>11} "
        f"{gib(0):>11}" in lines
    )
    extra = objs["extra"]["status"]["autoscaling"]
    assert (
        f"    1 pending (InsufficientGPUMemory): {extra['reason']}; autoscaler: grow node class "
        f"{extra['gpuClass']}"
    ) in lines
    llama = next(line for line in lines if line.startswith("default/llama "))
    assert f"{row['errorPct']:+.1f}%" in llama and "0/1/1" in llama
    assert (
        "gpu-l4-1  NVIDIA-L4  2 x 22.5 GiB; 1 requested by other pods (which, the device plugin knows)"
        in lines
    )
    for (node, index), nbytes in used.items():
        # Drawn as `kubevram plan` draws: 40 cells, used then reserved-but-unused, by cumulative rounding.
        cells = round(nbytes * 40 / CAPACITY)
        owner = next(n for n in NAMES if (node, index) in reserved_by_annotations(cluster, [n])[0])
        assert (
            f"  GPU {index:<2} [{'█' * cells}{'░' * (40 - cells)}] used {gib(nbytes)}, reserved "
            f"{gib(CAPACITY)}, free {gib(0)} of {gib(CAPACITY)}  default/{owner}"
        ) in lines
    (idle,) = [line for line in lines if line.startswith("  GPU ") and "default/" not in line]
    assert idle.startswith(
        f"  GPU 1  [{'·' * 40}] used -, reserved {gib(0)}, free {gib(CAPACITY)}"
    ) or idle.startswith(f"  GPU 0  [{'·' * 40}] used -, reserved {gib(0)}, free {gib(CAPACITY)}")


def test_top_watches_until_interrupted(cluster: EmulatedCluster) -> None:
    from kubevram_emulator import gpu_node

    cluster.add_node(gpu_node("gpu-a100-0", gpus=1))
    process = subprocess.Popen(
        [sys.executable, "-m", "kubevram.cli", "top", "--watch", "--interval", "0.2", "-o", "json"],
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        frames = [json.loads(process.stdout.readline()) for _ in range(2)]
        cluster.add_node(gpu_node("gpu-a100-1", gpus=1))  # the next frames show it

        def both() -> bool:
            assert process.stdout is not None
            return len(json.loads(process.stdout.readline())["nodes"]) == 2

        cluster.wait_for("a frame with the new node", both)
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert [len(f["nodes"]) for f in frames] == [1, 1]
    assert frames[0]["nodes"][0]["gpus"][0]["freeBytes"] == 81920 * MiB
    assert process.returncode == 130 and stderr == ""


def test_no_cluster_is_one_line_and_exit_2(tmp_path: Path, monkeypatch: Any) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: x\n"
        "clusters: [{name: x, cluster: {server: 'https://127.0.0.1:9'}}]\n"
        "users: [{name: x, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: x, user: x}}]\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("KUBECONFIG", str(config))
    code, out, err = run()
    assert (code, out) == (2, "")
    assert err.startswith("kubevram top: cannot reach the cluster at https://127.0.0.1:9 (from ")
    assert len(err.splitlines()) == 1

"""Operator benchmark: time from creating LLMDeployments to their children, against kmock's emulator.

Creates N LLMDeployments (default 100) as fast as the API takes them, with the operator (kopf, in
KopfRunner's thread, the real planner) watching, and records per resource the time from its create
call returning to (a) its plan ConfigMap and every workload existing and (b) its status reaching
``observedGeneration: 1`` with a phase. The cluster is 16 nodes of 8 x 80 GiB GPUs, every replica
fits (Qwen2-0.5B, one GPU each), so what is measured is the reconcile path: inventory reads,
planning, rendering, ~8 API writes and the status patch per resource.

    python bench/operator_bench.py [--count 100] [--replicas 1]

Prints a table, the API requests served, how many exclusive GPUs the workloads' reservations book
more than once, and (code with the placement ledger) how long the ledger's one-writer lock was held
and waited for. The recorded results are in bench/README.md ("## Operator").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "operator"))

os.environ.setdefault("KUBEVRAM_READY_INTERVAL", "30")


def snapshot(cluster: Any) -> tuple[set[str], dict[str, int], dict[str, Any], dict[tuple[str, str], int]]:
    """ConfigMap names, workload replicas per owner, LLMDeployment statuses and, per (node, GPU), how many
    exclusive replicas the workloads' reservations put there, from memory."""
    cms: set[str] = set()
    owners: dict[str, int] = {}
    statuses: dict[str, Any] = {}
    booked: dict[tuple[str, str], int] = {}
    for (resource, _, name), obj in list(cluster.emulator.objects.items()):
        if obj.deleted:
            continue
        plural = resource.plural
        if plural == "configmaps":
            cms.add(name)
        elif plural == "deployments":
            owner = (obj.get("metadata", {}).get("labels") or {}).get("llm.kubevram.io/deployment", "")
            replicas = int(obj.get("spec", {}).get("replicas") or 0)
            owners[owner] = owners.get(owner, 0) + replicas
            template = (obj.get("spec", {}).get("template") or {}).get("metadata") or {}
            raw = (template.get("annotations") or {}).get("llm.kubevram.io/reservation")
            reservation = json.loads(raw) if raw else {}
            if reservation.get("sharing") == "exclusive" and reservation.get("node"):
                for gpu in reservation.get("gpus") or {}:
                    key = (reservation["node"], gpu)
                    booked[key] = booked.get(key, 0) + replicas
        elif plural == "llmdeployments":
            statuses[name] = obj.get("status")
    return cms, owners, statuses, booked


def time_the_ledger() -> dict[str, list[float]]:
    """Wrap the placement ledger's one-writer lock (when this code has one) to record, per decision, the
    seconds spent waiting for it and holding it."""
    times: dict[str, list[float]] = {"wait": [], "hold": []}
    try:
        from kubevram.controller.ledger import LEDGER
    except ImportError:  # code from before the ledger
        return times
    deciding = LEDGER.deciding

    @contextlib.contextmanager
    def timed() -> Iterator[Any]:
        asked = time.perf_counter()
        with deciding() as ledger:
            got = time.perf_counter()
            try:
                yield ledger
            finally:
                times["wait"].append(got - asked)
                times["hold"].append(time.perf_counter() - got)

    LEDGER.deciding = timed  # type: ignore[method-assign]
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="LLMDeployments to create")
    parser.add_argument("--replicas", type=int, default=1, help="replicas per LLMDeployment")
    parser.add_argument("--nodes", type=int, default=16, help="GPU nodes (8 x 80 GiB each)")
    args = parser.parse_args(argv)

    import kopf
    import kubernetes.config.kube_config
    from kopf.testing import KopfRunner
    from kubevram_emulator import EmulatedCluster, gpu_node

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    # keep_requests=False: kmock would match each request against every earlier one (quadratic).
    cluster = EmulatedCluster(Path(tempfile.mkdtemp(prefix="kubevram-bench-")), keep_requests=False).start()
    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
    kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(cluster.kubeconfig)
    for i in range(args.nodes):
        cluster.add_node(
            gpu_node(f"gpu-h100-{i:02d}", gpus=8, memory_mib=81559, product="NVIDIA-H100-80GB-HBM3")
        )

    lock_times = time_the_ledger()
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True
    created: dict[str, float] = {}
    children_at: dict[str, float] = {}
    status_at: dict[str, float] = {}
    run_args = ["run", "--all-namespaces", "--standalone", "-m", "kubevram.controller.handlers"]
    with KopfRunner(run_args, settings=settings, timeout=60) as runner:
        time.sleep(1.0)  # let the watch streams open
        start = time.monotonic()
        for i in range(args.count):
            name = f"llm-{i:03d}"
            cluster.create_llmd(
                {
                    "apiVersion": "llm.kubevram.io/v1alpha1",
                    "kind": "LLMDeployment",
                    "metadata": {"name": name, "namespace": "default"},
                    "spec": {"replicas": args.replicas, "model": {"id": "Qwen/Qwen2-0.5B-Instruct"}},
                }
            )
            created[name] = time.monotonic()
        deadline = time.monotonic() + 600
        while (len(children_at) < args.count or len(status_at) < args.count) and time.monotonic() < deadline:
            now = time.monotonic()
            # Read the emulator's memory in its own loop (no HTTP, no JSON): the probe must not be
            # what slows the API server down.
            cms, owners, statuses, booked = cluster.call(lambda: snapshot(cluster))
            for name in created:
                if name not in children_at and f"{name}-plan" in cms and owners.get(name, 0) >= args.replicas:
                    children_at[name] = now
                st: dict[str, Any] = statuses.get(name) or {}
                if name not in status_at and st.get("observedGeneration") == 1 and st.get("phase"):
                    status_at[name] = now
            time.sleep(0.02)
        total = time.monotonic() - start
        _, _, _, booked = cluster.call(lambda: snapshot(cluster))
    served = len(cluster.requests())
    cluster.stop()
    twice = {gpu: n for gpu, n in booked.items() if n > 1}

    if len(children_at) < args.count or len(status_at) < args.count:
        print(f"incomplete: children for {len(children_at)}, status for {len(status_at)} of {args.count}")
        return 1
    child_lat = sorted(children_at[n] - created[n] for n in created)
    status_lat = sorted(status_at[n] - created[n] for n in created)

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]

    print(
        f"operator bench: {args.count} LLMDeployments x {args.replicas} replica(s), "
        f"{args.nodes} nodes x 8 GPUs"
    )
    print(f"{'':28} {'p50':>8} {'p95':>8} {'max':>8} {'mean':>8}")
    for label, values in (("create -> children (s)", child_lat), ("create -> status (s)", status_lat)):
        print(
            f"{label:28} {pct(values, 0.5):8.3f} {pct(values, 0.95):8.3f} {values[-1]:8.3f} "
            f"{statistics.fmean(values):8.3f}"
        )
    print(
        f"all {args.count} reconciled (children and status) in {total:.2f} s "
        f"({args.count / total:.1f} resources/s); operator exit code {runner.exit_code}"
    )
    print(f"API requests served: {served} ({served / args.count:.1f} per LLMDeployment, creates included)")
    print(
        f"exclusive GPUs booked: {len(booked)} for {sum(booked.values())} replica-GPUs; "
        f"booked more than once: {len(twice)} GPU(s), {sum(twice.values()) - len(twice)} extra booking(s)"
    )
    if lock_times["hold"]:
        hold, wait = sorted(lock_times["hold"]), sorted(lock_times["wait"])
        p50, top = pct(hold, 0.5) * 1e3, hold[-1] * 1e3
        held = f"held {sum(hold):.2f} s in all (p50 {p50:.1f} ms, max {top:.1f} ms)"
        waited = f"waited for {sum(wait):.2f} s in all (max {wait[-1] * 1e3:.1f} ms)"
        print(f"ledger lock: {len(hold)} decisions, {held}; {waited}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``kubevram`` command: estimate, plan, top, crd, dashboard, operator and worker.

Each sub-command imports what it needs only when it runs, so ``kubevram estimate`` never loads kopf
or torch. Bad input ends with one line on stderr naming the field and the value, and exit status 2;
a reader that stops early (``kubevram plan | head``) ends it quietly with status 141, as SIGPIPE would.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_BAD_INPUT = 2
# What a shell reports for a command that SIGPIPE ended (128 + 13): the reader of stdout went away.
EXIT_BROKEN_PIPE = 141


class CliError(Exception):
    """Bad input found by the CLI: printed as one line, exit status 2."""


def _read(path: str, what: str) -> str:
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"{what}: cannot read {path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CliError(f"{what}: {path!r} is not UTF-8 text") from None


def _cmd_estimate(args: argparse.Namespace) -> int:
    from kubevram.introspect import meta_facts
    from kubevram.planner.report import estimate_command

    text = _read(args.file, "-f")
    print(estimate_command(text, args.file, _model_config(args), args.output, fallback=meta_facts))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from kubevram.introspect import meta_facts
    from kubevram.planner.plan_cli import plan_command

    cluster = _read(args.cluster, "--cluster") if args.cluster else None
    print(
        plan_command(
            _read(args.file, "-f"), args.file, _model_config(args), cluster, args.cluster or "", args.output,
            fallback=meta_facts,
        )
    )
    return 0


def _cmd_top(args: argparse.Namespace) -> int:
    from kubernetes.client.exceptions import ApiException

    from kubevram.controller.adapter import Cluster
    from kubevram.controller.run import NoCluster, check_cluster
    from kubevram.controller.top import top

    if args.interval <= 0:
        raise CliError(f"--interval: {args.interval} must be more than 0 seconds")
    try:
        check_cluster()
        return top(Cluster(), args.output, watch=args.watch, interval=args.interval)
    except NoCluster as exc:
        raise CliError(str(exc)) from None
    except ApiException as exc:
        raise CliError(f"the cluster answered HTTP {exc.status} {exc.reason} while reading it") from None


def _cmd_crd(args: argparse.Namespace) -> int:
    from kubevram.api.crd import render_crd_yaml
    from kubevram.api.reference import render_reference

    text = render_reference() if args.reference else render_crd_yaml()
    if args.write:
        for target in args.write:
            Path(target).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from kubevram.controller.dashboard import dashboard_json

    text = dashboard_json()
    for target in args.write or []:
        Path(target).write_text(text, encoding="utf-8")
    if not args.write:
        sys.stdout.write(text)
    return 0


def _cmd_operator(args: argparse.Namespace) -> int:
    from kubevram.controller.run import NoCluster, run_operator

    try:
        return run_operator(
            namespaces=args.namespace or [],
            all_namespaces=args.all_namespaces,
            liveness=args.liveness,
            verbose=args.verbose,
            leader_election=args.leader_elect,
            lease_name=args.lease_name,
            lease_namespace=args.lease_namespace,
            metrics_port=args.metrics_port,
        )
    except NoCluster as exc:
        raise CliError(str(exc)) from None


def _cmd_worker(args: argparse.Namespace) -> int:
    from kubevram.worker.serve import run_worker

    return run_worker(args)


def _model_config(args: argparse.Namespace) -> dict | None:
    if not getattr(args, "model_config", None):
        return None
    from kubevram.api.load import parse_config_json

    text = _read(args.model_config, "--model-config")
    try:
        return parse_config_json(text, f"--model-config: {args.model_config!r}")
    except ValueError as exc:
        raise CliError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubevram", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    est = sub.add_parser("estimate", help="GPU memory one replica of each LLMDeployment needs")
    est.add_argument(
        "-f", "--file", required=True, help="YAML with one or more LLMDeployment documents ('-' reads stdin)"
    )
    est.add_argument("--model-config", help="the model's Hugging Face config.json")
    est.add_argument("-o", "--output", choices=["table", "json"], default="table")
    est.set_defaults(func=_cmd_estimate)

    plan = sub.add_parser("plan", help="place every replica on nodes and GPUs, with device maps")
    plan.add_argument("-f", "--file", required=True, help="YAML with one or more LLMDeployment documents")
    plan.add_argument(
        "--cluster",
        help="Node objects as `kubectl get nodes -o yaml` prints them, optionally with the Pods holding GPUs "
        "(`kubectl get nodes,pods -A -o yaml`); default: a built-in sample cluster",
    )
    plan.add_argument("--model-config", help="the model's Hugging Face config.json")
    plan.add_argument("-o", "--output", choices=["table", "json"], default="table")
    plan.set_defaults(func=_cmd_plan)

    top = sub.add_parser(
        "top", help="GPU memory per node and GPU and per LLMDeployment, from the cluster in KUBECONFIG"
    )
    top.add_argument("-o", "--output", choices=["table", "json"], default="table")
    top.add_argument("-w", "--watch", action="store_true", help="redraw until interrupted")
    top.add_argument(
        "--interval", type=float, default=5.0, help="seconds between redraws with --watch (default 5)"
    )
    top.set_defaults(func=_cmd_top)

    crd = sub.add_parser("crd", help="print the LLMDeployment CRD generated from the API types")
    crd.add_argument("--write", nargs="*", metavar="PATH", help="write it to these files instead")
    crd.add_argument("--reference", action="store_true", help="the field reference in Markdown instead")
    crd.set_defaults(func=_cmd_crd)

    dash = sub.add_parser("dashboard", help="print the Grafana dashboard of the operator's metrics (JSON)")
    dash.add_argument("--write", nargs="*", metavar="PATH", help="write it to these files instead")
    dash.set_defaults(func=_cmd_dashboard)

    op = sub.add_parser("operator", help="run the kopf operator against the cluster in KUBECONFIG")
    scope = op.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", help="watch this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    op.add_argument("--liveness", default=None, help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    op.add_argument("-v", "--verbose", action="store_true")
    op.add_argument(
        "--leader-elect",
        action="store_true",
        help="plan only while holding a coordination.k8s.io Lease (run several replicas; one leads)",
    )
    op.add_argument("--lease-name", default="kubevram-operator", help="the Lease (default kubevram-operator)")
    op.add_argument(
        "--lease-namespace",
        default=None,
        help="the Lease's namespace (default: $KUBEVRAM_OPERATOR_NAMESPACE, else the pod's, else default)",
    )
    op.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve the operator's Prometheus metrics at http://0.0.0.0:PORT/metrics",
    )
    op.set_defaults(func=_cmd_operator)

    wk = sub.add_parser("worker", help="serve a model over an OpenAI-compatible API")
    wk.add_argument("--model", required=True, help="model directory or hub id")
    wk.add_argument("--plan", help="plan JSON written by the operator (device map, max memory, dtype)")
    wk.add_argument("--host", default="0.0.0.0")
    wk.add_argument("--port", type=int, default=8000)
    wk.add_argument("--admin-port", type=int, default=None, help="serve /v1/admin/* on this port only")
    wk.add_argument("--deployment", help="LLMDeployment YAML whose generation defaults apply")
    wk.add_argument("--served-model-name", help="the name clients put in `model` (default: the model id)")
    wk.add_argument("--max-batch-size", type=int, help="override serving.maxBatchSize")
    wk.add_argument("--max-sequence-length", type=int, help="override serving.maxSequenceLength")
    wk.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429 (default 256)")
    wk.add_argument(
        "--max-body-bytes",
        type=int,
        help="largest request body (default: 64 KiB + 64 bytes per token of maxSequenceLength)",
    )
    wk.add_argument(
        "--drain-seconds",
        type=float,
        help="on SIGTERM, how long requests in flight may finish (default 20: the pod's grace period, 30, "
        "less its preStop pause and a margin)",
    )
    wk.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    wk.set_defaults(func=_cmd_worker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from kubevram.api.errors import SpecError

    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # here, where a closed pipe can still be caught, not at interpreter exit
        return code
    except (CliError, SpecError) as exc:
        print(f"kubevram {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        # `kubevram plan | head`: the reader has what it wanted. Send what is left in the buffer to
        # /dev/null, so the flush at exit does not fail again (Python's documented recipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

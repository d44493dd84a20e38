"""Every command README.md and docs/*.md show, run or checked offline against what it acts on.

Commands are read from the ``sh``/``bash``/``shell``/``console`` code blocks (every line) and from
unlabelled blocks (lines starting ``$ ``, the lines after them being the output shown). Each pipeline,
``&&`` list, ``$(...)`` and ``<(...)`` is split into simple commands, and each goes to the checker of its
program:

* ``kubevram estimate|plan|crd|dashboard ...`` runs for real (in a scratch copy of the repository's
  examples); when the docs show its output, the output must be what it prints. ``kubevram top`` runs against
  an emulated cluster (kmock, tests/operator/kubevram_emulator.py): the EKS nodes of tests/data,
  examples/qwen2-7b.yaml in namespace ``ai`` planned by the operator's reconciler, one worker pod and its
  report (:func:`emulated_cluster`). ``kubevram operator|worker`` (servers) and ``kubevram top --watch`` are
  parsed by the real CLI parser.
* ``helm install|upgrade|template`` renders the chart offline (helm-python-sdk) with the values the
  command gives (``-f`` files the docs show, ``--set``), ``helm uninstall`` must name that release.
* ``kubectl apply|create -f FILE`` validates the file: LLMDeployments against the CRD's schema, other
  objects against the Kubernetes schemas (kubernetes-validate). Other ``kubectl`` verbs must name a
  resource type Kubernetes or the CRD knows and, for what kubevram or the chart creates, an object they
  really create (names, labels, JSONPath fields, namespaces).
* ``curl`` is sent to the worker's real apps (API on port 8000, admin on 8001) without a model: the
  route, method and body must be accepted (a 503 "loading" is the expected answer).
* ``docker build`` must name a stage of the Dockerfile (or a Dockerfile the docs show, which hadolint
  lints), ``pip install`` extras that pyproject.toml defines, ``python -m pytest`` paths that exist.

Files the docs leave to the reader (``bad.yaml``, ``nodes.yaml``, ``my-deployments.yaml``) have stand-ins
below; files the docs show as a code block starting ``# NAME`` are written from that block.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import KUBE_VERSION, ROOT, render_chart

from kubevram.api.v1alpha1 import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR
from kubevram.cli import build_parser, main
from kubevram.controller import render

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"sh", "bash", "shell", "console"}
EXAMPLE = ROOT / "examples" / "qwen2-7b.yaml"
EKS_NODES = ROOT / "tests" / "data" / "eks-gpu-nodes.yaml"

# Programs that only shape the output of a documented command (pipes): nothing to check on their own.
FILTERS = {"jq", "head", "base64", "grep", "sort", "tail", "wc"}


def _bad_yaml() -> str:
    doc = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    doc["spec"].setdefault("precision", {})["weights"] = "fp7"
    return yaml.safe_dump(doc)


def _all_examples() -> str:
    return "---\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "examples").glob("*.yaml")))


# What a reader brings, for the files the docs name without showing them.
STAND_INS = {
    "bad.yaml": _bad_yaml,  # README: an LLMDeployment with a wrong precision
    "nodes.yaml": lambda: EKS_NODES.read_text(encoding="utf-8"),  # `kubectl get nodes -o yaml > nodes.yaml`
    "my-deployments.yaml": _all_examples,
}


# ------------------------------------------------------------------------------------ reading docs


@dataclass
class Shown:
    """One command line as the docs show it, with the output they show after it (if any)."""

    source: str  # file:line
    text: str
    output: list[str] = field(default_factory=list)


@dataclass
class Block:
    source: str
    lang: str
    lines: list[str]


def blocks(path: Path) -> Iterator[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = len(m.group(1)), m.group(2), i + 1
        i += 1
        body = []
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1
        yield Block(f"{path.relative_to(ROOT)}:{start}", lang, body)


def shown_files() -> dict[str, str]:
    """Files the docs show in full: a code block whose first line is ``# NAME`` (NAME with a dot)."""
    out: dict[str, str] = {}
    for path in DOCS:
        for block in blocks(path):
            m = (
                re.fullmatch(r"#\s*([\w.-]+\.\w+|Dockerfile[\w.-]*)\s*", block.lines[0])
                if block.lines
                else None
            )
            if m:
                out[m.group(1)] = "\n".join(block.lines) + "\n"
    return out


def commands() -> list[Shown]:
    out: list[Shown] = []
    for path in DOCS:
        for block in blocks(path):
            file, first = block.source.rsplit(":", 1)

            def where(n: int, file: str = file, first: str = first) -> str:
                return f"{file}:{int(first) + 1 + n}"

            if block.lang in SHELL_LANGS:
                pending, start = "", 0
                for n, line in enumerate(block.lines):
                    if not pending and (not line.strip() or line.lstrip().startswith("#")):
                        continue
                    if not pending:
                        start = n
                    text = line[2:] if not pending and line.startswith("$ ") else line
                    pending = f"{pending}\n{text}" if pending else text
                    if pending.endswith("\\"):
                        pending = pending[:-1]
                        continue
                    try:
                        shlex.split(pending, comments=True)
                    except ValueError:  # an open quote: the command goes on
                        continue
                    out.append(Shown(where(start), pending))
                    pending = ""
            elif block.lang == "":
                current: Shown | None = None
                for n, line in enumerate(block.lines):
                    if line.startswith("$ "):
                        current = Shown(where(n), line[2:])
                        out.append(current)
                    elif current is not None and line.strip():
                        current.output.append(line.strip())
    return out


SUBST = re.compile(r"([$<])\(([^()]*)\)")


@dataclass
class Simple:
    """One simple command of a documented line: argv, and where its stdout goes."""

    argv: list[str]
    writes: str | None = None  # `> FILE`
    piped: bool = False  # its output goes to another program


def split(text: str) -> list[Simple]:
    """The simple commands of a shell line; ``$(...)`` and ``<(...)`` become commands of their own and
    the placeholders ``SUBST`` and ``PROCESS`` (a file holding the inner command's output)."""
    inner: list[Simple] = []

    def replace(m: re.Match[str]) -> str:
        inner.extend(split(m.group(2)))
        return " PROCESS " if m.group(1) == "<" else " SUBST "

    text = SUBST.sub(replace, text)
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    out: list[Simple] = []
    current = Simple([])
    tokens = list(lexer)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in ("&&", "||", ";", "&", "|"):
            current.piped = token == "|"
            out.append(current)
            current = Simple([])
        elif token == ">":
            i += 1
            current.writes = tokens[i]
        else:
            current.argv.append(token)
        i += 1
    out.append(current)
    simple = [c for c in out if c.argv and not re.fullmatch(r"\w+=\S*", c.argv[0])]
    # An assignment `VAR=$(...)` leaves only its inner command.
    return inner + simple


SHOWN = commands()
FILES = shown_files()


def test_the_docs_show_commands_of_every_kind() -> None:
    programs = {c.argv[0] for s in SHOWN for c in split(s.text)}
    assert {"kubevram", "kubectl", "helm", "curl", "docker", "pip"} <= programs, programs


# --------------------------------------------------------------------------------------- checkers


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch directory where documented commands run: the repository's examples, charts and CRDs
    (copies: `kubevram crd --write` writes there), the files the docs show and the stand-ins."""
    here = tmp_path_factory.mktemp("docs")
    for name in ("examples", "crds", "charts"):
        shutil.copytree(ROOT / name, here / name)
    for name, text in FILES.items():
        (here / name).write_text(text, encoding="utf-8")
    for name, make in STAND_INS.items():
        (here / name).write_text(make(), encoding="utf-8")
    (here / "PROCESS").write_text(EKS_NODES.read_text(encoding="utf-8"), encoding="utf-8")
    return here


#: What the docs' `kubevram top` example shows the worker of ai/qwen2-7b reporting (torch allocator bytes).
WORKER_REPORT = {"index": 0, "reservedBytes": 16_106_127_360, "peakReservedBytes": 17_716_740_096}
WORKER_SAMPLES = [  # prefill peaks (tokens, bytes): the operator's calibration fits them
    (512, 15_320_000_000), (2048, 15_700_000_000), (4096, 16_240_000_000), (8192, 17_310_000_000)]


@pytest.fixture(scope="module")
def emulated_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A Kubernetes API (kmock's emulator over HTTP) holding what the docs' `kubevram top` reads: the EKS
    nodes, examples/qwen2-7b.yaml in namespace ai as the operator's reconciler planned and applied it, its
    worker pod (what the ReplicaSet makes) and that worker's report, calibrated as the operator's timer
    does; the kubeconfig's path."""
    sys.path.append(str(ROOT / "tests" / "operator"))
    from kubevram_emulator import EmulatedCluster

    from kubevram.controller.adapter import Cluster as Adapter
    from kubevram.controller.calibrate import calibration_status
    from kubevram.controller.reconcile import Reconciler, Settings

    emulated = EmulatedCluster(tmp_path_factory.mktemp("top")).start()
    try:
        for node in yaml.safe_load(EKS_NODES.read_text(encoding="utf-8"))["items"]:
            emulated.add_node(node)
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ai"}}
        emulated.create("/api/v1/namespaces", namespace)
        body = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
        emulated.create_llmd(body, namespace="ai")
        name = body["metadata"]["name"]
        with _kubeconfig(emulated.kubeconfig):  # the adapter's client is made from KUBECONFIG
            assert Reconciler(Adapter(), Settings()).replan("ai", name)
        (workload,) = emulated.deployments("ai")
        template = workload["spec"]["template"]
        raw = template["metadata"]["annotations"][render.RESERVATION]
        held = json.loads(raw)
        pod = f"{workload['metadata']['name']}-7d9c5b6f4-x2k8q"
        emulated.create("/api/v1/namespaces/ai/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "labels": template["metadata"]["labels"],
                         "annotations": {render.RESERVATION: raw}},
            "spec": {"nodeName": held["node"], "containers": [{"name": "worker", "image": "w"}]},
        })
        samples = [{"tokens": t, "batch": 1, "peakAllocatedBytes": b} for t, b in WORKER_SAMPLES]
        report = {"model": body["spec"]["model"]["id"], "weights": "bfloat16", "devices": [WORKER_REPORT],
                  "samples": samples}
        emulated.patch(emulated.llmd_path(name, "ai") + "/status", {"status": {"workers": {pod: report}}})
        calibration = calibration_status(emulated.llmd(name, "ai") or {}, "2026-11-21T10:31:00Z")
        emulated.patch(emulated.llmd_path(name, "ai") + "/status", {"status": {"calibration": calibration}})
        yield emulated.kubeconfig
    finally:
        emulated.stop()


@contextlib.contextmanager
def _kubeconfig(path: Path | None) -> Iterator[None]:
    """``KUBECONFIG`` set to ``path`` inside the block (nothing changes when ``path`` is None)."""
    before = os.environ.get("KUBECONFIG")
    if path is not None:
        os.environ["KUBECONFIG"] = str(path)
    try:
        yield
    finally:
        if path is not None:
            if before is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = before


@dataclass
class Context:
    workspace: Path
    helm_releases: dict[str, str] = field(default_factory=dict)  # release -> namespace
    kubeconfig: Path | None = None  # the emulated cluster `kubevram top` reads


def run_kubevram(argv: list[str], shown: Shown, ctx: Context) -> None:
    args = argv[1:]
    command = next((a for a in args if not a.startswith("-")), "")
    if command in ("operator", "worker") or (command == "top" and {"-w", "--watch"} & set(args)):
        build_parser().parse_args(args)  # a server, or a loop until Ctrl-C: its arguments must parse
        return
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(ctx.workspace), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            _kubeconfig(ctx.kubeconfig if command == "top" else None):
        try:
            code = main(args)
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    printed = [line.strip() for line in (out.getvalue() + err.getvalue()).splitlines() if line.strip()]
    expected_error = any(line.startswith(f"kubevram {command}:") for line in shown.output)
    assert code == (2 if expected_error else 0), (
        f"{shown.source}: `{shown.text}` exited {code}: {err.getvalue()}"
    )
    for line in shown.output:
        assert line in printed, f"{shown.source}: the docs show {line!r}; it prints {printed}"
    if "-o" in args and args[args.index("-o") + 1] == "json":
        json.loads(out.getvalue())


def _helm_values(args: list[str], ctx: Context) -> dict[str, Any]:
    values: dict[str, Any] = {}
    i = 0
    while i < len(args):
        if args[i] in ("-f", "--values"):
            loaded = yaml.safe_load((ctx.workspace / args[i + 1]).read_text(encoding="utf-8")) or {}
            values.update(loaded)
            i += 1
        elif args[i] == "--set":
            key, _, value = args[i + 1].partition("=")
            target = values
            *parents, leaf = key.split(".")
            for part in parents:
                target = target.setdefault(part, {})
            target[leaf] = {"true": True, "false": False}.get(value, value)
            i += 1
        i += 1
    return values


def _flag(args: list[str], *names: str, default: str = "") -> str:
    for i, arg in enumerate(args):
        if arg in names and i + 1 < len(args):
            return args[i + 1]
        for name in names:
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return default


def _positional(args: list[str], with_value: set[str]) -> list[str]:
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in with_value:
            skip = True
        elif not arg.startswith("-"):
            out.append(arg)
    return out


HELM_VALUE_FLAGS = {"-n", "--namespace", "-f", "--values", "--set", "--version", "--kube-context"}


def check_helm(argv: list[str], shown: Shown, ctx: Context) -> None:
    verb, args = argv[1], argv[2:]
    namespace = _flag(args, "-n", "--namespace", default="default")
    positional = _positional(args, HELM_VALUE_FLAGS)
    if verb in ("install", "upgrade", "template"):
        release, chart = positional[:2]
        assert (ctx.workspace / chart / "Chart.yaml").exists(), f"{shown.source}: no chart at {chart}"
        docs, _ = render_chart(_helm_values(args, ctx), name=release, namespace=namespace)
        assert any(d["kind"] == "Deployment" for d in docs)
        ctx.helm_releases[release] = namespace
    elif verb == "uninstall":
        (release,) = positional
        assert ctx.helm_releases.get(release) == namespace, (
            f"{shown.source}: no release {release} in {namespace}"
        )
    else:
        pytest.fail(f"{shown.source}: no offline check for `helm {verb}`; add one to {Path(__file__).name}")


# kubectl's names for the resource types the docs use (kubectl api-resources), and ours from the CRD.
KUBECTL_TYPES = {
    **dict.fromkeys(["node", "nodes", "no"], "Node"),
    **dict.fromkeys(["pod", "pods", "po"], "Pod"),
    **dict.fromkeys(["service", "services", "svc"], "Service"),
    **dict.fromkeys(["deployment", "deployments", "deploy"], "Deployment"),
    **dict.fromkeys(["secret", "secrets"], "Secret"),
    **dict.fromkeys(["namespace", "namespaces", "ns"], "Namespace"),
    **dict.fromkeys(["configmap", "configmaps", "cm"], "ConfigMap"),
    **dict.fromkeys(
        ["crd", "crds", "customresourcedefinition", "customresourcedefinitions"], "CustomResourceDefinition"
    ),
    **dict.fromkeys([PLURAL, SINGULAR, *SHORT_NAMES, f"{PLURAL}.{GROUP}"], KIND),
}
KUBECTL_VALUE_FLAGS = {
    "-n",
    "--namespace",
    "-o",
    "--output",
    "-l",
    "--selector",
    "-L",
    "--label-columns",
    "-f",
    "--filename",
    "--from-literal",
    "--type",
    "-c",
    "--container",
}


@dataclass
class Cluster:
    """What the chart and the operator create for the documented example, to check names against."""

    objects: dict[tuple[str, str], dict[str, Any]]  # (kind, name) -> manifest
    pod_patterns: list[re.Pattern[str]]
    crd: dict[str, Any]


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    docs, _ = render_chart({}, name="kubevram", namespace="kubevram-system")
    body = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    body["metadata"].update(namespace="ai", uid="00000000-0000-4000-8000-000000000000")
    from kubevram.api.load import parse_deployment

    spec = parse_deployment(body).spec
    plan = {
        "name": body["metadata"]["name"],
        "estimate": {"parameters": 7_615_616_512},
        "replicas": [{"node": "gpu-1", "gpus": [0], "maxMemory": {"0": 20 * 2**30}, "deviceMap": {"": 0}}],
        "unscheduled": {"count": 0},
    }
    children = render.render_children(body, spec, plan, image="w")
    children.append(render.render_secret(body, "t"))
    crd = yaml.safe_load((ROOT / "crds" / "llmdeployment.yaml").read_text(encoding="utf-8"))
    objects = {(o["kind"], o["metadata"]["name"]): o for o in [*docs, *children, crd, body]}
    # Pods of a Deployment are named <deployment>-<ReplicaSet hash>-<5 characters>.
    pods = [
        re.compile(re.escape(o["metadata"]["name"]) + r"-[a-z0-9]{6,10}-[a-z0-9]{5}")
        for o in children
        if o["kind"] == "Deployment"
    ]
    pods += [re.compile(r"[a-z0-9]+(-[a-z0-9]+)*-[0-9a-f]{8}-[a-z0-9]{6,10}-[a-z0-9]{5}")]  # any worker pod
    return Cluster(objects, pods, crd)


def _validate_file(path: Path, shown: Shown, crd_validator: Any) -> None:
    for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
        if not doc:
            continue
        if doc.get("kind") == KIND:
            errors = [e.message for e in crd_validator.iter_errors(doc)]
            assert errors == [], f"{shown.source}: {path.name}: {errors}"
        elif doc.get("kind") == "ScaledObject":  # KEDA's CRD, from its published schema
            from test_autoscaling_examples import keda_validator

            errors = [e.message for e in keda_validator().iter_errors(doc)]
            assert errors == [], f"{shown.source}: {path.name}: {errors}"
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def _jsonpath_fields(expr: str) -> list[str]:
    return [p for p in re.sub(r"[{}]", "", expr).split(".") if p]


def check_kubectl(argv: list[str], shown: Shown, ctx: Context, cluster: Cluster, crd_validator: Any) -> None:
    args = argv[1:]
    namespace = _flag(args, "-n", "--namespace", default="default")
    positional = _positional(args, KUBECTL_VALUE_FLAGS)
    verb, rest = positional[0], positional[1:]
    where = f"{shown.source}: `{shown.text}`"
    if verb in ("apply", "create") and _flag(args, "-f", "--filename"):
        _validate_file(ctx.workspace / _flag(args, "-f", "--filename"), shown, crd_validator)
        return
    if verb == "create" and rest[:1] in (["namespace"], ["ns"]):
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", rest[1]), where
        return
    if verb == "create" and rest[:2] == ["secret", "generic"]:
        return
    if verb == "label":
        kind = KUBECTL_TYPES[rest[0]]
        for label in rest[2:]:
            key, _, value = label.partition("=")
            if key.startswith("pod-security.kubernetes.io/"):
                assert key.rsplit("/", 1)[1] in ("enforce", "audit", "warn"), where
                assert value in ("privileged", "baseline", "restricted"), where
        assert kind == "Namespace", where
        return
    if verb == "rollout":
        rest = rest[1:]  # rollout status TYPE/NAME
    if verb == "port-forward":
        target, ports = rest[0], rest[1:]
        kind, _, name = target.partition("/") if "/" in target else ("pod", "", target)
        _check_object(KUBECTL_TYPES[kind], name, namespace, cluster, where)
        if KUBECTL_TYPES[kind] == "Service":
            service = cluster.objects[("Service", name)]
            assert {int(p.split(":")[1]) for p in ports} <= {p["port"] for p in service["spec"]["ports"]}, (
                where
            )
        return
    if verb not in ("get", "delete", "describe", "rollout", "logs"):
        pytest.fail(f"{where}: no offline check for `kubectl {verb}`; add one to {Path(__file__).name}")
    if not rest:
        pytest.fail(f"{where}: no resource type")
    kind_text, _, name = rest[0].partition("/")
    kind = KUBECTL_TYPES.get(kind_text)
    assert kind is not None, f"{where}: unknown resource type {kind_text!r}"
    names = [name] if name else rest[1:]
    for n in names:
        _check_object(kind, n, namespace, cluster, where)
    selector = _flag(args, "-l", "--selector")
    if selector:
        key, _, value = selector.partition("=")
        labels = [
            o["spec"]["template"]["metadata"]["labels"]
            for (k, _), o in cluster.objects.items()
            if k == "Deployment" and o["metadata"]["labels"].get(render.LABEL_MANAGED_BY)
        ]
        assert any(lab.get(key) == value for lab in labels), f"{where}: no worker pod has {selector}"
    for column in _flag(args, "-L", "--label-columns").split(","):
        if column:
            from kubevram.planner import inventory

            known = {v for k, v in vars(inventory).items() if k.startswith("LABEL_")}
            assert column in known, f"{where}: the planner reads no label {column}"
    output = _flag(args, "-o", "--output")
    if output.startswith("jsonpath="):
        fields = _jsonpath_fields(output.split("=", 1)[1])
        if kind == "Secret":
            secret = cluster.objects[("Secret", names[0])]
            assert fields[0] == "data" and fields[1] in secret["stringData"], where
        elif kind == KIND:
            node = cluster.crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            for part in fields:
                node = node["properties"][part]


def _check_object(kind: str, name: str, namespace: str, cluster: Cluster, where: str) -> None:
    if kind == "Pod":
        assert name.startswith("$") or any(p.fullmatch(name) for p in cluster.pod_patterns), (
            f"{where}: pod {name}"
        )
        return
    if kind in ("Node", "Namespace") or name.startswith("$"):
        return
    obj = cluster.objects.get((kind, name))
    assert obj is not None, f"{where}: nothing creates {kind} {name!r}"
    if kind != "CustomResourceDefinition" and obj["metadata"].get("namespace") and namespace != "default":
        assert obj["metadata"]["namespace"] == namespace or kind == KIND, (
            f"{where}: {kind} {name} is not in {namespace}"
        )


def check_curl(argv: list[str], shown: Shown) -> None:
    from fastapi.testclient import TestClient

    from kubevram.worker.admin import create_admin_app
    from kubevram.worker.api import create_app
    from kubevram.worker.memory import MemoryMonitor
    from kubevram.worker.service import WorkerState

    args = argv[1:]
    url = next(a for a in args if a.startswith("http"))
    data = _flag(args, "-d", "--data")
    method = _flag(args, "-X", "--request", default="POST" if data else "GET")
    headers = {}
    for i, arg in enumerate(args):
        if arg == "-H":
            key, _, value = args[i + 1].partition(":")
            headers[key.strip()] = value.strip().replace("$TOKEN", "t0k3n")
    m = re.fullmatch(r"https?://[^/:]+:(\d+)(/.*)", url)
    assert m, f"{shown.source}: {url}"
    port, path = int(m.group(1)), m.group(2)
    model = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))["spec"]["model"]["id"]
    app = {
        render.API_PORT: lambda: create_app(WorkerState(model_names=[model])),
        render.ADMIN_PORT: lambda: create_admin_app(MemoryMonitor(), "t0k3n"),
    }[port]()
    with TestClient(app) as client:
        response = client.request(method, path, headers=headers, content=data.encode() if data else None)
    assert response.status_code not in (400, 401, 404, 405, 422), (
        f"{shown.source}: `{method} {path}` answered {response.status_code}: {response.text}"
    )


def check_docker(argv: list[str], shown: Shown, ctx: Context) -> None:
    from dockerfile_parse import DockerfileParser

    args = argv[2:]
    assert argv[1] == "build", shown.source
    dockerfile = (
        ctx.workspace / _flag(args, "-f", "--file", default="")
        if _flag(args, "-f", "--file")
        else ROOT / "Dockerfile"
    )
    target = _flag(args, "--target")
    parser = DockerfileParser(fileobj=io.BytesIO(dockerfile.read_bytes()), env_replace=False)
    stages = [
        re.split(r"\s+as\s+", i["value"], flags=re.IGNORECASE)[-1]
        for i in parser.structure
        if i["instruction"] == "FROM"
    ]
    if target:
        assert target in stages, f"{shown.source}: no stage {target} in {dockerfile.name}"
    else:
        base = parser.baseimage
        assert base.split(":")[0] in ("ghcr.io/kubevram/worker", "ghcr.io/kubevram/operator"), shown.source
        binary = shutil.which("hadolint")
        if binary:
            done = subprocess.run(
                [binary, "--format", "json", str(dockerfile)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert json.loads(done.stdout or "[]") == [], f"{shown.source}: {done.stdout}"


def check_pip(argv: list[str], shown: Shown) -> None:
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for arg in argv[2:]:
        m = re.fullmatch(r"\.\[([\w,]+)\]", arg)
        if m:
            assert set(m.group(1).split(",")) <= extras, f"{shown.source}: extras {m.group(1)}"
        elif not arg.startswith("-") and arg != ".":
            assert arg == "torch==2.13.0", f"{shown.source}: pip installs {arg}"


def check_python(argv: list[str], shown: Shown) -> None:
    assert argv[1:3] == ["-m", "pytest"], shown.source
    for arg in argv[3:]:
        if not arg.startswith("-"):
            assert (ROOT / arg).exists(), f"{shown.source}: no {arg}"


def test_every_documented_command_runs_or_checks_out(
    workspace: Path, cluster: Cluster, crd_validator: Any, emulated_cluster: Path
) -> None:
    ctx = Context(workspace, kubeconfig=emulated_cluster)
    checked = 0
    for shown in SHOWN:
        for command in split(shown.text):
            program = command.argv[0]
            if command.writes and command.argv[:3] == ["kubectl", "get", "nodes"]:
                assert command.writes in STAND_INS  # a node list the reader saves: stood in by EKS nodes
            if program == "kubevram":
                run_kubevram(command.argv, shown, ctx)
            elif program == "helm":
                check_helm(command.argv, shown, ctx)
            elif program == "kubectl":
                check_kubectl(command.argv, shown, ctx, cluster, crd_validator)
            elif program == "curl":
                check_curl(command.argv, shown)
            elif program == "docker":
                check_docker(command.argv, shown, ctx)
            elif program == "pip":
                check_pip(command.argv, shown)
            elif program == "python":
                check_python(command.argv, shown)
            elif program in FILTERS:
                continue
            else:
                pytest.fail(
                    f"{shown.source}: `{shown.text}`: no check for {program!r}; add one to "
                    f"{Path(__file__).name}"
                )
            checked += 1
    assert checked >= 40


def test_the_shown_output_is_what_kubevram_prints(workspace: Path) -> None:
    """README's `$ kubevram estimate -f bad.yaml` and its line, found and compared above: make sure
    the parser saw the output (a broken parse would compare nothing)."""
    with_output = [s for s in SHOWN if s.output]
    assert with_output and all(s.text.startswith("kubevram ") for s in with_output)

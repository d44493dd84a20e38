"""What the user docs state as facts is what the code does, and cites what a reader can find."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT

from kubevram.api.quantity import parse_quantity
from kubevram.api.v1alpha1 import DEFAULT_OVERHEAD_PER_GPU
from kubevram.api.workerplan import DEFAULT_OFFLOAD_FOLDER
from kubevram.cli import main

USER_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_license_is_the_one_pyproject_declares() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["license"]
    assert declared == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda p: p.name)
def test_docs_cite_nothing_a_reader_of_the_repository_lacks(path: Path) -> None:
    """The design notes and the seed articles are the developers' material, not the repository's."""
    text = path.read_text(encoding="utf-8")
    # "seed" as a word outside backticks (`seed` is also the sampling parameter).
    assert not re.search(r"(?<!`)\bseeds?\b(?!`)|DESIGN\.md", text, flags=re.IGNORECASE), path


def test_the_documented_overhead_default_is_the_one_the_estimate_uses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = (ROOT / "docs" / "crd-reference.md").read_text(encoding="utf-8")
    (row,) = [line for line in reference.splitlines() if "`spec.estimation.overheadPerGPU`" in line]
    assert f"unset means {DEFAULT_OVERHEAD_PER_GPU}" in row
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "apiVersion: llm.kubevram.io/v1alpha1\nkind: LLMDeployment\nmetadata: {name: q}\n"
        "spec: {model: {id: Qwen/Qwen2-7B-Instruct}}\n",
        encoding="utf-8",
    )
    assert main(["estimate", "-f", str(manifest), "-o", "json"]) == 0
    (estimate,) = json.loads(capsys.readouterr().out)
    assert estimate["overheadBytesPerGPU"] == parse_quantity(DEFAULT_OVERHEAD_PER_GPU)


def test_the_offload_folder_is_given_one_way() -> None:
    """Planner, operator and worker share one folder, and every doc that names a default names it."""
    from kubevram.controller.render import OFFLOAD_DIR
    from kubevram.planner.devicemap import DEFAULT_OFFLOAD_FOLDER as planner_default

    assert OFFLOAD_DIR == planner_default == DEFAULT_OFFLOAD_FOLDER
    for path in USER_DOCS:
        for folder in re.findall(r"`(/[\w/.-]*offload[\w/.-]*)`", path.read_text(encoding="utf-8")):
            assert folder == DEFAULT_OFFLOAD_FOLDER, f"{path.name} names {folder}"

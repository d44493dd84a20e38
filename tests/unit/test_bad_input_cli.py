"""Bad input and closed pipes at the command line: negative memory quantities are refused naming the
field and the value (parser and CLI; the CRD schema is checked in tests/chart), and `kubevram plan |
head` or `kubevram estimate | head` end without a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kubevram.api.errors import SpecError
from kubevram.api.load import load_deployments
from kubevram.api.quantity import parse_quantity
from kubevram.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "qwen2-7b.yaml"

NEGATIVE = """
apiVersion: llm.kubevram.io/v1alpha1
kind: LLMDeployment
metadata: {{name: big}}
spec:
  model: {{id: meta-llama/Meta-Llama-3-70B-Instruct}}
  estimation: {{overheadPerGPU: {value}}}
"""


@pytest.mark.parametrize("value", ["-200Gi", "-1", "-0.5Ki", "-1e3", -5])
def test_negative_overhead_is_refused_naming_the_field_and_the_value(value: str | int) -> None:
    with pytest.raises(SpecError) as info:
        load_deployments(NEGATIVE.format(value=value), "big.yaml")
    assert info.value.field == "spec.estimation.overheadPerGPU"
    assert str(value) in info.value.message and "negative" in info.value.message


@pytest.mark.parametrize("value", ["0", "1280Mi", "1.25Gi", "+1Gi", "1e9", "500M", 0, 2**30])
def test_non_negative_overheads_are_fine(value: str | int) -> None:
    (dep,) = load_deployments(NEGATIVE.format(value=value), "big.yaml")
    assert parse_quantity(dep.spec.estimation.overheadPerGPU or 0) == parse_quantity(value)


@pytest.mark.parametrize("command", ["estimate", "plan"])
def test_the_cli_says_it_in_one_line_with_exit_status_2(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(NEGATIVE.format(value="-200Gi"), encoding="utf-8")
    assert main([command, "-f", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert "spec.estimation.overheadPerGPU" in err and "'-200Gi'" in err


@pytest.mark.parametrize("command", ["estimate", "plan"])
def test_a_reader_that_stops_early_gets_no_traceback(command: str) -> None:
    """`kubevram plan | head -1`: the reader is gone before the command writes (the worst case)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubevram.cli", command, "-f", str(EXAMPLE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    assert err == ""
    assert code == 141  # what a shell shows for a command ended by SIGPIPE: 128 + 13

"""Fixtures for the operator tests: kmock's Kubernetes emulator over HTTP and kopf's KopfRunner."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Read when kubevram.controller.handlers is imported (the timer's interval): short in tests.
os.environ.setdefault("KUBEVRAM_READY_INTERVAL", "1")
os.environ.setdefault("KUBEVRAM_CALIBRATION_INTERVAL", "1")

from kubevram_emulator import EmulatedCluster, emulated_cluster, running_operator


@pytest.fixture()
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatedCluster]:
    """An emulated API server; KUBECONFIG points at it for kopf and for the operator's client."""
    with emulated_cluster(tmp_path, monkeypatch) as emulated:
        yield emulated


@pytest.fixture()
def operator(cluster: EmulatedCluster) -> Iterator[Any]:
    with running_operator() as runner:
        yield runner

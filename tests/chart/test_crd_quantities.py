"""The CRD's schema refuses a negative amount of memory (as the API server would, before the operator
sees it), whether it is written as a string or as an integer, and takes every other quantity."""

from __future__ import annotations

from typing import Any

import pytest


def llmd(overhead: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llm.kubevram.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": "big"},
        "spec": {
            "model": {"id": "meta-llama/Meta-Llama-3-70B-Instruct"},
            "estimation": {"overheadPerGPU": overhead},
        },
    }


@pytest.mark.parametrize("value", ["-200Gi", "-1", "-.5Ki", "-1e3", -5, -1])
def test_negative_memory_is_refused_by_the_schema(value: Any, crd_validator: Any) -> None:
    errors = list(crd_validator.iter_errors(llmd(value)))
    assert errors, value
    assert [list(e.absolute_path) for e in errors] == [["spec", "estimation", "overheadPerGPU"]]


@pytest.mark.parametrize(
    "value", ["0", "1280Mi", "1.25Gi", "+1Gi", "1e9", "1e-3", "500M", ".5Gi", 0, 2**30, None]
)
def test_other_quantities_pass_the_schema(value: Any, crd_validator: Any) -> None:
    assert list(crd_validator.iter_errors(llmd(value))) == []

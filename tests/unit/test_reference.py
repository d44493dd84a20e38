"""The CRD reference in docs/ is generated from the types; it fails here when it drifts."""

from __future__ import annotations

from pathlib import Path

from kubevram.api.reference import render_reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "crd-reference.md"


def test_reference_matches_the_types() -> None:
    assert DOC.read_text(encoding="utf-8") == render_reference(), (
        "docs/crd-reference.md drifted: run `kubevram crd --reference --write docs/crd-reference.md`"
    )


def test_reference_lists_the_interface_fields() -> None:
    text = render_reference()
    for field in (
        "spec.replicas",
        "spec.model.id",
        "spec.model.config",
        "spec.precision.weights",
        "spec.serving.maxSequenceLength",
        "spec.serving.maxBatchSize",
        "spec.placement.strategy",
        "spec.placement.offload",
        "status.conditions",
        "status.estimate.totalBytes",
    ):
        assert f"| `{field}` |" in text
    assert "| `spec.precision.weights` | float32 \\| float16 \\| bfloat16 \\| int8 \\| int4 |" in text

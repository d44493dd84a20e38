"""The README's table of covered architectures is the code's (``architectures_markdown``)."""

from __future__ import annotations

from pathlib import Path

from kubevram.planner.families import FAMILIES, architectures_markdown

ROOT = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- architectures:begin -->\n", "<!-- architectures:end -->"
REGENERATE = (
    "python -c \"from kubevram.planner.families import architectures_markdown as a; print(a(), end='')\""
)


def test_readme_table_is_generated_from_the_code() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    assert table == architectures_markdown(), (
        f"README's architectures table drifted; regenerate with {REGENERATE}"
    )
    assert len(table.strip().splitlines()) == 2 + len(FAMILIES)

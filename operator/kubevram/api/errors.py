"""Turning bad input into one line that names the field and the value.

``spec.precision.weights: 'fp7' is not one of float32, float16, bfloat16, int8, int4``
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import ValidationError


class SpecError(ValueError):
    """An LLMDeployment (or a model config) that cannot work: ``field`` names where, ``str()`` says why."""

    def __init__(self, field: str, message: str, *, source: str = "") -> None:
        self.field = field
        self.message = message
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__(f"{prefix}{field}: {message}" if field else f"{prefix}{message}")


def field_path(loc: Iterable[str | int], root: str = "") -> str:
    """``("spec", "placement", "tolerations", 0, "effect")`` -> ``spec.placement.tolerations[0].effect``."""
    out = root
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _choices(expected: str) -> list[str]:
    return [c.strip().strip("'\"") for c in re.split(r",\s*|\s+or\s+", expected) if c.strip()]


def _one(error: Any, root: str) -> tuple[str, str]:
    path = field_path(error["loc"], root)
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "missing":
        return path, "is required"
    if kind == "extra_forbidden":
        return path, f"unknown field (value {value!r})"
    if kind in ("enum", "literal_error"):
        return path, f"{value!r} is not one of {', '.join(_choices(str(ctx.get('expected', ''))))}"
    for key, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if key in ctx and kind.startswith(("greater", "less")):
            return path, f"{value!r} must be {word} {ctx[key]}"
    if kind == "value_error":
        return path, str(ctx.get("error", error["msg"]))
    return path, f"{value!r}: {error['msg'][0].lower()}{error['msg'][1:]}"


def from_validation_error(exc: ValidationError, root: str = "", source: str = "") -> SpecError:
    """The first error of a pydantic ``ValidationError`` as a ``SpecError`` (others joined after it)."""
    errors: Sequence[Any] = exc.errors(include_url=False)
    # Union members each report an error for the same field; keep the first per path.
    seen: dict[str, str] = {}
    for error in errors:
        path, message = _one(error, root)
        seen.setdefault(path, message)
    (first_path, first_message), *rest = seen.items()
    if rest:
        first_message += "; also " + "; ".join(f"{p}: {m}" for p, m in rest)
    return SpecError(first_path, first_message, source=source)

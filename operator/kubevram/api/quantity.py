"""Kubernetes resource quantities (``40Gi``, ``512Mi``, ``1.5G``) to integers, and back for people."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SUFFIXES: dict[str, Decimal] = {
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
}
_PATTERN = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")

GiB = 2**30
MiB = 2**20
# A quantity of memory, as the CRD's schema checks it: Kubernetes' quantity pattern without a sign
# other than "+" in front (an exponent may still be negative: 1e-3 is a small positive number).
NON_NEGATIVE_QUANTITY_PATTERN = (
    r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def parse_quantity(value: str | int | float) -> int:
    """Return a quantity as an integer (bytes for memory), rounding fractions up as Kubernetes does.

    Raises ``ValueError`` naming the value when it is not a quantity.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a quantity such as 40Gi")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(Decimal(repr(value)).to_integral_value(rounding="ROUND_CEILING"))
    match = _PATTERN.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a quantity such as 40Gi")
    try:
        number = Decimal(match.group(1)) * _SUFFIXES[match.group(2) or ""]
    except InvalidOperation as exc:  # pragma: no cover - the pattern admits only numbers
        raise ValueError(f"{value!r} is not a quantity such as 40Gi") from exc
    return int(number.to_integral_value(rounding="ROUND_CEILING"))


def parse_memory(value: str | int | float) -> int:
    """``parse_quantity`` for an amount of memory: also refuses a negative one, naming the value."""
    n = parse_quantity(value)
    if n < 0:
        raise ValueError(f"{value!r} is negative; an amount of memory is a quantity >= 0 such as 1280Mi")
    return n


def format_bytes(n: int | float) -> str:
    """``1.5 GiB``-style text for people (binary units, one decimal)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")

"""Small numeric helpers of the reports: mean, ratio, JSON-safe and printable numbers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean(values: Sequence[float]) -> float | None:
    """The mean, or None for no values."""
    return float(np.mean(values)) if len(values) else None


def finite_or_none(value: float | None) -> float | None:
    """JSON-safe number: None stays None, non-finite becomes None."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None where either is missing, ``b`` is not positive or the ratio is not finite."""
    if a is None or b is None or not b > 0:
        return None
    return finite_or_none(a / b)


def num(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``; "n/a" for None."""
    return "n/a" if value is None else format(value, spec)

"""Config values (swept settings): comparing, ordering and printing them the same way everywhere."""
from __future__ import annotations

import math
import numbers


def is_number(x: object) -> bool:
    """True for ints and floats (NumPy's too), False for bools and everything else."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_missing(x: object) -> bool:
    """True for None and NaN (how pandas shows a key a trial's config lacked)."""
    return x is None or (is_number(x) and math.isnan(float(x)))


def same_value(a: object, b: object) -> bool:
    """Equal settings, numbers compared numerically (0 == 0.0) and missing == missing."""
    if is_missing(a) or is_missing(b):
        return is_missing(a) and is_missing(b)
    if is_number(a) and is_number(b):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def sort_key(x: object) -> tuple:
    """Numbers first in numeric order, then other values by their text, missing last."""
    if is_missing(x):
        return (2, 0.0, "")
    if is_number(x):
        return (0, float(x), "")
    return (1, 0.0, str(x))


def format_value(x: object) -> str:
    """A setting as printed in tables and labels: 256 (not 256.0), 0.45, fp16, none."""
    if is_missing(x):
        return "none"
    if isinstance(x, bool):
        return str(x).lower()
    if is_number(x):
        value = float(x)
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:g}"
    return str(x)


def canonical(x: object) -> object:
    """One spelling per setting value, for grouping: None for missing, float for numbers."""
    if is_missing(x):
        return None
    if is_number(x):
        return float(x)
    return x

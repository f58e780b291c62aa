"""Argument checks shared by the constructors and entry points: a clear error, with the
value, before anything is created or changed."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

__all__ = ["check_count"]


def check_count(name: str, value: Any, *, minimum: int = 0) -> int:
    """``value`` as an int (a Python or numpy integer; not a bool, nor a float however
    whole, nor a string) of at least ``minimum``; otherwise TypeError or ValueError naming
    ``name`` and the value."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if n < minimum:
        raise ValueError(f"{name}={n:,} must be >= {minimum:,}")
    return int(n)

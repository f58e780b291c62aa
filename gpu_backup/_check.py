"""Argument checks shared by the constructors: a clear error, with the value, before anything
is created."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["check_count"]


def check_count(value: Any, name: str, *, minimum: int = 0) -> int:
    """``value`` as an int (a Python or numpy integer, not a bool nor a float, however
    whole) that is at least ``minimum``; otherwise TypeError or ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name}={value:,} must be >= {minimum:,}")
    return value

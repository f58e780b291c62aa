"""Vectorised helpers over page indices: split into runs of consecutive values, and back."""

from __future__ import annotations

import numpy as np

__all__ = ["runs_of", "expand_runs"]


def runs_of(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split ``values`` (1-D int64) into maximal runs of consecutive increasing integers.

    Returns ``(starts, lengths, offsets)``: run ``i`` covers ``values[offsets[i]:offsets[i]+lengths[i]]``
    which equals ``arange(starts[i], starts[i]+lengths[i])``.  No Python loop per element.
    """
    n = values.shape[0]
    if n == 0:
        empty = np.empty(0, np.int64)
        return empty, empty, empty
    breaks = np.flatnonzero((values[1:] - values[:-1]) != 1) + 1  # np.diff costs more here
    if breaks.size == 0:  # the common case: one run
        return (np.array([values[0]], np.int64), np.array([n], np.int64),
                np.zeros(1, np.int64))
    offsets = np.concatenate(([0], breaks)).astype(np.int64)
    lengths = np.diff(np.concatenate((offsets, [n]))).astype(np.int64)
    return values[offsets].astype(np.int64), lengths, offsets


def expand_runs(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Inverse of :func:`runs_of`: the concatenation of ``arange(s, s+l)`` for each run."""
    starts = np.asarray(starts, np.int64)
    lengths = np.asarray(lengths, np.int64)
    if starts.size == 1:
        return np.arange(starts[0], starts[0] + lengths[0], dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(starts - offsets, lengths)

"""Argument checks for the stores: every bad value is refused with its value in the
message, before anything changes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._check import check_count
from .._os import OS_PAGE_SIZE
from ..errors import GpuBackupError, InvalidHandleError

__all__ = ["StoreSetupError", "as_bytes", "as_handles", "check_count", "check_page_size",
           "check_seconds", "check_store_args", "reject_duplicates"]

_INT64_MAX = np.iinfo(np.int64).max


class StoreSetupError(GpuBackupError, OSError):
    """The OS refused to set a store up (create, size or map its file).  Carries the
    errno, the path or name, and the sizes involved; the OS error is its ``__cause__``."""


def check_seconds(name: str, value: Any) -> float:
    """A positive, finite number of seconds."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                        np.floating)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name}={v!r} must be a positive, finite number of seconds")
    return v


def check_page_size(page_size: Any) -> int:
    page_size = check_count("page_size", page_size)
    if page_size < OS_PAGE_SIZE or page_size & (page_size - 1):
        raise ValueError(f"{page_size=} must be a power of two >= {OS_PAGE_SIZE} (the OS page)")
    return page_size


def check_store_args(*, page_size: Any, warm_slack: Any, warm_floor: Any, warm_decay: Any,
                     threads: Any, watermark: Any = None) -> None:
    """Every store constructor argument checked up front, before a file is made or opened
    (``None`` where a default applies)."""
    check_page_size(page_size)
    for name, value in (("warm_slack", warm_slack), ("warm_floor", warm_floor),
                        ("watermark", watermark)):
        if value is not None:
            check_count(name, value)
    check_seconds("warm_decay", warm_decay)
    if threads is not None:
        check_count("threads", threads, minimum=1)


def as_bytes(obj: Any, name: str, *, writable: bool) -> np.ndarray:
    """View a contiguous host buffer as 1-D uint8 without copying, or raise a clear error."""
    if isinstance(obj, np.ndarray):
        if obj.dtype != np.uint8:
            raise ValueError(f"{name} must have dtype uint8, got {obj.dtype}")
        if not obj.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (strides {obj.strides})")
        if writable and not obj.flags.writeable:
            raise ValueError(f"{name} is read-only")
        return obj.reshape(-1)
    try:
        mv = memoryview(obj)
    except TypeError:
        raise TypeError(
            f"{name} must be a host buffer (numpy array, bytes-like), got {type(obj).__name__}"
        ) from None
    if not mv.contiguous:
        raise ValueError(f"{name} must be contiguous")
    if writable and mv.readonly:
        raise ValueError(f"{name} is read-only")
    return np.frombuffer(mv.cast("B"), dtype=np.uint8)


def as_handles(handles: Any) -> np.ndarray:
    """Handles as 1-D int64.  A value no int64 holds (2**64-1, say) is reported as itself,
    not as the negative number a cast would make of it."""
    h = np.asarray(handles)
    if h.ndim != 1:
        raise ValueError(f"handles must be 1-D, got shape {h.shape}")
    if h.size and h.dtype.kind not in "iu":
        raise ValueError(f"handles must be integers, got dtype {h.dtype}")
    if h.dtype.kind == "u" and h.dtype.itemsize >= 8 and h.size:
        big = h > _INT64_MAX
        if big.any():
            raise InvalidHandleError(
                f"handle {int(h[big][0])} is out of range: handles are positive int64 values "
                f"({int(big.sum())} of {h.size} handles)")
    return h.astype(np.int64, copy=False)


def reject_duplicates(h: np.ndarray, what: str) -> np.ndarray:
    """``h`` (int64 handles) sorted when it is not increasing already; raises
    :class:`InvalidHandleError` naming a handle that appears more than once."""
    s = h
    if s.size > 1 and not (s[1:] > s[:-1]).all():
        s = np.sort(s)
        dup = np.flatnonzero(s[1:] == s[:-1])
        if dup.size:
            raise InvalidHandleError(
                f"{what}: handle {int(s[dup[0]])} appears more than once "
                f"({dup.size} duplicates among {s.size} handles)")
    return s

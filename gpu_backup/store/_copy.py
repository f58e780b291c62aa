"""Copy and fault-in kernels for the store: per segment of consecutive bytes, never per page.

A segment is ``(store_offset, buffer_offset, length)`` in bytes.  ``split`` cuts a list of
segments into parts of about equal bytes for the copy threads.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .._os import MADV_POPULATE_WRITE, OS_PAGE_SIZE, Mapping

__all__ = ["copy_segments", "fault_segments", "split"]

Segment = tuple[int, int, int]

# A copy into cold slots faults in this many bytes, copies them, then goes on: the
# fault-in runs just ahead of the copy, and the freshly zeroed pages are still in cache.
FAULT_AHEAD = 4 << 20


def fault_segments(mapping: Mapping | None, segs: list[Segment]) -> None:
    """``MADV_POPULATE_WRITE`` the store side of ``segs``; raises ``OSError`` (ENOMEM when
    memory runs out)."""
    if mapping is None:
        raise ValueError("mapping is unmapped")
    for so, _, ln in segs:
        mapping.madvise(MADV_POPULATE_WRITE, so, ln)


def copy_segments(flat: np.ndarray, buf: np.ndarray, segs: list[Segment], into_store: bool,
                  faulter: Callable[[list[Segment]], None] | None = None) -> None:
    """Copy ``segs`` between the store's bytes ``flat`` and ``buf``; with ``faulter``, fault
    each stretch of the store in just before copying into it."""
    if into_store:
        for so, bo, ln in segs:
            if faulter is None:
                flat[so:so + ln] = buf[bo:bo + ln]
                continue
            for k in range(0, ln, FAULT_AHEAD):
                m = min(FAULT_AHEAD, ln - k)
                faulter([(so + k, bo + k, m)])
                flat[so + k:so + k + m] = buf[bo + k:bo + k + m]
    else:
        for so, bo, ln in segs:
            buf[bo:bo + ln] = flat[so:so + ln]


def split(segs: list[Segment], total: int, parts: int) -> list[list[Segment]]:
    """Cut copy segments into ``parts`` lists of about equal bytes, cutting only at OS-page bounds."""
    pages = total // OS_PAGE_SIZE
    bounds = [(pages * k // parts) * OS_PAGE_SIZE for k in range(1, parts)] + [total]
    out: list[list[Segment]] = [[] for _ in bounds]
    part, pos = 0, 0
    for so, bo, ln in segs:
        while ln:
            while pos >= bounds[part]:
                part += 1
            take = min(ln, bounds[part] - pos)
            out[part].append((so, bo, take))
            so, bo, ln, pos = so + take, bo + take, ln - take, pos + take
    return [p for p in out if p]

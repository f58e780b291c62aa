"""How many times to repeat a measurement, and what its spread says.

:class:`Repeats` decides when a series of timings is long enough: at least ``min_n``
repeats, then more until the median is stable (adding the last third of the repeats
moved it by at most ``tol``), the time budget is spent, or ``max_n`` is reached.
:func:`spread` gives min / median / max (and the interquartile range from 5 repeats on)
and flags a series whose spread is wide.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Repeats", "as_repeats", "stable", "spread", "WIDE_IQR", "WIDE_RANGE", "STABLE_TOL"]

STABLE_TOL = 0.03
"""A median is stable when adding the last third of the repeats moved it by at most 3%."""
WIDE_IQR = 0.25
"""A series is flagged wide when its IQR exceeds 25% of its median (n >= 5) ..."""
WIDE_RANGE = 1.0
"""... or, with fewer repeats, when max - min exceeds the median."""
IQR_MIN_N = 5


def stable(times: Sequence[float], tol: float = STABLE_TOL) -> bool:
    """True when the median of ``times`` is within ``tol`` of the median of its first two
    thirds (at least 3 values): more repeats are unlikely to move it."""
    n = len(times)
    if n < 3:
        return False
    head = max(2, 2 * n // 3)
    m_all, m_head = statistics.median(times), statistics.median(times[:head])
    return abs(m_all - m_head) <= tol * m_all


@dataclass(frozen=True)
class Repeats:
    """When to stop repeating.  ``Repeats(5)`` runs exactly 5; ``Repeats(5, 20, 2.0)`` runs
    5, then up to 20 while the median is not stable and less than 2 s have passed."""

    min_n: int
    max_n: int | None = None
    budget_s: float = 0.0
    tol: float = STABLE_TOL

    def __post_init__(self) -> None:
        if self.min_n < 1:
            raise ValueError(f"min_n={self.min_n} must be >= 1")
        if self.max_n is not None and self.max_n < self.min_n:
            raise ValueError(f"max_n={self.max_n} must be >= min_n={self.min_n}")

    @property
    def limit(self) -> int:
        return self.min_n if self.max_n is None else self.max_n

    def cycles(self, *series: list[float]) -> Iterator[int]:
        """Yield the repeat index while another repeat is wanted; the caller appends one
        time to every list in ``series`` per cycle.  Stops at ``min_n`` once every series
        is stable, or at the budget, or at ``max_n``."""
        t0 = time.perf_counter()
        while True:
            n = min(len(s) for s in series) if series else 0
            if n >= self.min_n and (n >= self.limit or time.perf_counter() - t0 >= self.budget_s
                                    or all(stable(s, self.tol) for s in series)):
                return
            yield n

    def stop_reason(self, times: Sequence[float]) -> str:
        """Why a finished series stopped: ``fixed``, ``stable``, ``max`` or ``budget``."""
        if self.limit == self.min_n:
            return "fixed"
        if len(times) >= self.limit:
            return "max"
        return "stable" if stable(times, self.tol) else "budget"

    def run(self, once: Callable[[], Any]) -> list[float]:
        """Times of ``once()`` (perf_counter around the call) until this policy stops."""
        times: list[float] = []
        for _ in self.cycles(times):
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
        return times

    def scaled(self, factor: int) -> Repeats:
        """The same policy with ``factor`` times the counts (small sizes)."""
        return Repeats(self.min_n * factor, None if self.max_n is None else self.max_n * factor,
                       self.budget_s, self.tol)

    def capped(self, n: int) -> Repeats:
        """At most ``n`` repeats (slow scenarios)."""
        lo = min(self.min_n, n)
        return Repeats(lo, None if self.max_n is None else max(lo, min(self.max_n, n)),
                       self.budget_s, self.tol)


def as_repeats(r: int | Repeats) -> Repeats:
    """An int means exactly that many repeats."""
    return r if isinstance(r, Repeats) else Repeats(int(r))


def spread(times: Sequence[float]) -> dict[str, Any]:
    """min / p50 / max in microseconds, the IQR and its quartiles (None below 5 repeats),
    and ``spread``:
    ``"wide"`` when the IQR (or, below 5 repeats, max - min) is large against the median,
    else ``"ok"``."""
    t = np.asarray(times, dtype=float) * 1e6
    med = float(np.median(t))
    iqr = q1 = q3 = None
    if t.size >= IQR_MIN_N:
        q1, q3 = (float(q) for q in np.percentile(t, [25, 75]))
        iqr = q3 - q1
        wide = iqr > WIDE_IQR * med
    else:
        wide = float(t.max() - t.min()) > WIDE_RANGE * med
    return {"min_us": float(t.min()), "p50_us": med, "max_us": float(t.max()), "iqr_us": iqr,
            "q1_us": q1, "q3_us": q3, "spread": "wide" if wide else "ok"}

"""Deferring Ctrl-C across the few steps that cannot be ordered to be interruptible.

Most state changes in the pipeline are ordered so that stopping between any two steps
leaves a consistent, retryable state (the page table changes before the store; a slot
has one owner at every instant).  A handful of steps cannot be split so: a copy enqueued
on a stream and the event that says when it ends, or a work item handed to a thread pool
and the future that settles it.  :class:`deferred_interrupt` runs such a step with SIGINT
noted instead of raised, and raises :class:`KeyboardInterrupt` at its end.  Each use
covers microseconds of work and never a wait, so Ctrl-C stays responsive.
"""

from __future__ import annotations

import _signal  # the C module: cheaper than signal's wrappers on this hot path
import signal
import threading
from typing import Any

__all__ = ["deferred_interrupt", "deferring", "uninterrupted"]

_SIGINT = int(signal.SIGINT)

_depth = threading.local()   # deferred_interrupt blocks a thread other than the main one is in


def deferring() -> bool:
    """True while this thread is inside a :class:`deferred_interrupt` block: a SIGINT would
    be held to the block's end here (fault injection uses it to raise only where a real
    Ctrl-C could land).  On the main thread the installed SIGINT handler says it (a count
    there could be left wrong by a signal landing inside ``__enter__``); elsewhere, where
    no signal lands, a per-thread count."""
    if threading.get_ident() == threading.main_thread().ident:
        return isinstance(getattr(_signal.getsignal(_SIGINT), "__self__", None),
                          deferred_interrupt)
    return getattr(_depth, "n", 0) > 0


class deferred_interrupt:  # noqa: N801 - used like a function: ``with deferred_interrupt():``
    """Hold off ``SIGINT`` for a few lines that must not be cut in two (bookkeeping, or an
    open file not yet in its ``with``): a signal that arrives meanwhile is handed to the
    handler that was installed (Python's default raises ``KeyboardInterrupt``) when the
    block ends.  Only on the main thread (signals interrupt no other) and only for a
    Python-level handler.  Costs about a microsecond (the C-level signal calls)."""

    __slots__ = ("_old", "_caught")

    def __enter__(self) -> None:
        self._old = None
        if threading.get_ident() != threading.main_thread().ident:
            _depth.n = getattr(_depth, "n", 0) + 1
            return
        old = _signal.getsignal(_SIGINT)
        if callable(old):
            self._old = old
            self._caught = False
            _signal.signal(_SIGINT, self._record)

    def _record(self, signum: int, frame: object) -> None:
        self._caught = True

    def __exit__(self, *exc: object) -> None:
        if threading.get_ident() != threading.main_thread().ident:
            _depth.n -= 1
            return
        old = self._old
        if old is not None:
            self._old = None
            _signal.signal(_SIGINT, old)
            if self._caught:
                old(_SIGINT, None)


def uninterrupted(fn: Any, *args: Any) -> tuple[Any, bool]:
    """Call ``fn(*args)`` (a bounded wait, e.g. for a copy in flight) until it returns
    without a ``KeyboardInterrupt``.  Returns ``(result, interrupted)``: the caller
    re-raises the interrupt once its state is settled.  ``fn`` must not raise
    ``KeyboardInterrupt`` of its own accord (a future that holds one, say): only a signal
    may interrupt it, or it is retried for ever."""
    interrupted = False
    while True:
        try:
            return fn(*args), interrupted
        except KeyboardInterrupt:
            interrupted = True

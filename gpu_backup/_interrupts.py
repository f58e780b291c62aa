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
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from . import _faults

__all__ = ["deferred_interrupt", "deferring", "take_lock", "uninterrupted"]

_SIGINT = int(signal.SIGINT)

_depth = threading.local()   # deferred_interrupt blocks a thread other than the main one is in


def deferring() -> bool:
    """True while this thread is inside a :class:`deferred_interrupt` block, outside its
    :meth:`~deferred_interrupt.checkpoint`: a SIGINT would be held to the block's end here
    (fault injection uses it to raise only where a real Ctrl-C could land).  On the main
    thread the installed SIGINT handler says it (a count there could be left wrong by a
    signal landing inside ``__enter__``); elsewhere, where no signal lands, a per-thread
    count."""
    if threading.get_ident() == threading.main_thread().ident:
        owner = getattr(_signal.getsignal(_SIGINT), "__self__", None)
        return isinstance(owner, deferred_interrupt) and not (
            owner._safe or (owner._passing and owner._delivers()))
    return getattr(_depth, "n", 0) > 0


class deferred_interrupt:  # noqa: N801 - used like a function: ``with deferred_interrupt():``
    """Hold off ``SIGINT`` for a few lines that must not be cut in two (bookkeeping, or an
    open file not yet in its ``with``): a signal that arrives meanwhile is handed to the
    handler that was installed (Python's default raises ``KeyboardInterrupt``) when the
    block ends.  Only on the main thread (signals interrupt no other) and only for a
    Python-level handler.  Costs about a microsecond (the C-level signal calls).

    A longer section (the copy pipeline's driver) runs wholly deferred and names its own
    safe points with :meth:`checkpoint`: a Ctrl-C lands there, and only there, so
    ownership handed over by a return value or a ``with`` statement is never cut in two.
    Its waits are bounded slices with a checkpoint between them (a deferred signal does
    not wake a blocked wait), so Ctrl-C is answered within a slice."""

    __slots__ = ("_old", "_caught", "_safe", "_passing")

    def __enter__(self) -> deferred_interrupt:
        self._old = None
        self._safe = self._passing = False
        if threading.get_ident() != threading.main_thread().ident:
            _depth.n = getattr(_depth, "n", 0) + 1
            return self
        old = _signal.getsignal(_SIGINT)
        if callable(old):
            self._old = old
            self._caught = False
            _signal.signal(_SIGINT, self._record)
        return self

    def _record(self, signum: int, frame: object) -> None:
        if self._passing:
            self._old(signum, frame)    # a region where a Ctrl-C may land: pass it on
        else:
            self._caught = True

    def _delivers(self) -> bool:
        """A Ctrl-C handed on from here reaches the real handler (no outer block holds it)."""
        if threading.get_ident() != threading.main_thread().ident:
            return getattr(_depth, "n", 0) == 1
        owner = getattr(self._old, "__self__", None)
        return not isinstance(owner, deferred_interrupt) or owner._passing

    @contextlib.contextmanager
    def passing(self) -> Iterator[None]:
        """A region of the block where a Ctrl-C may land anywhere (a call whose caller
        handles its interruption; typically one that defers its own steps, whose
        checkpoints then reach the real handler)."""
        self.checkpoint()
        main = threading.get_ident() == threading.main_thread().ident
        if main:
            self._passing = True
        else:
            _depth.n -= 1
        try:
            yield
        finally:
            if main:
                self._passing = False
            else:
                _depth.n += 1

    def checkpoint(self, name: str | None = None) -> None:
        """A safe point inside the block: a Ctrl-C held off so far is handed to the
        installed handler here (which raises ``KeyboardInterrupt`` from this call).  Inside
        another deferred block the signal passes on to that one, which holds it in turn.
        ``name``: a fault point that fault injection treats as interruptible."""
        main = threading.get_ident() == threading.main_thread().ident
        if name is not None:
            if (self._old is None and main) or self._delivers():
                self._enter_safe(main)
                try:
                    _faults.point(name)
                finally:
                    self._leave_safe(main)
            else:
                _faults.point(name)
        old = self._old
        if old is not None and self._caught:
            self._caught = False
            old(_SIGINT, None)

    def _enter_safe(self, main: bool) -> None:
        if main:
            self._safe = True
        else:
            _depth.n -= 1

    def _leave_safe(self, main: bool) -> None:
        if main:
            self._safe = False
        else:
            _depth.n += 1

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


def take_lock(lock: Any, taken: list[Any]) -> bool:
    """Try to take ``lock`` without waiting.  When taken it goes on ``taken`` in the same
    step, so a Ctrl-C cannot fall between taking it and the caller knowing.  The caller
    releases it in a ``finally`` around this call, written out there with no call before
    the release (``if taken: taken[0].release()``): a function entered first would be one
    more place for a Ctrl-C to land, keeping the lock for good."""
    got = False
    with deferred_interrupt():
        if lock.acquire(blocking=False):
            taken.append(lock)
            got = True
    return got

"""Deferring Ctrl-C across the few steps that cannot be ordered to be interruptible.

Most state changes in the pipeline are ordered so that stopping between any two steps
leaves a consistent, retryable state (the page table changes before the store; a slot
has one owner at every instant).  A handful of steps cannot be split so: a copy enqueued
on a stream and the event that says when it ends, or a work item handed to a thread pool
and the future that settles it.  :func:`deferred_interrupts` runs such a step with SIGINT
noted instead of raised, and raises :class:`KeyboardInterrupt` at its end.  Each use
covers microseconds of work and never a wait, so Ctrl-C stays responsive.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["deferred_interrupts", "uninterrupted"]

_local = threading.local()


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Run the block with SIGINT deferred to its end (main thread, default handler only:
    other threads never receive ``KeyboardInterrupt`` from a signal, and an application's
    own SIGINT handler is left alone).  Nested uses defer to the outermost one."""
    depth = getattr(_local, "depth", 0)
    if depth or threading.current_thread() is not threading.main_thread():
        _local.depth = depth + 1
        try:
            yield
        finally:
            _local.depth = depth
        return
    old = signal.getsignal(signal.SIGINT)
    if old is not signal.default_int_handler:
        yield
        return
    caught: list[int] = []

    def note(signum: int, frame: Any) -> None:
        caught.append(signum)

    signal.signal(signal.SIGINT, note)
    _local.depth = 1
    try:
        yield
    finally:
        _local.depth = 0
        signal.signal(signal.SIGINT, old)
        if caught:
            raise KeyboardInterrupt


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

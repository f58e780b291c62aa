"""The store's background maintainer: one daemon thread per store that keeps its free-page
pool in shape, the host-side counterpart of TTM's pool shrinker.

The thread runs the store's background prefault (if one was asked for), then one reclaim
pass every ``interval`` seconds: pool pages go back to the OS when available host memory
is below the store's watermark, and pages idle for longer than the decay period go back
in any case.  The decision is the store's (``MappedStore.reclaim``), made with the store's
injectable clock and host-memory reader, so tests run passes themselves and never wait.

Ownership: the store's resource holder owns the maintainer and stops and joins it once
(``close()`` or the finalizer).  The thread holds only a weak reference to the store
between passes, so it never keeps a store alive, and it is a daemon, so it never holds
up interpreter exit.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from .._fork import ForkGuard
from ..errors import ClosedError, ForkedError

__all__ = ["Maintainer"]

log = logging.getLogger("gpu_backup.store")


class Maintainer:
    """The thread.  ``wake()`` asks for a pass now; ``stop()`` ends and joins it."""

    def __init__(self, store: Any, interval: float, name: str) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._guard = ForkGuard()
        self._thread = threading.Thread(
            target=_loop, args=(weakref.ref(store), self._stop, self._wake, interval),
            name=name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop the thread and wait for it (unless called from it, or in a forked child,
        where it does not run)."""
        self._stop.set()
        self._wake.set()
        if self._guard.inherited or self._thread is threading.current_thread():
            return
        self._thread.join()


def _loop(ref: weakref.ref, stop: threading.Event, wake: threading.Event,
          interval: float) -> None:
    wake.wait(interval)                # the first pass after one interval, like the rest
    wake.clear()
    while not stop.is_set():
        store = ref()
        if store is None:
            return
        try:
            more = store._maintain()
        except (ClosedError, ForkedError):
            return
        except Exception as e:  # noqa: BLE001 - a failed pass must not end the thread
            log.warning("store maintenance pass failed: %s: %s", type(e).__name__, str(e))
            more = False
        del store                      # hold no reference while waiting
        if not more:
            wake.wait(interval)
            wake.clear()

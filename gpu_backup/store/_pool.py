"""The store's free-page pool policy and its background maintainer: one daemon thread per
store that keeps the pool in shape, the host-side counterpart of TTM's pool shrinker.

:class:`PoolMixin` holds the pool's operations for :class:`~._base.MappedStore`
(``prefault``, ``trim``, ``reclaim``, and releasing slots to the OS); the slot table,
lock and counters it works on are the store's.

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

from .. import _faults
from .._fork import ForkGuard
from .._interrupts import deferred_interrupt
from .._os import MADV_REMOVE, advice_supported
from ..errors import ClosedError, ForkedError
from ._checks import check_count

__all__ = ["Maintainer", "PoolMixin", "COLD", "WARM", "USED", "BUSY", "UNFAULTED"]

log = logging.getLogger("gpu_backup.store")

# Slot states (the store's ``_state`` table); see ``_base`` for the life cycle.
COLD, WARM, USED, BUSY, UNFAULTED = 0, 1, 2, 3, 4

# The background prefault faults this much per step, so backups interleave with it.
_PREFAULT_STEP = 64 << 20


class PoolMixin:
    """The pool's operations; mixed into :class:`~._base.MappedStore`."""

    # Provided by the store.
    _holder: Any
    _lock: threading.Lock
    _freed: threading.Condition
    page_size: int

    def prefault(self, nbytes: int) -> int:
        """Fault in free slots ahead of need, until ``nbytes`` of pool slots are ready (or
        the capacity or backing memory runs out).  Returns the bytes newly faulted in.
        The pool's cap is raised to ``nbytes`` until ``trim()``; idle decay still applies."""
        want = -(-check_count("nbytes", nbytes) // self.page_size)
        with self._op():
            self._prefault_target = max(self._prefault_target, want)
            return self._prefault_pages(want, top_up=True) * self.page_size

    def trim(self) -> int:
        """Return every pool slot to the OS now.  Returns the bytes released."""
        with self._op():
            with deferred_interrupt(), self._lock:
                self._prefault_target = 0
                runs = self._take_warm(self._warm.total)
                self._pending += sum(n for _, n in runs)
            return self._give_back(runs) * self.page_size

    def reclaim(self, now: float | None = None) -> int:
        """One pass of the pool policy (the maintainer runs one every few seconds); returns
        the bytes given back to the OS.

        * Under memory pressure (available host memory below ``watermark``) the pool
          shrinks to ``warm_floor``.
        * Pages the pool held through a whole decay period without any of them being
          needed (the pool's low point over the period) go back, down to the floor: a
          page unused for ``warm_decay`` seconds is released within two periods.
        * A pool above its cap (pages whose release failed earlier) is cut to the cap.

        ``now`` is the time by the store's clock (default: the clock now).
        """
        now = self._clock() if now is None else float(now)
        with self._op():
            pressure = self._under_pressure()
            with deferred_interrupt(), self._lock:
                self._counts["reclaim_passes"] += 1
                if not self._release:
                    return 0
                pool, floor = self._warm.total, self.warm_floor // self.page_size
                target = min(pool, self._pool_limit())
                if pressure:
                    target = min(target, floor)
                decayed = 0
                window_over = now - self._window_start >= self.warm_decay
                if window_over:
                    idle = min(self._window_min, pool)
                    decayed = max(0, min(idle, pool - floor, target - floor))
                    target -= decayed
                    self._window_start = now
                runs = self._take_warm(pool - target)
                n = sum(k for _, k in runs)
                self._counts["pages_decayed"] += decayed
                self._counts["pages_reclaimed"] += n - decayed
                self._pending += n
                self._window_min = (self._warm.total if window_over
                                    else min(self._window_min, self._warm.total))
            return self._give_back(runs) * self.page_size

    def _pool_limit(self) -> int:
        return max(self.warm_slack // self.page_size, self._prefault_target)

    def _take_warm(self, n: int) -> list[tuple[int, int]]:
        # Caller holds the lock.
        if n <= 0:
            return []
        runs = self._warm.take(n)
        for s, k in runs:
            self._state[s:s + k] = BUSY
        return runs

    def _give_back(self, runs: list[tuple[int, int]]) -> int:
        """Punch BUSY runs (counted in ``_pending``) out of the file outside the lock, then
        mark them COLD; returns the pages released.  A run that could not be punched
        (an error, or an interrupt before its turn) goes to the pool instead, still
        faulted in, and a later pass releases it."""
        if not runs:
            return 0
        ps = self.page_size
        mapping = self._holder.mapping
        done = 0
        try:
            while done < len(runs) and self._release:
                s, n = runs[done]
                _faults.point("store.release")
                mapping.madvise(MADV_REMOVE, s * ps, n * ps)  # type: ignore[union-attr]
                done += 1
        except OSError as e:
            if advice_supported(e):
                log.warning("giving %s B of %s back to the OS failed (%s); the pages stay in "
                            "the pool and a later pass releases them",
                            f"{sum(n for _, n in runs[done:]) * ps:,}", self._backing_name(),
                            e.strerror or str(e))
                self._counts["release_failures"] += 1
            else:
                self._release = False
                log.info("%s cannot punch holes (%s): dropped pages stay allocated and are "
                         "reused", self._backing_name(), e.strerror)
        finally:
            with deferred_interrupt(), self._lock:
                for s, n in runs[:done]:
                    self._state[s:s + n] = COLD
                    self._cold.add(s, n)
                for s, n in runs[done:]:
                    self._state[s:s + n] = WARM
                    self._warm.add(s, n)
                released = sum(n for _, n in runs[:done])
                self._counts["pages_released"] += released
                self._pending -= sum(n for _, n in runs)
                self._freed.notify_all()
        return released

    def _prefault_pages(self, want: int, *, top_up: bool) -> int:
        """Fault in up to ``want`` cold slots into the pool (``top_up``: only what the pool
        lacks of ``want``).  Returns the pages faulted in."""
        ps = self.page_size
        runs: list[tuple[int, int]] = []
        with deferred_interrupt(), self._lock:
            lack = want - self._warm.total if top_up else want
            n = max(0, min(lack, self._cold.total, self._backing_avail() // ps))
            runs = self._cold.take(n)
            for s, k in runs:
                self._state[s:s + k] = BUSY
            self._pending += n
        ok = False
        try:
            _faults.point("store.prefault.reserved")
            self._fault_in(runs)
            ok = True
        finally:
            if not ok:
                self._give_back(runs)
        with deferred_interrupt(), self._lock:
            for s, k in runs:
                self._state[s:s + k] = WARM
                self._warm.add(s, k)
            self._pending -= n
            self._counts["pages_prefaulted"] += n
            self._freed.notify_all()
            if n:
                self._start_maintainer()
        return n

    def _maintain(self) -> bool:
        """One step of the maintainer: a step of the background prefault if one is due
        (True: more to do), else a reclaim pass."""
        if self._prefault_left > 0:
            with self._op():
                step = min(self._prefault_left, max(1, _PREFAULT_STEP // self.page_size))
                got = self._prefault_pages(step, top_up=False)
            self._prefault_left = self._prefault_left - step if got == step else 0
            return self._prefault_left > 0
        self.reclaim()
        return False

    def _start_maintainer(self) -> None:
        # Caller holds the lock.
        if (self.background and self._holder.maintainer is None and not self._closed
                and not self._guard.inherited):
            self._holder.maintainer = Maintainer(
                self, min(1.0, self.warm_decay / 4), f"gpu_backup-{self.kind}-pool")


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

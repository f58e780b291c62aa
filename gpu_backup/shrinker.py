"""Reclaim: the shrinker contract and the manager's LRU buffer shrinker (the CuPy allocator
hook lives in :mod:`gpu_backup.device.cupy_hook` and is re-exported here).

The contract is the kernel's (``include/linux/shrinker.h``), in bytes:

``count() -> int``
    A cheap estimate of the bytes the shrinker could free now, or ``SHRINK_EMPTY``.
``scan(nr_to_scan) -> int``
    Try to free about ``nr_to_scan`` bytes; return the bytes actually freed, or
    ``SHRINK_STOP`` when no progress is possible now (the rest of this reclaim
    pass skips it).  A scan must not block on locks other threads hold.

An optional ``seeks`` attribute (default 2) says how costly the freed objects are to
recreate; reclaim first asks each shrinker for a share proportional to ``count / seeks``,
then asks again, in order, for whatever is still missing, for as long as that frees
something.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from . import _faults
from .device.cupy_hook import CupyAllocatorHook  # re-exported: the hook has its own module

if TYPE_CHECKING:
    from .buffer import Buffer
    from .manager import BufferManager

__all__ = ["SHRINK_EMPTY", "SHRINK_STOP", "LruShrinker", "Reclaimer", "Shrinker", "CupyAllocatorHook"]

log = logging.getLogger("gpu_backup")

SHRINK_STOP = -1
"""``scan`` result: no progress is possible now."""
SHRINK_EMPTY = -2
"""``count`` result: nothing to reclaim."""

DEFAULT_SEEKS = 2

_PASSES = ("cheap", "idle", "wait")
# Reclaim asks in rounds (the first shares the deficit by count/seeks, later ones ask for
# all that is missing) while a round still frees something, as the kernel's batch loop.
_MAX_ROUNDS = 64
# Reclaims of one allocation that may find a shrinker lying or broken before the rest of
# that allocation skips it.
_STRIKES = 2


@runtime_checkable
class Shrinker(Protocol):
    def count(self) -> int: ...
    def scan(self, nr_to_scan: int) -> int: ...


class Reclaimer:
    """The registry of shrinkers and the reclaim loop.  Never recurses into itself on a
    thread that is already reclaiming (a shrinker that allocates gets nothing back)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shrinkers: list[Shrinker] = []
        self._local = threading.local()
        self.stats: dict[str, Any] = {"reclaim_calls": 0, "reclaim_bytes_asked": 0,
                                      "reclaim_bytes_freed": 0, "reclaim_seconds": 0.0,
                                      "reclaim_recursions_refused": 0,
                                      "reclaim_shrinkers_skipped": 0, "reclaim_false_claims": 0}

    def register(self, shrinker: Shrinker) -> None:
        if not isinstance(shrinker, Shrinker):
            raise TypeError(f"{shrinker!r} has no count() and scan(nr_to_scan) methods")
        with self._lock:
            if any(s is shrinker for s in self._shrinkers):
                raise ValueError(f"{shrinker!r} is already registered")
            self._shrinkers.append(shrinker)

    def unregister(self, shrinker: Shrinker) -> None:
        with self._lock:
            for i, s in enumerate(self._shrinkers):
                if s is shrinker:
                    del self._shrinkers[i]
                    return
        raise ValueError(f"{shrinker!r} is not registered")

    @property
    def shrinkers(self) -> list[Shrinker]:
        with self._lock:
            return list(self._shrinkers)

    @property
    def active(self) -> bool:
        """True on a thread that is inside a reclaim right now."""
        return getattr(self._local, "depth", 0) > 0

    def reclaim(self, nbytes: int, shrinkers: list[Shrinker] | None = None, *,
                progress: Callable[[], int] | None = None,
                misbehaved: dict[int, int] | None = None) -> int:
        """Ask shrinkers to free ``nbytes``; returns the bytes freed (0 when called from
        inside a reclaim on the same thread).

        ``progress``: a counter of bytes actually released (the manager's accounting).
        With it, each scan's result is what the counter shows, not what the shrinker
        claims, and a shrinker that claims bytes the counter does not show is skipped
        for the rest of this reclaim.  A shrinker that raises or returns something other
        than an int >= 0 or ``SHRINK_STOP`` is skipped too, with a warning naming it.

        ``misbehaved``: strikes per shrinker id, counted here for each one found lying or
        broken; one with ``_STRIKES`` is skipped.  An allocation that reclaims again and
        again while it waits for memory passes the same dict, so that a bad shrinker is
        asked a bounded number of times (not once: a single misjudged scan, say memory
        that another thread took at once, must not exclude a good one for good)."""
        if nbytes <= 0:
            return 0
        if self.active:
            with self._lock:
                self.stats["reclaim_recursions_refused"] += 1
            return 0
        t0 = time.perf_counter()
        freed = 0
        try:
            # Set inside the try: an interrupt right after it must not leave this thread
            # marked as reclaiming (every later reclaim here would be refused).
            self._local.depth = 1
            pool = self.shrinkers if shrinkers is None else shrinkers
            strikes: dict[int, int] = {} if misbehaved is None else misbehaved
            stopped: set[int] = {k for k, n in strikes.items() if n >= _STRIKES}

            def bad(s: Shrinker) -> None:
                stopped.add(id(s))
                strikes[id(s)] = strikes.get(id(s), 0) + 1

            for rnd in range(_MAX_ROUNDS):
                before = freed
                counts = []
                for s in pool:
                    if id(s) in stopped:
                        continue
                    c = self._call(s, "count()", s.count)
                    if c is None or (c < 0 and c != SHRINK_EMPTY):
                        if c is not None:
                            self._skip(s, f"count() returned {c}: expected bytes >= 0 or "
                                          f"SHRINK_EMPTY")
                        bad(s)
                        continue
                    if c > 0:
                        counts.append((s, c / max(getattr(s, "seeks", DEFAULT_SEEKS), 1e-9), c))
                total_weight = sum(w for _, w, _ in counts)
                deficit = nbytes - freed  # shared out by weight in the first round
                for s, w, c in counts:
                    want = nbytes - freed
                    if want <= 0:
                        break
                    ask = min(c, want, math.ceil(deficit * w / total_weight)) if rnd == 0 else want
                    ask = max(1, ask)
                    mark = progress() if progress is not None else 0
                    got = self._call(s, f"scan({ask})", s.scan, ask)
                    _faults.point("reclaim.scanned")
                    if got is None or got == SHRINK_STOP:
                        if got is None:
                            bad(s)
                        stopped.add(id(s))
                        continue
                    if got < 0:
                        self._skip(s, f"scan({ask}) returned {got}: expected bytes freed >= 0 "
                                      f"or SHRINK_STOP")
                        bad(s)
                        continue
                    if progress is not None:
                        actual = progress() - mark
                        if got > 0 and actual <= 0:
                            self._skip(s, f"scan({ask}) claimed {got:,} B freed, but no device "
                                          f"memory was released", liar=True)
                            bad(s)
                            continue
                        got = max(actual, 0)
                    freed += got
                if freed >= nbytes or freed == before:
                    break  # done, or a whole round made no progress
        finally:
            self._local.depth = 0
            with self._lock:
                self.stats["reclaim_calls"] += 1
                self.stats["reclaim_bytes_asked"] += nbytes
                self.stats["reclaim_bytes_freed"] += freed
                self.stats["reclaim_seconds"] += time.perf_counter() - t0
        return freed

    def _call(self, s: Shrinker, what: str, fn: Callable[..., Any], *args: Any) -> int | None:
        """``fn(*args)`` as an int; None (said, and the shrinker skipped) when it raises or
        returns something else.  ``SHRINK_STOP``/``SHRINK_EMPTY`` pass through."""
        try:
            value = fn(*args)
        except Exception as e:  # noqa: BLE001 - one bad shrinker must not fail reclaim
            self._skip(s, f"{what} raised {type(e).__name__}: {e}")
            return None
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            self._skip(s, f"{what} returned {value!r} ({type(value).__name__}): expected an "
                          f"int number of bytes")
            return None
        return int(value)

    def _skip(self, s: Shrinker, why: str, *, liar: bool = False) -> None:
        # The message is formatted here: a log record keeps its arguments, and must not
        # keep an exception (its traceback holds frames, buffers, device memory) alive.
        log.warning(f"shrinker {_name(s)}: {why}; skipped for the rest of this reclaim")
        with self._lock:
            self.stats["reclaim_shrinkers_skipped"] += 1
            if liar:
                self.stats["reclaim_false_claims"] += 1


def _name(s: object) -> str:
    try:
        return repr(s)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real problem
        return f"<{type(s).__name__} object>"


class LruShrinker:
    """The manager's own shrinker: evicts idle buffers, escalating only as far as needed.

    Passes, each in LRU order (least recently used first):

    1. ``cheap``: purgeable buffers (discarded) and clean ones whose store copy is still
       valid: no copy at all.
    2. ``idle``: buffers whose last recorded use has completed.
    3. ``wait``: buffers whose last use is still pending (eviction waits for it on the
       copy stream).

    Buffers inside ``access()`` are never touched; a buffer whose lock another thread
    holds is skipped (try-lock); one that fails to evict goes to the LRU tail.  A copy
    the host store cannot take (``bytes_avail()``) is skipped, never overcommitted.
    """

    seeks = DEFAULT_SEEKS

    def __init__(self, mgr: BufferManager) -> None:
        self._mgr = weakref.ref(mgr)
        self.stats = {f"{p}_{k}": 0 for p in _PASSES for k in ("scanned", "freed")}
        self.stats["skipped_host_full"] = 0

    def __repr__(self) -> str:
        return "<LruShrinker>"

    def count(self) -> int:
        mgr = self._mgr()
        if mgr is None or mgr.closed or mgr._fork.inherited:
            return SHRINK_EMPTY
        n = sum(b.device_bytes for b in mgr.buffers() if not b.pinned)
        return n if n > 0 else SHRINK_EMPTY

    def scan(self, nr_to_scan: int) -> int:
        mgr = self._mgr()
        if mgr is None or mgr.closed or mgr._fork.inherited:
            return SHRINK_STOP
        order = [b for b in mgr.buffers() if b.device_bytes]
        freed = 0
        for pas in _PASSES:
            for buf in order:
                if freed >= nr_to_scan:
                    break
                if not self._eligible(buf, pas):
                    continue
                self.stats[f"{pas}_scanned"] += buf.device_bytes
                if not buf.purgeable and not _is_clean(buf):
                    copy = buf.device_bytes  # upper bound of what the copy needs
                    if mgr.store.bytes_avail() < copy:
                        self.stats["skipped_host_full"] += 1
                        continue
                try:
                    got = mgr._evict(buf, blocking=False, wait=pas == "wait")
                except Exception as e:  # noqa: BLE001 - skip it; it goes to the LRU tail
                    # Formatted now: the record must not keep the exception (nor, through
                    # its traceback, the buffer) alive.
                    log.warning(f"reclaim: evicting buffer #{buf.id} failed: "
                                f"{type(e).__name__}: {e}")
                    mgr._touch(buf)
                    continue
                self.stats[f"{pas}_freed"] += got
                freed += got
                if got:
                    mgr._notify_released()   # allocations waiting on other threads
            if freed >= nr_to_scan:
                break
        return freed if freed else SHRINK_STOP

    @staticmethod
    def _eligible(buf: Buffer, pas: str) -> bool:
        if buf.pinned or buf.freed or buf.device_bytes == 0:
            return False
        pending = buf._pages.uses.busy
        if pas == "cheap":
            return not pending and (buf.purgeable or _is_clean(buf))
        if pas == "idle":
            return not pending
        return pending


def _is_clean(buf: Buffer) -> bool:
    """Every page has a valid store copy (or is zero): eviction needs no copy."""
    t = buf._pages.table
    return bool(t.size) and bool((t != 0).all())

"""The page-store core shared by :class:`ShmemStore` and :class:`FileStore`.

A store is one file (a memfd or a file on disk) mapped shared, cut into
``page_size`` slots.  ``backup`` hands out one handle per page (slot index + 1,
so handles are always > 0 and 0 can mean "on the device" in a page table).

Slot life cycle (``_state``)::

    COLD       free, not backed by memory (a hole in the file)
    WARM       free, already faulted in: the pool, reused first (see ``reclaim``)
    USED       holds a live handle
    UNFAULTED  holds a live handle reserved with ``alloc(populate=False)``, not yet
               faulted in; ``write`` faults it in (in parallel, ahead of its copy)
    BUSY       in transition: being prefaulted or released outside the lock; counted
               in ``_pending`` until it is WARM or COLD again

The pool of WARM slots works like the kernel's ``ttm_pool``: dropped pages stay faulted
in for the next backup, up to ``warm_slack`` bytes, and go back to the OS only when the
host needs the memory (available memory below ``watermark``), when they sat unused for
a whole decay period, or on ``trim()``.  A background :class:`~._pool.Maintainer` makes
those decisions off the hot path; ``drop`` releases pages itself only beyond the cap or
under pressure.

All bookkeeping is numpy over the slot table or per extent; copies are per run of
consecutive slots (or one vectorised gather/scatter when the handles are scattered),
never a Python loop per page.  Copies run outside the lock; ``close`` waits for copies
in flight before it unmaps.  Every state change that spans steps is ordered so that an
exception (or ``KeyboardInterrupt``) at any step leaves each slot owned by exactly one
party; ``gpu_backup._faults.point("store.<step>")`` marks the steps for tests.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _faults
from .._fork import ForkGuard
from .._interrupts import deferred_interrupt
from .._os import MADV_PAGEOUT, Mapping, advice_supported
from .._os import OS_PAGE_SIZE as PAGE_SIZE
from .._runs import expand_runs, runs_of
from ..errors import ClosedError, InvalidHandleError, StoreFullError
from ._checks import (StoreSetupError, as_bytes, as_handles, check_count, check_page_size,
                      check_seconds, reject_duplicates)
from ._copy import copy_segments, fault_segments, split
from ._extents import ExtentSet
from ._pool import BUSY, COLD, UNFAULTED, USED, WARM, Maintainer, PoolMixin
from ._workers import Batch, Workers

__all__ = ["PAGE_SIZE", "MappedStore", "as_bytes", "as_handles", "backup_pages", "check_page_size"]

log = logging.getLogger("gpu_backup.store")

# Below this many bytes a copy stays on the calling thread.
_PARALLEL_MIN = 32 << 20
# When the average run is shorter than this many pages, one vectorised gather/scatter
# beats a Python-level slice copy per run.
_SCATTER_RUN_PAGES = 8
DEFAULT_DECAY = 10.0
"""Seconds a pool page may sit unused before the maintainer gives it back."""

_split = split  # the name the tests know


class _Holder:
    """Everything needed to free the store's OS resources; released exactly once.

    In a forked child only the child's own references go (the mapping and the fd): the
    file's pages are shared with the parent and are never punched or truncated here.
    """

    __slots__ = ("fd", "mapping", "workers", "maintainer")

    def __init__(self) -> None:
        self.fd = -1
        self.mapping: Mapping | None = None
        self.workers: Workers | None = None
        self.maintainer: Maintainer | None = None

    def release(self) -> None:
        maintainer, self.maintainer = self.maintainer, None
        if maintainer is not None:
            maintainer.stop()
        workers, self.workers = self.workers, None
        if workers is not None:
            workers.close()
        mapping, self.mapping = self.mapping, None
        if mapping is not None:
            mapping.unmap()
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class MappedStore(PoolMixin):
    """Page store over a shared mapping of one file.  Subclasses supply the file.

    Parameters
    ----------
    fd
        File descriptor the store takes ownership of (closed by ``close()``, also if
        this constructor fails).
    capacity
        Bytes the store may hold; rounded down to whole pages.  The file is sized
        to it sparsely: nothing is allocated until pages are stored.
    page_size
        Bytes per page (a power of two, at least the OS page).
    warm_slack
        Most bytes of dropped, already-faulted slots the pool keeps for reuse.
    warm_floor
        Pool bytes that idle decay and memory pressure leave in place (``trim()``
        still releases them).  ``warm_slack`` is raised to at least this.
    warm_decay
        Seconds a pool page may sit unused before the maintainer releases it.
    watermark
        Bytes of available host memory below which the pool shrinks to its floor and
        ``drop`` releases pages at once.  ``None``: never (no host-memory signal).
    threads
        Copy threads for large batches (1 = copy on the caller's thread only).
    host_memory, clock
        The host-memory reader (``read() -> dict`` with ``available``, ``swap_free``,
        ...) and monotonic clock the pool policy consults; injectable for tests.
    background
        Run the pool maintainer thread (default).  Without it nothing is released
        behind the caller's back: ``reclaim()`` runs a pass when the owner calls it.
    what
        How errors name the store's file.
    """

    kind = "mapped"

    def __init__(self, fd: int, capacity: int, *, page_size: int, warm_slack: int,
                 threads: int | None, warm_floor: int = 0, warm_decay: float = DEFAULT_DECAY,
                 watermark: int | None = None, host_memory: Any = None,
                 clock: Callable[[], float] | None = None, background: bool = True,
                 what: str = "the store's file") -> None:
        self._holder = _Holder()
        self._holder.fd = fd  # owned from here on, whatever fails below
        self._finalizer = weakref.finalize(self, self._holder.release)
        self._guard = ForkGuard()
        try:
            self._setup(fd, capacity, page_size, warm_slack, threads, warm_floor, warm_decay,
                        watermark, host_memory, clock, background, what)
        except BaseException:
            self._finalizer()       # the fd and any mapping go now, not at collection
            raise

    def _setup(self, fd: int, capacity: int, page_size: int, warm_slack: int,
               threads: int | None, warm_floor: int, warm_decay: float, watermark: int | None,
               host_memory: Any, clock: Callable[[], float] | None, background: bool,
               what: str) -> None:
        page_size = check_page_size(page_size)
        warm_floor = check_count("warm_floor", warm_floor)
        self.warm_slack = max(check_count("warm_slack", warm_slack), warm_floor)
        self.warm_floor = warm_floor
        self.warm_decay = check_seconds("warm_decay", warm_decay)
        self.watermark = None if watermark is None else check_count("watermark", watermark)
        self.threads = (_default_threads() if threads is None
                        else check_count("threads", threads, minimum=1))
        nslots = int(capacity) // page_size
        if nslots < 1:
            raise ValueError(f"capacity={capacity:,} B holds no page of {page_size:,} B")
        self.page_size = page_size
        self.npages = nslots
        self._mem = host_memory
        self.background = bool(background)
        self._clock = clock or time.monotonic
        try:
            os.ftruncate(fd, nslots * page_size)
            self._holder.mapping = Mapping(fd, nslots * page_size)
        except OSError as e:
            raise StoreSetupError(
                e.errno, f"cannot size and map {what} to {nslots * page_size:,} B "
                         f"({nslots:,} pages of {page_size:,} B): {e.strerror}") from e
        self._slots = self._holder.mapping.view.reshape(nslots, page_size)
        self._state = np.zeros(nslots, np.uint8)
        self._warm = ExtentSet()
        self._cold = ExtentSet()
        self._cold.add(0, nslots)
        self._used = 0
        self._pending = 0              # BUSY slots that become free (WARM or COLD) soon
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)   # _active fell to 0
        self._freed = threading.Condition(self._lock)  # _pending slots became free
        self._active = 0
        self._closed = False
        self._populate = True
        self._release = True
        self._window_start = self._clock()
        self._window_min = 0           # fewest pool pages seen since _window_start
        self._prefault_left = 0        # pages the maintainer still prefaults
        self._prefault_target = 0      # pool pages prefault() asked for: the cap is at least this
        self.writeback_supported = True
        self._counts = dict.fromkeys(
            ("pages_written", "pages_read", "pages_dropped", "warm_hits", "cold_allocs",
             "pages_prefaulted", "pages_released", "writebacks", "pages_decayed",
             "pages_reclaimed", "release_failures", "reclaim_passes"), 0)

    # ------------------------------------------------------------------ hooks
    def _backing_avail(self) -> int:
        """Bytes of new (cold) pages the backing memory or disk can still take."""
        raise NotImplementedError

    def _backing_name(self) -> str:
        return "backing storage"

    def _under_pressure(self) -> bool:
        """Available host memory is below the watermark (never without one)."""
        if self.watermark is None or self._mem is None:
            return False
        return self._mem.read()["available"] < self.watermark

    def _writeback(self, offset: int, length: int) -> None:
        self._holder.mapping.madvise(MADV_PAGEOUT, offset, length)  # type: ignore[union-attr]

    # ------------------------------------------------------------- properties
    @property
    def capacity(self) -> int:
        """Bytes the store can hold at most."""
        return self.npages * self.page_size

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def fd(self) -> int:
        """The store's file descriptor (owned by the store; -1 once closed)."""
        return self._holder.fd

    @property
    def bytes_used(self) -> int:
        """Bytes held by live handles."""
        return self._used * self.page_size

    @property
    def bytes_warm(self) -> int:
        """Bytes of free, already-faulted slots kept for reuse (the pool)."""
        return self._warm.total * self.page_size

    @property
    def bytes_resident(self) -> int:
        """Bytes the store's file takes from the OS now (live pages and the pool)."""
        self._check_usable()
        return os.fstat(self._holder.fd).st_blocks * 512

    def bytes_avail(self) -> int:
        """Bytes a ``backup`` could still take now: the lesser of the free capacity and
        what warm slots plus the backing memory (or disk) allow."""
        self._check_usable()
        with self._lock:
            free = (self._warm.total + self._cold.total) * self.page_size
            warm = self._warm.total * self.page_size
        return max(0, min(free, warm + self._backing_avail()))

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._counts)
            out.update(pages_used=self._used, pages_warm=self._warm.total,
                       pages_pending=self._pending,
                       free_extents=len(self._warm) + len(self._cold))
        return out

    # ------------------------------------------------------------- life cycle
    def close(self) -> None:
        """Wait for operations in flight, stop the maintainer and the copy threads, then
        unmap and close the file.  Idempotent.

        In a forked child this only drops the child's mapping and fd: the pages are the
        parent's too, so nothing is punched or truncated, and nothing is waited for."""
        if self._guard.inherited:
            self._closed = True
            self._finalizer()
            return
        with self._lock:
            self._closed = True
            while self._active:
                self._idle.wait()
        self._finalizer()

    def __enter__(self) -> MappedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else (
            f"{self.bytes_used:,} B used of {self.capacity:,} B, {self.bytes_warm:,} B warm")
        return f"<{type(self).__name__} page_size={self.page_size} {state}>"

    def _check_usable(self) -> None:
        self._guard.check(type(self).__name__)
        if self._closed:
            raise ClosedError(f"{type(self).__name__} is closed")

    def _op(self) -> _Op:
        """One operation (``with self._op():``): refused once closed (or in a forked
        child); ``close`` waits for it."""
        self._guard.check(type(self).__name__)
        return _Op(self)

    # -------------------------------------------------------------- the API
    def alloc(self, npages: int, *, populate: bool = True) -> np.ndarray:
        """Reserve ``npages`` slots and return their handles (int64, all > 0).

        With ``populate`` the slots are faulted in before this returns, so a failure to
        get memory is a :class:`StoreFullError` here, not a fault in a later copy.
        Without it, cold slots are faulted in by the ``write`` that fills them (which
        raises :class:`StoreFullError` instead), on the copy threads, ahead of each
        copy.  Pool slots are used first; the rest come from as few runs as possible.
        Either the handles are returned or (whatever fails or interrupts) every slot
        is free again.
        """
        npages = check_count("npages", npages)
        ps = self.page_size
        with self._op():
            runs: tuple[list[tuple[int, int]], list[tuple[int, int]]] | None = None
            try:
                with deferred_interrupt(), self._lock:
                    runs = self._reserve(npages, populate)
                wruns, cruns = runs
                _faults.point("store.alloc.reserved")
                if populate and cruns:
                    try:
                        self._fault_in(cruns)
                    except OSError as e:
                        raise StoreFullError(
                            f"cannot store {npages * ps:,} B: faulting in "
                            f"{sum(n for _, n in cruns) * ps:,} B of {self._backing_name()} "
                            f"failed: {e.strerror or e}") from e
                    _faults.point("store.alloc.faulted")
                with deferred_interrupt():
                    if populate:
                        with self._lock:
                            for s, n in cruns:
                                self._state[s:s + n] = USED
                    allruns = wruns + cruns
                    handles = expand_runs(np.array([s for s, _ in allruns], np.int64) + 1,
                                          np.array([n for _, n in allruns], np.int64))
                    _faults.point("store.alloc.done")
                return handles
            except BaseException:
                if runs is not None:
                    self._undo_alloc(*runs)
                raise

    def write(self, handles: Any, data: Any) -> None:
        """Copy ``data`` (``len(handles) * page_size`` bytes) into the slots of ``handles``, in order."""
        src = as_bytes(data, "data", writable=False)
        h = self._checked(handles, "write", src.shape[0])
        idx = h - 1
        with self._op():
            with self._lock:
                self._validate(idx, h, "write")
                unfaulted = idx[self._state[idx] == UNFAULTED]
            _faults.point("store.write.begin")
            try:
                self._copy(idx, src, into_store=True, fault=bool(unfaulted.size))
            except OSError as e:
                if not unfaulted.size:
                    raise
                raise StoreFullError(
                    f"cannot store {idx.size * self.page_size:,} B: faulting in "
                    f"{self._backing_name()} failed: {e.strerror or e}") from e
            with self._lock:
                if unfaulted.size:
                    self._state[unfaulted] = USED
                self._counts["pages_written"] += idx.shape[0]

    def backup(self, data: Any, *, writeback: bool = False) -> np.ndarray:
        """Store ``data`` and return one handle (int64 > 0) per page.

        ``data`` is a contiguous host buffer whose length is a multiple of
        ``page_size``.  Either every page is stored and the handles returned, or
        nothing is (``StoreFullError`` is raised and every slot is free again).
        Cold slots are faulted in by the copy threads, each just ahead of its copy.
        ``writeback=True`` asks the kernel to push the pages to swap (or disk) now.
        """
        return backup_pages(self, data, writeback, populate=False)

    def read(self, handles: Any, out: Any) -> None:
        """Copy the pages of ``handles`` into ``out`` (writable, ``len(handles) * page_size`` B), in order."""
        dst = as_bytes(out, "out", writable=True)
        h = self._checked(handles, "read", dst.shape[0])
        idx = h - 1
        with self._op():
            with self._lock:
                self._validate(idx, h, "read")
            self._copy(idx, dst, into_store=False)
            with self._lock:
                self._counts["pages_read"] += idx.shape[0]

    def writeback(self, handles: Any) -> bool:
        """Ask the kernel to page these slots out now.  Returns False (and logs once) where
        the kernel cannot; the pages stay valid either way."""
        h = self._checked(handles, "writeback", None)
        idx = h - 1
        with self._op():
            with self._lock:
                self._validate(idx, h, "writeback")
            if not self.writeback_supported:
                return False
            starts, lengths, _ = runs_of(np.sort(idx))
            ps = self.page_size
            try:
                for s, n in zip(starts.tolist(), lengths.tolist()):
                    self._writeback(s * ps, n * ps)
            except OSError as e:
                if advice_supported(e):
                    raise
                self.writeback_supported = False
                log.info("writeback requested, but this kernel cannot page out %s (%s); "
                         "the pages stay in memory until the kernel reclaims them",
                         self._backing_name(), e.strerror)
                return False
            with self._lock:
                self._counts["writebacks"] += idx.shape[0]
            return True

    def drop(self, handles: Any) -> None:
        """Free the pages of ``handles`` into the pool (up to ``warm_slack`` bytes stay
        faulted in for reuse; beyond that, or under memory pressure, pages go back to the
        OS at once).  Nothing changes if any handle is invalid or repeated.

        Once the handles are freed, a failure to give pages back (or an interrupt while
        doing so) leaves those pages in the pool, released by a later pass: never lost."""
        h = as_handles(handles)
        if h.shape[0] == 0:
            self._check_usable()
            return
        idx = reject_duplicates(h, "drop") - 1
        starts, lengths, offsets = runs_of(idx)
        with self._op():
            pressure = self._under_pressure()
            _faults.point("store.drop.begin")
            with deferred_interrupt(), self._lock:
                self._validate(idx, idx + 1, "drop")
                limit = 0 if pressure else self._pool_limit()
                budget = limit - self._warm.total
                release: list[tuple[int, int]] = []
                # A run with never-faulted slots is not warm: it goes back whole.
                unfaulted = np.add.reduceat(self._state[idx] == UNFAULTED, offsets) > 0
                for s, n, cold in zip(starts.tolist(), lengths.tolist(), unfaulted.tolist()):
                    keep = 0 if cold else (min(n, max(budget, 0)) if self._release else n)
                    if keep:
                        self._state[s:s + keep] = WARM
                        self._warm.add(s, keep)
                        budget -= keep
                    if keep < n:
                        self._state[s + keep:s + n] = BUSY
                        release.append((s + keep, n - keep))
                self._used -= idx.shape[0]
                self._counts["pages_dropped"] += idx.shape[0]
                if pressure:
                    release += self._take_warm(self._warm.total - self.warm_floor // self.page_size)
                    self._window_min = min(self._window_min, self._warm.total)
                self._pending += sum(n for _, n in release)
                self._start_maintainer()
            self._give_back(release)

    # ------------------------------------------------------------- internals
    def _checked(self, handles: Any, what: str, nbytes: int | None) -> np.ndarray:
        h = as_handles(handles)
        if nbytes is not None and nbytes != h.shape[0] * self.page_size:
            buf = "data" if what == "write" else "out"
            raise ValueError(
                f"{what}: {buf} is {nbytes:,} B but {h.shape[0]:,} handles of "
                f"{self.page_size:,} B need {h.shape[0] * self.page_size:,} B")
        reject_duplicates(h, what)
        return h

    def _validate(self, idx: np.ndarray, h: np.ndarray, what: str) -> None:
        # Caller holds the lock.
        if idx.size == 0 or (idx.min() >= 0 and idx.max() < self.npages):
            bad = None
        else:
            bad = (idx < 0) | (idx >= self.npages)
        if bad is not None:
            raise InvalidHandleError(
                f"{what}: handle {int(h[bad][0])} is out of range 1..{self.npages} "
                f"({int(bad.sum())} of {h.size} handles)")
        state = self._state[idx]
        dead = (state != USED) & (state != UNFAULTED)
        if dead.any():
            raise InvalidHandleError(
                f"{what}: handle {int(h[dead][0])} is not live: never handed out or already "
                f"dropped ({int(dead.sum())} of {h.size} handles)")

    def _reserve(self, npages: int, populate: bool) -> tuple[list, list]:
        """Take ``npages`` slots, pool first (caller holds the lock).  Waits for slots in
        transition when they would make the difference."""
        ps = self.page_size
        while True:
            free = self._warm.total + self._cold.total
            if npages <= free or npages > free + self._pending:
                break
            self._freed.wait()
        if npages > free:
            raise StoreFullError(
                f"cannot store {npages * ps:,} B: {free * ps:,} B of the store's "
                f"{self.capacity:,} B capacity are free")
        cold_needed = npages - self._warm.total
        if cold_needed > 0:
            avail = self._backing_avail()
            if cold_needed * ps > avail:
                raise StoreFullError(
                    f"cannot store {npages * ps:,} B: {self._warm.total * ps:,} B of warm "
                    f"slots plus {avail:,} B of {self._backing_name()} are available")
        wruns = self._warm.take(npages)
        nwarm = sum(n for _, n in wruns)
        cruns = self._cold.take(npages - nwarm)
        for s, n in wruns:
            self._state[s:s + n] = USED
        for s, n in cruns:
            self._state[s:s + n] = BUSY if populate else UNFAULTED
        self._used += npages
        self._window_min = min(self._window_min, self._warm.total)
        self._counts["warm_hits"] += nwarm
        self._counts["cold_allocs"] += npages - nwarm
        return wruns, cruns

    def _undo_alloc(self, wruns: list[tuple[int, int]], cruns: list[tuple[int, int]]) -> None:
        """Free what ``_reserve`` took: pool slots back to the pool, cold ones (perhaps
        partly faulted in) back to the OS."""
        with deferred_interrupt(), self._lock:
            for s, n in wruns:
                self._state[s:s + n] = WARM
                self._warm.add(s, n)
            for s, n in cruns:
                self._state[s:s + n] = BUSY
            ncold = sum(n for _, n in cruns)
            self._used -= sum(n for _, n in wruns) + ncold
            self._pending += ncold
        self._give_back(cruns)

    def _fault_in(self, runs: list[tuple[int, int]]) -> None:
        """Fault in ``runs`` (on the copy threads when they are large)."""
        if not self._populate or not runs:
            return
        ps = self.page_size
        segs = [(s * ps, 0, n * ps) for s, n in runs]
        total = sum(n for _, n in runs) * ps
        parts = split(segs, total, self.threads) if total >= _PARALLEL_MIN else [segs]
        self._run_parts([functools.partial(self._fault_segments, p) for p in parts])

    def _fault_segments(self, segs: list[tuple[int, int, int]]) -> None:
        if self._populate:
            try:
                fault_segments(self._holder.mapping, segs)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                self._populate = False  # kernel < 5.14: pages fault on first write

    def _copy(self, idx: np.ndarray, buf: np.ndarray, *, into_store: bool,
              fault: bool = False) -> None:
        n = idx.shape[0]
        if n == 0:
            return
        ps = self.page_size
        starts, lengths, offsets = runs_of(idx)
        if starts.shape[0] * _SCATTER_RUN_PAGES > n:
            if fault:
                fs, fl, _ = runs_of(np.sort(idx))
                self._fault_in(list(zip(fs.tolist(), fl.tolist())))
            rows = buf.reshape(n, ps)
            if into_store:
                self._slots[idx] = rows
            else:
                np.take(self._slots, idx, axis=0, out=rows)
            return
        flat = self._slots.reshape(-1)
        segs = list(zip((starts * ps).tolist(), (offsets * ps).tolist(), (lengths * ps).tolist()))
        total = n * ps
        parts = split(segs, total, self.threads) if total >= _PARALLEL_MIN else [segs]
        faulter = self._fault_segments if fault and self._populate else None
        self._run_parts([functools.partial(copy_segments, flat, buf, p, into_store, faulter)
                         for p in parts])

    def _run_parts(self, jobs: list[Callable[[], None]]) -> None:
        """Run ``jobs`` on the caller and the copy threads; returns once all are done."""
        if len(jobs) == 1:
            jobs[0]()
            return
        _faults.point("store.copy.submit")
        Batch(jobs).run(self._workers(), len(jobs) - 1)

    def _workers(self) -> Workers:
        with self._lock:
            if self._holder.workers is None:
                self._holder.workers = Workers(self.threads - 1,
                                               f"gpu_backup-{self.kind}-copy")
            return self._holder.workers

    def _audit(self) -> dict[str, int]:
        """Check the slot table against the free lists and counters (for tests): every
        slot in exactly one state, each free list matching its state.  Returns the
        count per state; raises ``AssertionError`` on any mismatch."""
        with self._lock:
            counts = np.bincount(self._state, minlength=5)
            for ext, state in ((self._warm, WARM), (self._cold, COLD)):
                mark = np.zeros(self.npages, bool)
                for s, n in ext.extents():
                    assert not mark[s:s + n].any(), f"extent {s}+{n} overlaps"
                    mark[s:s + n] = True
                assert (mark == (self._state == state)).all(), f"state {state} != its free list"
            assert counts[USED] + counts[UNFAULTED] == self._used, (counts, self._used)
            assert counts[BUSY] == self._pending, (counts, self._pending)
            return {"cold": int(counts[COLD]), "warm": int(counts[WARM]),
                    "used": int(counts[USED] + counts[UNFAULTED]), "busy": int(counts[BUSY])}


class _Op:
    """Counts an operation in flight on a store (``_active``) for ``close`` to wait for."""

    __slots__ = ("_store", "_entered")

    def __init__(self, store: MappedStore) -> None:
        self._store = store
        self._entered = False

    def __enter__(self) -> None:
        s = self._store
        with deferred_interrupt(), s._lock:
            if s._closed:
                raise ClosedError(f"{type(s).__name__} is closed")
            s._active += 1
            self._entered = True

    def __exit__(self, *exc: object) -> None:
        if self._entered:
            s = self._store
            # One step: a Ctrl-C between the lock and the count would leave the operation
            # counted for ever, and close() waiting for it.
            with deferred_interrupt(), s._lock:
                self._entered = False
                s._active -= 1
                if not s._active:
                    s._idle.notify_all()


def backup_pages(store: Any, data: Any, writeback: bool, *, populate: bool = True) -> np.ndarray:
    """``backup`` for any store with ``alloc``/``write``/``writeback``/``drop``: every page is
    stored and its handle returned, or (on any failure) none is."""
    src = as_bytes(data, "data", writable=False)
    nbytes = src.shape[0]
    if nbytes % store.page_size:
        raise ValueError(f"data is {nbytes:,} B, not a multiple of page_size={store.page_size:,}")
    handles = store.alloc(nbytes // store.page_size, populate=populate)
    try:
        store.write(handles, src)
        if writeback:
            store.writeback(handles)
    except BaseException:
        store.drop(handles)
        raise
    return handles


def _default_threads() -> int:
    return min(4, max(1, (os.cpu_count() or 1) // 4))

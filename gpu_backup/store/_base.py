"""The page-store core shared by :class:`ShmemStore` and :class:`FileStore`.

A store is one file (a memfd or a file on disk) mapped shared, cut into
``page_size`` slots.  ``backup`` hands out one handle per page (slot index + 1,
so handles are always > 0 and 0 can mean "on the device" in a page table).

Slot life cycle (``_state``)::

    COLD  free, not backed by memory (a hole in the file)
    WARM  free, already faulted in: reused first, bounded by ``warm_slack``
    USED  holds a live handle
    BUSY  in transition (being prefaulted or released outside the lock)

All bookkeeping is numpy over the slot table or per extent; copies are per run of
consecutive slots (or one vectorised gather/scatter when the handles are
scattered), never a Python loop per page.  Copies run outside the lock; ``close``
waits for copies in flight before it unmaps.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .._os import (
    MADV_PAGEOUT,
    MADV_POPULATE_WRITE,
    MADV_REMOVE,
    OS_PAGE_SIZE,
    Mapping,
    advice_supported,
)
from .._runs import expand_runs, runs_of
from ..errors import ClosedError, InvalidHandleError, StoreFullError
from ._extents import ExtentSet

__all__ = ["PAGE_SIZE", "MappedStore", "as_bytes", "as_handles", "backup_pages", "check_page_size"]

log = logging.getLogger("gpu_backup.store")

PAGE_SIZE = OS_PAGE_SIZE
"""Default page size: the OS page (4 KiB on x86-64)."""

COLD, WARM, USED, BUSY, UNFAULTED = 0, 1, 2, 3, 4
# UNFAULTED: holds a live handle, but was reserved with alloc(populate=False) and not yet
# faulted in; write() faults it in first.

# Below this many bytes a copy stays on the calling thread.
_PARALLEL_MIN = 32 << 20
# When the average run is shorter than this many pages, one vectorised gather/scatter
# beats a Python-level slice copy per run.
_SCATTER_RUN_PAGES = 8


def check_page_size(page_size: int) -> int:
    if not isinstance(page_size, (int, np.integer)) or isinstance(page_size, bool):
        raise TypeError(f"page_size must be an int, got {type(page_size).__name__}")
    page_size = int(page_size)
    if page_size < OS_PAGE_SIZE or page_size & (page_size - 1):
        raise ValueError(f"{page_size=} must be a power of two >= {OS_PAGE_SIZE} (the OS page)")
    return page_size


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


class _Holder:
    """Everything needed to free the store's OS resources; released exactly once."""

    __slots__ = ("fd", "mapping", "pool")

    def __init__(self) -> None:
        self.fd = -1
        self.mapping: Mapping | None = None
        self.pool: ThreadPoolExecutor | None = None

    def release(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=False)
        mapping, self.mapping = self.mapping, None
        if mapping is not None:
            mapping.unmap()
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class MappedStore:
    """Page store over a shared mapping of one file.  Subclasses supply the file.

    Parameters
    ----------
    fd
        File descriptor the store takes ownership of (closed by ``close()``).
    capacity
        Bytes the store may hold; rounded down to whole pages.  The file is sized
        to it sparsely: nothing is allocated until pages are stored.
    page_size
        Bytes per page (a power of two, at least the OS page).
    warm_slack
        Bytes of dropped, already-faulted slots kept for reuse instead of being
        returned to the OS.  Released by ``trim()`` and under host memory pressure.
    threads
        Copy threads for large batches (1 = copy on the caller's thread only).
    """

    kind = "mapped"

    def __init__(self, fd: int, capacity: int, *, page_size: int, warm_slack: int,
                 threads: int | None) -> None:
        self._holder = _Holder()
        self._holder.fd = fd  # owned from here on, whatever fails below
        self._finalizer = weakref.finalize(self, self._holder.release)
        page_size = check_page_size(page_size)
        if warm_slack < 0:
            raise ValueError(f"{warm_slack=} must be >= 0")
        nslots = int(capacity) // page_size
        if nslots < 1:
            raise ValueError(f"capacity={capacity:,} B holds no page of {page_size:,} B")
        self.page_size = page_size
        self.npages = nslots
        self.warm_slack = int(warm_slack)
        self.threads = max(1, int(threads if threads is not None else _default_threads()))
        os.ftruncate(fd, nslots * page_size)
        self._holder.mapping = Mapping(fd, nslots * page_size)
        self._slots = self._holder.mapping.view.reshape(nslots, page_size)
        self._state = np.zeros(nslots, np.uint8)
        self._warm = ExtentSet()
        self._cold = ExtentSet()
        self._cold.add(0, nslots)
        self._used = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0
        self._closed = False
        self._populate = True
        self._release = True
        self.writeback_supported = True
        self._counts = dict.fromkeys(
            ("pages_written", "pages_read", "pages_dropped", "warm_hits", "cold_allocs",
             "pages_prefaulted", "pages_released", "writebacks"), 0)

    # ------------------------------------------------------------------ hooks
    def _backing_avail(self) -> int:
        """Bytes of new (cold) pages the backing memory or disk can still take."""
        raise NotImplementedError

    def _under_pressure(self) -> bool:
        return False

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
        """Bytes of free, already-faulted slots kept for reuse."""
        return self._warm.total * self.page_size

    @property
    def bytes_resident(self) -> int:
        """Bytes the store's file takes from the OS now (live pages and warm slack)."""
        self._check_open()
        return os.fstat(self._holder.fd).st_blocks * 512

    def bytes_avail(self) -> int:
        """Bytes a ``backup`` could still take now: the lesser of the free capacity and
        what warm slots plus the backing memory (or disk) allow."""
        self._check_open()
        with self._lock:
            free = (self._warm.total + self._cold.total) * self.page_size
            warm = self._warm.total * self.page_size
        return max(0, min(free, warm + self._backing_avail()))

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._counts)
            out.update(pages_used=self._used, pages_warm=self._warm.total,
                       free_extents=len(self._warm) + len(self._cold))
        return out

    # ------------------------------------------------------------- life cycle
    def close(self) -> None:
        """Wait for copies in flight, then unmap and close the file.  Idempotent."""
        with self._lock:
            self._closed = True
            while self._active:
                self._idle.wait()
        pool = self._holder.pool
        if pool is not None:
            pool.shutdown(wait=True)
        self._finalizer()

    def __enter__(self) -> MappedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else (
            f"{self.bytes_used:,} B used of {self.capacity:,} B, {self.bytes_warm:,} B warm")
        return f"<{type(self).__name__} page_size={self.page_size} {state}>"

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{type(self).__name__} is closed")

    def _enter(self) -> None:
        # Caller holds the lock.
        if self._closed:
            raise ClosedError(f"{type(self).__name__} is closed")
        self._active += 1

    def _leave(self) -> None:
        with self._lock:
            self._active -= 1
            if not self._active:
                self._idle.notify_all()

    # -------------------------------------------------------------- the API
    def alloc(self, npages: int, *, populate: bool = True) -> np.ndarray:
        """Reserve ``npages`` slots and return their handles (int64, all > 0).

        With ``populate`` the slots are faulted in before this returns, so a failure to
        get memory is a :class:`StoreFullError` here, not a fault in a later copy.
        Without it, cold slots are faulted in by the ``write`` that fills them (which
        raises :class:`StoreFullError` instead): a pipeline then faults its pieces in
        on several threads, overlapped with its other copies.  Warm slots are used
        first; the rest come from as few runs as possible.
        """
        npages = int(npages)
        if npages < 0:
            raise ValueError(f"{npages=} must be >= 0")
        ps = self.page_size
        with self._lock:
            self._enter()
            try:
                free = self._warm.total + self._cold.total
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
                cruns = self._cold.take(npages - sum(n for _, n in wruns))
                for s, n in wruns:
                    self._state[s:s + n] = USED
                for s, n in cruns:
                    self._state[s:s + n] = BUSY if populate else UNFAULTED
                self._used += npages
                self._counts["warm_hits"] += npages - sum(n for _, n in cruns)
                self._counts["cold_allocs"] += sum(n for _, n in cruns)
            except BaseException:
                self._active -= 1
                raise
        try:
            try:
                if populate:
                    self._fault_in(cruns)
            except BaseException as e:
                self._undo_alloc(wruns, cruns)
                if isinstance(e, OSError):
                    raise StoreFullError(
                        f"cannot store {npages * ps:,} B: faulting in "
                        f"{sum(n for _, n in cruns) * ps:,} B of {self._backing_name()} failed: "
                        f"{e.strerror}") from e
                raise
            if populate:
                with self._lock:
                    for s, n in cruns:
                        self._state[s:s + n] = USED
            runs = wruns + cruns
            return expand_runs(np.array([s for s, _ in runs], np.int64) + 1,
                               np.array([n for _, n in runs], np.int64))
        finally:
            self._leave()

    def write(self, handles: Any, data: Any) -> None:
        """Copy ``data`` (``len(handles) * page_size`` bytes) into the slots of ``handles``, in order."""
        src = as_bytes(data, "data", writable=False)
        idx = self._begin(handles, "write", src.shape[0])
        try:
            unfaulted = idx[self._state[idx] == UNFAULTED]
            if unfaulted.size:
                self._fault_in_handles(unfaulted)
            self._copy(idx, src, into_store=True)
            with self._lock:
                self._counts["pages_written"] += idx.shape[0]
        finally:
            self._leave()

    def backup(self, data: Any, *, writeback: bool = False) -> np.ndarray:
        """Store ``data`` and return one handle (int64 > 0) per page.

        ``data`` is a contiguous host buffer whose length is a multiple of
        ``page_size``.  Either every page is stored and the handles returned, or
        nothing is (``StoreFullError`` is raised before any byte is written).
        ``writeback=True`` asks the kernel to push the pages to swap (or disk) now.
        """
        return backup_pages(self, data, writeback)

    def read(self, handles: Any, out: Any) -> None:
        """Copy the pages of ``handles`` into ``out`` (writable, ``len(handles) * page_size`` B), in order."""
        dst = as_bytes(out, "out", writable=True)
        idx = self._begin(handles, "read", dst.shape[0])
        try:
            self._copy(idx, dst, into_store=False)
            with self._lock:
                self._counts["pages_read"] += idx.shape[0]
        finally:
            self._leave()

    def writeback(self, handles: Any) -> bool:
        """Ask the kernel to page these slots out now.  Returns False (and logs once) where
        the kernel cannot; the pages stay valid either way."""
        idx = self._begin(handles, "writeback", None)
        try:
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
        finally:
            self._leave()

    def drop(self, handles: Any) -> None:
        """Free the pages of ``handles``.  Up to ``warm_slack`` bytes stay faulted in for reuse;
        the rest go back to the OS (``MADV_REMOVE`` punches a hole in the file)."""
        h = as_handles(handles)
        if h.shape[0] == 0:
            self._check_open()
            return
        idx = h - 1
        if idx.size > 1 and not (idx[1:] > idx[:-1]).all():
            idx = np.sort(idx)
        dup = np.flatnonzero(idx[1:] == idx[:-1])
        if dup.size:
            raise InvalidHandleError(
                f"handle {int(idx[dup[0]]) + 1} appears more than once in drop() "
                f"({dup.size} duplicates among {idx.size} handles)")
        starts, lengths, offsets = runs_of(idx)
        pressure = self._under_pressure()
        with self._lock:
            self._enter()
            try:
                self._validate(idx, idx + 1, "drop")
            except BaseException:
                self._active -= 1
                raise
            try:
                budget = 0 if pressure else self.warm_slack // self.page_size - self._warm.total
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
                    release += self._warm_to_busy()
            except BaseException:
                self._active -= 1
                raise
        try:
            self._give_back(release)
        finally:
            self._leave()

    def prefault(self, nbytes: int) -> int:
        """Fault in free slots ahead of need, until ``nbytes`` of warm slots are ready (or the
        capacity or backing memory runs out).  Returns the bytes newly faulted in."""
        ps = self.page_size
        want = -(-int(nbytes) // ps)
        with self._lock:
            self._enter()
            try:
                n = max(0, min(want - self._warm.total, self._cold.total,
                               self._backing_avail() // ps))
                runs = self._cold.take(n)
                for s, k in runs:
                    self._state[s:s + k] = BUSY
            except BaseException:
                self._active -= 1
                raise
        try:
            try:
                self._fault_in(runs)
            except BaseException:
                self._give_back(runs)
                raise
            with self._lock:
                for s, k in runs:
                    self._state[s:s + k] = WARM
                    self._warm.add(s, k)
                self._counts["pages_prefaulted"] += n
            return n * ps
        finally:
            self._leave()

    def trim(self) -> int:
        """Return every warm free slot to the OS.  Returns the bytes released."""
        with self._lock:
            self._enter()
            try:
                runs = self._warm_to_busy()
            except BaseException:
                self._active -= 1
                raise
        try:
            self._give_back(runs)
            return sum(n for _, n in runs) * self.page_size
        finally:
            self._leave()

    # ------------------------------------------------------------- internals
    def _backing_name(self) -> str:
        return "backing storage"

    def _begin(self, handles: Any, what: str, nbytes: int | None) -> np.ndarray:
        h = as_handles(handles)
        if nbytes is not None and nbytes != h.shape[0] * self.page_size:
            buf = "data" if what == "write" else "out"
            raise ValueError(
                f"{what}: {buf} is {nbytes:,} B but {h.shape[0]:,} handles of "
                f"{self.page_size:,} B need {h.shape[0] * self.page_size:,} B")
        idx = h - 1
        with self._lock:
            self._enter()
            try:
                self._validate(idx, h, what)
            except BaseException:
                self._active -= 1
                raise
        return idx

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

    def _warm_to_busy(self) -> list[tuple[int, int]]:
        # Caller holds the lock.
        runs = self._warm.take_all()
        for s, n in runs:
            self._state[s:s + n] = BUSY
        return runs

    def _give_back(self, runs: list[tuple[int, int]]) -> None:
        """Punch BUSY runs out of the file (outside the lock), then mark them COLD."""
        ps = self.page_size
        mapping = self._holder.mapping
        try:
            if self._release:
                for s, n in runs:
                    mapping.madvise(MADV_REMOVE, s * ps, n * ps)  # type: ignore[union-attr]
        except OSError as e:
            if advice_supported(e):
                log.warning("releasing %s B of the store failed: %s", f"{len(runs):,} runs", e)
            else:
                self._release = False
                log.info("%s cannot punch holes (%s): dropped pages stay allocated and are "
                         "reused", self._backing_name(), e.strerror)
        with self._lock:
            target = self._cold if self._release else self._warm
            state = COLD if self._release else WARM
            for s, n in runs:
                self._state[s:s + n] = state
                target.add(s, n)
            if self._release:
                self._counts["pages_released"] += sum(n for _, n in runs)

    def _fault_in(self, runs: list[tuple[int, int]]) -> None:
        if not self._populate:
            return
        ps = self.page_size
        for s, n in runs:
            try:
                self._holder.mapping.madvise(MADV_POPULATE_WRITE, s * ps, n * ps)  # type: ignore[union-attr]
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.ENOSYS) and s == runs[0][0]:
                    self._populate = False  # kernel < 5.14: pages fault on first write
                    return
                raise

    def _fault_in_handles(self, idx: np.ndarray) -> None:
        """Fault in UNFAULTED slots ``idx`` (0-based); StoreFullError if memory is short."""
        starts, lengths, _ = runs_of(np.sort(idx))
        runs = list(zip(starts.tolist(), lengths.tolist()))
        try:
            self._fault_in(runs)
        except OSError as e:
            raise StoreFullError(
                f"cannot store {idx.size * self.page_size:,} B: faulting in "
                f"{self._backing_name()} failed: {e.strerror}") from e
        with self._lock:
            self._state[idx] = USED

    def _undo_alloc(self, wruns: list[tuple[int, int]], cruns: list[tuple[int, int]]) -> None:
        with self._lock:
            for s, n in wruns:
                self._state[s:s + n] = WARM
                self._warm.add(s, n)
            self._used -= sum(n for _, n in wruns) + sum(n for _, n in cruns)
        self._give_back(cruns)

    def _copy(self, idx: np.ndarray, buf: np.ndarray, *, into_store: bool) -> None:
        n = idx.shape[0]
        if n == 0:
            return
        ps = self.page_size
        starts, lengths, offsets = runs_of(idx)
        if starts.shape[0] * _SCATTER_RUN_PAGES > n:
            rows = buf.reshape(n, ps)
            if into_store:
                self._slots[idx] = rows
            else:
                np.take(self._slots, idx, axis=0, out=rows)
            return
        flat = self._slots.reshape(-1)
        segs = list(zip((starts * ps).tolist(), (offsets * ps).tolist(), (lengths * ps).tolist()))
        total = n * ps
        parts = self.threads if total >= _PARALLEL_MIN else 1
        if parts == 1:
            _copy_segments(flat, buf, segs, into_store)
            return
        pool = self._pool()
        futures = [pool.submit(_copy_segments, flat, buf, piece, into_store)
                   for piece in _split(segs, total, parts)]
        errors = [f.exception() for f in futures]
        for e in errors:
            if e is not None:
                raise e

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._holder.pool is None:
                self._holder.pool = ThreadPoolExecutor(
                    self.threads, thread_name_prefix=f"gpu_backup-{self.kind}-copy")
            return self._holder.pool


def backup_pages(store: Any, data: Any, writeback: bool) -> np.ndarray:
    """``backup`` for any store with ``alloc``/``write``/``writeback``/``drop``: every page is
    stored and its handle returned, or (on any failure) none is."""
    src = as_bytes(data, "data", writable=False)
    nbytes = src.shape[0]
    if nbytes % store.page_size:
        raise ValueError(f"data is {nbytes:,} B, not a multiple of page_size={store.page_size:,}")
    handles = store.alloc(nbytes // store.page_size)
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


def as_handles(handles: Any) -> np.ndarray:
    h = np.asarray(handles)
    if h.ndim != 1:
        raise ValueError(f"handles must be 1-D, got shape {h.shape}")
    if h.size and h.dtype.kind not in "iu":
        raise ValueError(f"handles must be integers, got dtype {h.dtype}")
    return h.astype(np.int64, copy=False)


def _copy_segments(flat: np.ndarray, buf: np.ndarray, segs: list[tuple[int, int, int]],
                   into_store: bool) -> None:
    if into_store:
        for so, bo, ln in segs:
            flat[so:so + ln] = buf[bo:bo + ln]
    else:
        for so, bo, ln in segs:
            buf[bo:bo + ln] = flat[so:so + ln]


def _split(segs: list[tuple[int, int, int]], total: int, parts: int) -> list[list[tuple[int, int, int]]]:
    """Cut copy segments into ``parts`` lists of about equal bytes, cutting only at OS-page bounds."""
    pages = total // OS_PAGE_SIZE
    bounds = [(pages * k // parts) * OS_PAGE_SIZE for k in range(1, parts)] + [total]
    out: list[list[tuple[int, int, int]]] = [[] for _ in bounds]
    part, pos = 0, 0
    for so, bo, ln in segs:
        while ln:
            while pos >= bounds[part]:
                part += 1
            take = min(ln, bounds[part] - pos)
            out[part].append((so, bo, take))
            so, bo, ln, pos = so + take, bo + take, ln - take, pos + take
    return [p for p in out if p]

"""``BufferManager``: buffer objects on one device, their eviction, restore and accounting."""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import weakref
from collections import OrderedDict, deque
from typing import Any

import numpy as np

from . import _faults
from ._check import check_count
from ._fork import ForkGuard
from ._interrupts import take_lock
from ._os import host_memory
from .buffer import Buffer, _Pages
from .device import open_backend
from .device.oom import is_device_oom
from .errors import (
    BufferBusyError,
    BufferFreedError,
    ClosedError,
    OutOfDeviceMemory,
)
from .kernels import PageScanner, scan_default
from .pager import Pager
from .shrinker import CupyAllocatorHook, LruShrinker, Reclaimer, Shrinker, _is_clean
from .staging import Staging, StagingRing
from .store import PAGE_SIZE, ShmemStore
from .store._base import check_page_size
from .store.protocol import PageStore

__all__ = ["BufferManager"]

log = logging.getLogger("gpu_backup")

_STAT_KEYS = ("evictions", "bytes_evicted", "bytes_copied_out", "restores", "bytes_restored",
              "bytes_copied_in", "zero_pages", "purges", "bytes_purged", "clean_evictions", "evict_seconds",
              "restore_seconds", "swaps")


class BufferManager:
    """Buffer objects on one device that can hold more than the device has.

    Parameters
    ----------
    device
        ``"auto"`` (CUDA if usable, else host, with a warning that says why), ``"cuda"``,
        ``"cuda:N"`` or an int N (any case; a ``torch.device`` too), or ``"host"``.
    device_limit
        Most device bytes this manager's buffers may hold: an int, a fraction of the
        device's memory (0 < x <= 1), or None (no limit short of a real OOM).  Past it,
        idle buffers are evicted, least recently used first.
    store
        A :class:`PageStore` to evict into (not owned: the caller closes it).  Default: a
        :class:`ShmemStore` owned and closed by the manager.
    page_size
        Bytes per page: the unit of the page table and of the store.
    staging
        The pinned staging ring's shape (:class:`Staging`).
    host_capacity
        For the host backend only: the emulated device's size.
    zero_scan
        Scan pages before eviction and record all-zero ones instead of copying them
        (restored with a memset).  Default: on for cuda (a device pass is far cheaper than
        the copy), off for host.
    """

    def __init__(self, device: Any = "auto", *, device_limit: int | float | None = None,
                 store: PageStore | None = None, page_size: int = PAGE_SIZE,
                 staging: Staging | None = None, host_capacity: int | None = None,
                 zero_scan: bool | None = None) -> None:
        self.page_size = check_page_size(page_size)
        if store is not None:
            # closed first: a closed store's properties raise, and isinstance reads them
            if getattr(store, "closed", False) is True:
                raise ClosedError(f"the store handed to BufferManager is closed: {store!r}")
            if not isinstance(store, PageStore):
                raise TypeError(f"store must be a PageStore (ShmemStore, FileStore, TieredStore), "
                                f"got {type(store).__name__}")
            if store.page_size != self.page_size:
                raise ValueError(f"store page_size={store.page_size:,} differs from {page_size=:,}")
        if host_capacity is not None:
            check_count("host_capacity", host_capacity, minimum=1)
        if staging is not None and not isinstance(staging, Staging):
            raise TypeError(f"staging must be a Staging, got {type(staging).__name__}")
        _resolve_limit(device_limit, 1)  # check it before anything is created
        self._closed = True
        self._finished = True   # set once close() has let go of everything
        self._fork = ForkGuard()
        owned: list[Any] = []  # what this constructor made, closed again if a later step fails
        try:
            self.backend = open_backend(device, host_capacity=host_capacity)
            owned.append(self.backend)
            self._owns_store = store is None
            if store is None:
                store = ShmemStore(page_size=self.page_size)
                owned.append(store)
            self.store: PageStore = store
            self._ring = StagingRing(self.backend, self.store, staging or Staging(), self.page_size)
            owned.append(self._ring)
            self._device_total = self.backend.mem_info()[1]
            self.device_limit = _resolve_limit(device_limit, self._device_total)
        except BaseException:
            for thing in reversed(owned):
                thing.close()
            raise
        self._lock = threading.RLock()
        # Notified whenever device bytes are released: allocations waiting for an eviction
        # in flight on another thread wake on it (see _await_release).
        self._mem_freed = threading.Condition(self._lock)
        # Device bytes held or reserved.  Changed only by plain arithmetic under the lock:
        # no call between a change of a buffer's held bytes and this, where an interrupt
        # could land.
        self._device_bytes = 0
        self._release_gen = 0         # bumped by _notify_released
        self._awaiting = 0            # allocations inside _await_release now
        self._graveyard: deque[_BufferRef] = deque()  # collected buffers to release
        self._drain_lock = threading.Lock()
        # Live buffers, least recently used first.  Each weak reference's callback is the
        # graveyard's own append (C code, which an interrupt cannot split): a collected
        # buffer is always queued for release.
        self._lru: OrderedDict[int, _BufferRef] = OrderedDict()
        self._ids = itertools.count(1)
        self._stats = dict.fromkeys(_STAT_KEYS, 0)
        self._peak = 0
        self._reclaimer = Reclaimer()
        self._lru_shrinker = LruShrinker(self)
        self._reclaimer.register(self._lru_shrinker)
        self._cupy_hook = CupyAllocatorHook(self)
        self.zero_scan = scan_default(self.backend.name) if zero_scan is None else bool(zero_scan)
        self._scanner = PageScanner(self.backend)
        self._pager = Pager(backend=self.backend, store=self.store, ring=self._ring,
                            scanner=self._scanner, page_size=self.page_size,
                            device_alloc=self._device_alloc, released=self._released,
                            count=self._count, zero_scan=self._zero_scan_on,
                            zero_scan_failed=self._zero_scan_failed)
        self._pager.find_victim = self._swap_victim
        self._closed = False
        self._finished = False
        log.info("BufferManager on %s (%s): page_size=%d, staging %d x %d B, limit=%s",
                 self.backend.name, self.backend.reason, self.page_size, self._ring.config.slots,
                 self._ring.slot_bytes, self.device_limit)

    # ------------------------------------------------------------- properties
    reclaim_wait = 10.0
    """Seconds an allocation may wait, at most, for device memory that other threads are
    releasing (an eviction in flight) before it raises :class:`OutOfDeviceMemory`."""

    @property
    def device_bytes(self) -> int:
        """Device bytes held by this manager's buffers now (buffers collected by the garbage
        collector are released first, so the figure is current)."""
        if self._graveyard:
            self._drain()
        return self._device_bytes

    def _notify_released(self) -> None:
        """Device bytes were released (or a buffer became evictable again when its last
        access() ended): wake the allocations waiting for some."""
        with self._lock:
            self._release_gen += 1
            self._mem_freed.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def buffers(self) -> list[Buffer]:
        """Live buffers, least recently used first."""
        self._drain()
        with self._lock:
            refs = list(self._lru.values())
        return [b for b in (r() for r in refs) if b is not None]

    def stats(self) -> dict[str, Any]:
        """Counters since creation, with throughputs in GB/s (1e9 B/s)."""
        self._drain()
        with self._lock:
            s: dict[str, Any] = dict(self._stats)
            s["buffers"] = len(self._lru)
        s["device_bytes"] = self._device_bytes
        s["peak_device_bytes"] = self._peak
        s.update(self._reclaimer.stats)
        s.update({f"lru_{k}": v for k, v in self._lru_shrinker.stats.items()})
        s.update({f"cupy_{k}": v for k, v in self._cupy_hook.stats.items()})
        s["store_bytes"] = self.store.bytes_used
        s["evict_gbps"] = _gbps(s["bytes_copied_out"], s["evict_seconds"])
        s["restore_gbps"] = _gbps(s["bytes_copied_in"], s["restore_seconds"])
        s["backend"] = self.backend.name
        return s

    def __repr__(self) -> str:
        return (f"<BufferManager {self.backend.name}: {self._device_bytes:,} B on device, "
                f"{self.store.bytes_used:,} B in store>")

    # ------------------------------------------------------------------ alloc
    def alloc(self, nbytes: int, *, purgeable: bool = False) -> Buffer:
        """A new buffer of ``nbytes`` (contents undefined), resident on the device.

        Device memory is whole pages.  When the device limit or the device itself is
        short, idle buffers are evicted first; :class:`OutOfDeviceMemory` if that is
        not enough (at once, evicting nothing, when ``nbytes`` exceeds the device or the
        limit).
        """
        self._check_open()
        nbytes = check_count("nbytes", nbytes)
        self._drain()
        npages = -(-nbytes // self.page_size)
        held = npages * self.page_size
        mem = self._device_alloc(held) if held else None
        pages = None
        try:
            _faults.point("alloc.device_allocated")
            pages = _Pages(npages, mem, held)
            # From here the buffer's finalizer owns the memory; until then, the except below.
            buf = Buffer(self, nbytes, npages, bool(purgeable), pages, next(self._ids))
            _faults.point("alloc.buffer_made")
            with self._lock:
                self._lru[buf.id] = _BufferRef(buf, self._graveyard.append, pages)
            return buf
        except BaseException:
            # Interrupted before the caller got the buffer: give the reservation back now, not
            # at some later collection (a Buffer made meanwhile is already unreachable; its
            # release finds nothing left to do).
            with self._lock:
                if pages is None:
                    self._device_bytes -= held
                elif pages.mem is not None:
                    self._device_bytes -= pages.held
                    pages.held, pages.mem = 0, None
            self._notify_released()
            raise

    def _device_alloc(self, nbytes: int) -> Any:
        """Device memory of ``nbytes``, reclaiming when the limit or the device is short.

        The bytes are reserved against ``device_limit`` under the lock before the real
        allocation, so concurrent allocations never take the manager past its limit.
        Against the limit only the LRU shrinker runs (its bytes are the manager's own); on
        a real device OOM every shrinker runs, and progress is what the device and the
        manager's accounting show released, not what shrinkers claim.  When nothing can be
        evicted now but other threads are releasing memory (an eviction in flight), this
        waits for it, up to ``reclaim_wait`` seconds."""
        limit = self.device_limit
        if nbytes > self._device_total:
            raise OutOfDeviceMemory(
                f"cannot allocate {nbytes:,} B on {self.backend.name}: larger than the whole "
                f"device ({self._device_total:,} B); nothing was evicted")
        if limit is not None and nbytes > limit:
            raise OutOfDeviceMemory(
                f"cannot allocate {nbytes:,} B: larger than device_limit={limit:,} B; nothing "
                f"was evicted")
        reserved = False
        # Shrinkers found lying or broken are asked a bounded number of times per
        # allocation, however often it reclaims while it waits.
        misbehaved: dict[int, int] = {}
        try:
            fruitless, deadline = 0, None
            while True:
                with self._lock:
                    over = 0 if limit is None else self._device_bytes + nbytes - limit
                    if over <= 0:
                        self._device_bytes += nbytes
                        reserved = True
                        self._peak = max(self._peak, self._device_bytes)
                        break
                    mark = self._release_gen
                _faults.point("alloc.reclaim")
                self._drain()
                # Only the LRU shrinker runs here: its bytes are the manager's own.
                if self._reclaimer.reclaim(over, [self._lru_shrinker], misbehaved=misbehaved) > 0:
                    fruitless = 0
                    continue
                fruitless += 1
                deadline = self._await_release(nbytes, 0, mark, fruitless, deadline,
                                               f"device_limit={limit:,} B reached")
            _faults.point("alloc.reserved")
            fruitless, deadline = 0, None
            while True:
                with self._lock:
                    mark = self._release_gen
                try:
                    mem = self.backend.alloc(nbytes)
                    # Let go of an earlier attempt's error: its traceback holds this frame,
                    # and through it ``mem``, until a garbage collection.
                    cause = None
                    break
                except Exception as e:
                    if not is_device_oom(e):
                        raise
                    cause = e
                _faults.point("alloc.device_reclaim")
                self._drain()   # collected buffers first: their memory is the cheapest to free
                if self._reclaimer.reclaim(nbytes, progress=self._device_progress(),
                                           misbehaved=misbehaved) > 0:
                    fruitless = 0
                    continue
                fruitless += 1
                try:
                    deadline = self._await_release(nbytes, nbytes, mark, fruitless, deadline,
                                                   str(cause))
                except OutOfDeviceMemory as oom:
                    raise oom from cause   # the allocator's own error, as the cause
            _faults.point("alloc.allocated")
            return mem
        except BaseException:
            if reserved:
                with self._lock:
                    self._device_bytes -= nbytes
            raise

    def _device_progress(self) -> Any:
        """Progress of a reclaim for a real device OOM: the fall of this manager's device
        bytes or the rise of the device's free memory, whichever is larger (an application
        cache frees device memory the manager does not account)."""
        base_held, base_free = self._device_bytes, self.backend.mem_info()[0]

        def progress() -> int:
            return max(base_held - self._device_bytes, self.backend.mem_info()[0] - base_free)
        return progress

    def _await_release(self, nbytes: int, own: int, mark: int, fruitless: int,
                       deadline: float | None, why: str) -> float:
        """A reclaim for ``nbytes`` freed nothing.  Raise :class:`OutOfDeviceMemory` unless
        device memory is on its way back (an eviction or release in flight, or a buffer
        inside another thread's access(), which ends without this thread's help): then wait
        for a release (on a condition, not a poll) and return the deadline of the whole
        wait.  Pins this thread holds itself are never waited for: that wait could only
        time out.  ``own``: bytes the caller has reserved itself; ``mark``:
        ``_release_gen`` before the reclaim."""
        if self._reclaimer.active:   # inside a shrinker: waiting could wait for itself
            raise self._oom(nbytes, why + " (allocating inside a shrinker: no reclaim)")
        with self._lock:
            in_transit, idle = self._in_transit(own)
            if in_transit or (idle and fruitless < 3):
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.reclaim_wait
                if now < deadline:
                    if in_transit:
                        # Short slices: a buffer whose eviction fails releases nothing.
                        self._awaiting += 1
                        try:
                            self._mem_freed.wait_for(lambda: self._release_gen != mark,
                                                     timeout=min(deadline - now, 0.05))
                        finally:
                            self._awaiting -= 1
                    return deadline
                why += f" (waited {self.reclaim_wait:g} s for memory other threads held)"
        raise self._oom(nbytes, why)

    def _in_transit(self, own: int) -> tuple[bool, bool]:
        """(some device bytes are being released or reserved by another thread now, or
        held by a buffer inside another thread's access(); some idle buffer could be
        evicted).  Caller holds the lock."""
        attached, moving, idle = 0, bool(self._graveyard), False
        for ref in self._lru.values():
            b = ref()
            if b is None:
                moving = True  # collected: its release is queued
                continue
            held = b._pages.held
            attached += held
            if not held:
                continue
            if b._pins:
                if b._pinned_elsewhere():
                    moving = True  # evictable once that thread's access() ends
            elif b._lock.locked():
                moving = True  # another thread is evicting or freeing it
            else:
                idle = True
        # Reservations of allocations and restores in flight on other threads.
        return moving or self._device_bytes - own > attached, idle

    def _oom(self, nbytes: int, why: str) -> OutOfDeviceMemory:
        bufs = self.buffers()
        pinned = sum(b.device_bytes for b in bufs if b.pinned)
        reclaimable = max(0, self._lru_shrinker.count())
        free, total = self.backend.mem_info()
        numbers = (f"pinned in access() {pinned:,} B, held {self._device_bytes:,} B, limit "
                   f"{_fmt_limit(self.device_limit)}, device free {free:,} of {total:,} B")
        # Buffers reclaim could free only by copying them out: if the store cannot take
        # even the smallest, the host side is the cause, not the device.
        copies = [b.device_bytes for b in bufs
                  if b.device_bytes and not b.pinned and not b.purgeable and not _is_clean(b)]
        avail = self.store.bytes_avail()
        if copies and avail < min(copies):
            host = host_memory.read(fresh=True)
            skipped = self._lru_shrinker.stats.get("skipped_host_full", 0)
            return OutOfDeviceMemory(
                f"cannot allocate {nbytes:,} B on {self.backend.name}: {why}; the store cannot "
                f"take the evictions that would free device memory: {len(copies)} idle "
                f"buffer(s) hold {sum(copies):,} B that need a copy (smallest {min(copies):,} B) "
                f"but the store ({getattr(self.store, 'kind', type(self.store).__name__)}) has "
                f"bytes_avail {avail:,} B of capacity {self.store.capacity:,} B (used "
                f"{self.store.bytes_used:,} B); host MemAvailable {host['available']:,} B, "
                f"swap free {host['swap_free']:,} B; reclaim skipped {skipped:,} buffer(s) "
                f"for a full host so far; asked {nbytes:,} B, {numbers}")
        return OutOfDeviceMemory(
            f"cannot allocate {nbytes:,} B on {self.backend.name}: {why}; asked {nbytes:,} B, "
            f"reclaimable {reclaimable:,} B, {numbers}")

    # ----------------------------------------------------------------- reclaim
    def shrink(self, nbytes: int) -> int:
        """Run the registered shrinkers (this manager's LRU buffer shrinker and any others)
        until ``nbytes`` of device memory are freed or none can make progress.  Returns
        the bytes freed.  Never blocks on a buffer another thread holds; called from inside
        a shrinker on the same thread, it returns 0 rather than recurse."""
        self._check_open()
        nbytes = check_count("nbytes", nbytes)
        self._drain()
        with self.backend.nvtx("gpu_backup.reclaim"):
            return self._reclaimer.reclaim(nbytes)

    def register_shrinker(self, shrinker: Shrinker) -> None:
        """Add a shrinker (``count()`` / ``scan(nr_to_scan)`` in bytes) to this manager's
        reclaim: an application cache that can drop entries, say."""
        self._reclaimer.register(shrinker)

    def unregister_shrinker(self, shrinker: Shrinker) -> None:
        self._reclaimer.unregister(shrinker)

    def cupy_allocator(self) -> contextlib.AbstractContextManager[None]:
        """Route every CuPy allocation in the program through a hook that, on out-of-memory
        on this manager's GPU (any allocator's form), runs the shrinkers and retries; then
        raises an error that is also ``cupy.cuda.memory.OutOfMemoryError``.  Hooks of
        several managers nest in any order; the allocator they replaced is back when the
        last one exits.  A thread inside ``cupy.cuda.using_allocator`` bypasses it (see
        :mod:`gpu_backup.device.cupy_hook`)::

            with mgr.cupy_allocator():
                x = cupy.empty(big)   # idle buffers give way if the GPU is full
        """
        self._check_open()
        return self._cupy_hook.active()

    # ---------------------------------------------------------------- evict
    def _evict(self, buf: Buffer, *, blocking: bool, wait: bool) -> int:
        if blocking:
            # The lock's own ``with`` (C-level): no interrupt falls between taking it and
            # the block that releases it.
            with buf._lock:
                return self._evict_held(buf, blocking=True, wait=wait)
        taken: list[Any] = []
        try:
            if not take_lock(buf._lock, taken):
                return 0
            return self._evict_held(buf, blocking=False, wait=wait)
        finally:
            if taken:
                taken[0].release()

    def _evict_held(self, buf: Buffer, *, blocking: bool, wait: bool) -> int:
        """Evict ``buf``, its lock held by the caller."""
        _faults.point("evict.locked")
        if buf.freed:
            raise BufferFreedError(f"buffer #{buf.id} was freed")
        if buf._pins:
            if blocking:
                raise BufferBusyError(f"cannot evict buffer #{buf.id}: inside access() in "
                                      f"{buf._pins} thread(s)")
            return 0
        p = buf._pages
        if p.mem is None:
            return 0
        if not wait and self._pager.busy(p):
            return 0
        self._check_open()
        with self.backend.activate(), self.backend.nvtx("gpu_backup.evict"):
            return self._evict_locked(buf, p)

    def _evict_locked(self, buf: Buffer, p: _Pages) -> int:
        return self._pager.evict(buf, p)

    def _release_mem(self, p: _Pages) -> int:
        return self._pager.release_mem(p)

    # -------------------------------------------------------------- restore
    def _make_resident(self, buf: Buffer, mode: str, user: Any) -> Any:
        """Make ``buf`` (pinned by the caller) current on the device for ``mode``."""
        self._check_open()
        return self._pager.make_resident(buf, mode, user)

    def _forget_backups(self, p: _Pages) -> None:
        self._pager.forget_backups(p)

    # --------------------------------------------------------- page movement glue
    def _count(self, **deltas: float) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._stats[k] += v

    def _released(self, nbytes: int) -> None:
        """The pager gave ``nbytes`` of device memory back: account them and wake the
        allocations waiting for a release."""
        with self._lock:
            self._device_bytes -= nbytes
        self._notify_released()

    def _swap_victim(self, target: Buffer, nbytes: int, taken: list[Any]) -> Buffer | None:
        """On a miss that the device limit cannot hold: the least recently used idle
        buffer that holds at least ``nbytes``, for the pager to evict while restoring
        ``target`` into its memory; its lock is put on ``taken`` (the caller releases it).
        None when there is room, or no buffer qualifies (then reclaim runs as usual)."""
        limit = self.device_limit
        if limit is None or self._device_bytes + nbytes <= limit:
            return None
        with self._lock:
            refs = list(self._lru.values())
        for ref in refs:
            b = ref()
            if (b is None or b is target or b._pins or b.purgeable or b._pages.mem is None
                    or not nbytes <= b._pages.held <= 2 * nbytes or self._pager.busy(b._pages)):
                continue
            if not take_lock(b._lock, taken):
                continue
            p = b._pages
            if b.freed or b._pins or p.mem is None or p.held < nbytes:
                return None   # changed since the look above (rare): the caller releases it
            return b
        return None

    def _zero_scan_on(self) -> bool:
        return self.zero_scan

    def _zero_scan_failed(self) -> None:
        self.zero_scan = False

    # ----------------------------------------------------------- bookkeeping
    def _touch(self, buf: Buffer) -> None:
        with self._lock:
            if buf.id in self._lru:
                self._lru.move_to_end(buf.id)

    def _reap_later(self, buf_id: int, p: _Pages) -> None:
        """The buffer's finalizer: nothing to do.  A collected buffer was queued already,
        by the callback of its weak reference in ``_lru`` (a Python-level finalizer can be
        cut short by a KeyboardInterrupt; that callback cannot)."""

    def _drain(self) -> None:
        """Release what collected buffers held, and drop again the store pages of failed
        drops.  Called at safe points (alloc, shrink, stats, close, ``device_bytes``).  An
        entry leaves the queue only once released, so an interrupt leaves it for the next
        drain (releasing is idempotent)."""
        if self._fork.inherited:
            return
        if self._pager._undropped:
            try:
                self._pager.retry_drops()
            except Exception as e:  # noqa: BLE001 - kept for the next safe point
                log.warning("dropping %d store pages failed again (%s: %s); retried later",
                            self._pager.undropped_pages, type(e).__name__, e)
        if not self._graveyard:
            return
        with self._drain_lock:
            while self._graveyard:
                ref = self._graveyard[0]
                self._reap(ref.buf_id, ref.pages)
                _faults.point("drain.reaped")
                self._graveyard.popleft()
        self._notify_released()

    def _reap(self, buf_id: int, p: _Pages) -> None:
        """Release a buffer's device memory and store pages (idempotent), then forget it."""
        self._pager.reap(buf_id, p)
        with self._lock:
            self._lru.pop(buf_id, None)

    # ------------------------------------------------------------- life cycle
    def _check_open(self) -> None:
        self._fork.check("BufferManager")
        if self._closed:
            raise ClosedError("BufferManager is closed")

    def close(self) -> None:
        """Free every buffer, stop the staging ring, close the store if owned.  Idempotent;
        after an interruption, calling it again finishes the job.

        In a forked child it only forgets the child's references: the store's pages are
        shared with the parent, and there are no copy threads to stop."""
        if self._finished:
            return
        self._closed = True   # new operations are refused from here on
        if self._fork.inherited:
            self._forget_inherited()
            return
        try:
            self._cupy_hook.uninstall()
            for buf in self.buffers():
                with buf._lock:
                    if buf._finalizer.alive:
                        # Released before the finalizer is detached: an interrupt between
                        # the two leaves a finalizer that finds nothing left to release.
                        self._reap(buf.id, buf._pages)
                        _faults.point("close.reaped")
                        buf._finalizer.detach()
            self._drain()
        finally:
            try:
                self._ring.close()
            finally:
                try:
                    if self._owns_store:
                        self.store.close()
                finally:
                    self.backend.close()
        self._finished = True

    def _forget_inherited(self) -> None:
        """close() in a forked child: drop references, release nothing shared."""
        with self._lock:
            refs = list(self._lru.values())
            self._lru.clear()
        for ref in refs:
            buf = ref()
            if buf is not None:
                buf._finalizer.detach()
        self._graveyard.clear()
        self._finished = True

    def __enter__(self) -> BufferManager:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _BufferRef(weakref.ref):  # type: ignore[type-arg]
    """A weak reference to a buffer that remembers what to release when it is collected."""

    __slots__ = ("buf_id", "pages")

    def __new__(cls, buf: Buffer, callback: Any, pages: _Pages) -> _BufferRef:
        return super().__new__(cls, buf, callback)

    def __init__(self, buf: Buffer, callback: Any, pages: _Pages) -> None:
        super().__init__(buf, callback)
        self.buf_id = buf.id
        self.pages = pages


def _fmt_limit(limit: int | None) -> str:
    return "none" if limit is None else f"{limit:,} B"


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else 0.0


def _resolve_limit(limit: int | float | None, total: int) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float, np.integer, np.floating)):
        raise TypeError(f"device_limit must be bytes (int) or a fraction (float), got {limit!r}")
    if isinstance(limit, (float, np.floating)):
        if not 0 < limit <= 1:
            raise ValueError(f"device_limit={limit} as a fraction must be in (0, 1]")
        return int(total * limit)
    if limit <= 0:
        raise ValueError(f"device_limit={limit:,} must be > 0 bytes")
    return int(limit)

"""Buffer objects: device memory with a page table that says where each page's bytes are."""

from __future__ import annotations

import contextlib
import enum
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _faults
from ._interrupts import deferred_interrupt
from .errors import BufferBusyError, BufferFreedError

if TYPE_CHECKING:
    from .manager import BufferManager

__all__ = ["Buffer", "Residency", "ZERO_PAGE", "PURGED_PAGE"]

ZERO_PAGE = -1
"""Page-table value: the page is known to be all zero (restored with a memset)."""
PURGED_PAGE = -2
"""Page-table value: the page of a purgeable buffer was discarded."""

_MODES = ("r", "w", "rw")


class Residency(enum.Enum):
    RESIDENT = "resident"   # every page's current bytes are on the device
    EVICTED = "evicted"     # no device memory; every page is in the store (or zero)
    PARTIAL = "partial"     # an eviction or restore is part-way (or was interrupted)
    PURGED = "purged"       # a purgeable buffer was discarded; its contents are gone


class _Pages:
    """What a buffer owns: its device allocation and its store handles.

    ``table[i]``: > 0 a store handle holding page i; 0 none; ZERO_PAGE; PURGED_PAGE.
    ``valid[i]``: the device copy of page i is current (only with ``mem`` present).
    At every instant each page is valid, or has a complete store copy, or is zero
    (or purged): invariant 1.
    """

    __slots__ = ("mem", "table", "valid", "held", "uses", "evicting", "plain", "last", "fresh",
                 "staged", "__weakref__")

    def __init__(self, npages: int, mem: Any, held: int) -> None:
        self.mem = mem
        self.table = np.zeros(npages, np.int64)
        self.valid = np.ones(npages, bool)
        self.held = held            # device bytes held by mem
        self.uses = Uses()          # events recorded on the users' streams after each access
        self.evicting = False       # an eviction started and has not completed
        # mem present, every page valid, no store copies or zero marks: access has nothing
        # to do (kept so that access of a resident buffer costs no scan of the page table)
        self.plain = mem is not None or npages == 0
        # Until they complete, ``mem`` may not be released (nor, for ``fresh``, used on
        # another stream): the last copy the pipeline enqueued on it, and the allocation
        # guard of a block taken from the pool of the allocating thread's current stream.
        self.last: Any = None
        self.fresh: Any = None
        # Store handles reserved for an eviction in progress, owned here from the step that
        # reserves them: those the table has not taken when it stops are dropped (by the
        # eviction, or by the next step that drops table handles, whatever interrupted it).
        self.staged: np.ndarray | None = None


class Uses:
    """The events recorded after accesses whose work may still be pending.

    Eviction must follow every one of them, not only the latest: accesses on two
    streams (or from two threads at once) end in any order.
    """

    __slots__ = ("_events",)

    def __init__(self) -> None:
        self._events: list[Any] = []

    def add(self, event: Any) -> None:
        self._events = [e for e in self._events if not e.done]
        self._events.append(event)

    def pending(self) -> list[Any]:
        self._events = [e for e in self._events if not e.done]
        return list(self._events)

    @property
    def busy(self) -> bool:
        return bool(self.pending())

    def synchronize(self) -> None:
        """Wait (on the host) for every pending use."""
        for e in self.pending():
            e.synchronize()
        self._events = []

    def clear(self) -> None:
        self._events = []


class Buffer:
    """A buffer object in device memory that may be evicted to the host store and restored.

    Made by :meth:`BufferManager.alloc`.  Use its bytes inside :meth:`access`; outside
    it the manager (or its shrinker) may evict the buffer at any time.  ``free()``
    returns its device memory and store pages (garbage collection does the same).
    """

    __slots__ = ("_mgr", "nbytes", "npages", "purgeable", "_pages", "_lock", "_pins",
                 "_pinners", "_finalizer", "id", "__weakref__")

    def __init__(self, mgr: BufferManager, nbytes: int, npages: int, purgeable: bool,
                 pages: _Pages, buf_id: int) -> None:
        self._mgr = mgr
        self.nbytes = nbytes
        self.npages = npages
        self.purgeable = purgeable
        self._pages = pages
        self._lock = threading.Lock()   # held while pages move; the shrinker only try-locks
        self._pins = 0                  # threads inside access()
        self._pinners: dict[int, int] = {}  # thread ident -> its pins (sum == _pins)
        self.id = buf_id
        if pages.mem is not None and pages.fresh is None:
            pages.fresh = mgr.backend.mark_current()
        # Garbage collection only queues the release (it may run on a thread that holds
        # any lock); the manager performs it at its next safe point.
        self._finalizer = weakref.finalize(self, mgr._reap_later, buf_id, pages)

    def __repr__(self) -> str:
        if not self._finalizer.alive:
            return f"<Buffer #{self.id} {self.nbytes:,} B freed>"
        return f"<Buffer #{self.id} {self.nbytes:,} B {self.state.value}>"

    # ------------------------------------------------------------------ state
    @property
    def freed(self) -> bool:
        return not self._finalizer.alive

    @property
    def state(self) -> Residency:
        p = self._pages
        if self.npages == 0:
            return Residency.RESIDENT  # nothing to evict, ever
        if p.mem is None:
            if (p.table == PURGED_PAGE).any():
                return Residency.PURGED
            return Residency.EVICTED
        if p.evicting or not p.valid.all():
            return Residency.PARTIAL
        return Residency.RESIDENT

    @property
    def resident_bytes(self) -> int:
        """Bytes of this buffer whose current copy is on the device."""
        p = self._pages
        if p.mem is None:
            return 0
        return min(self.nbytes, int(np.count_nonzero(p.valid)) * self._mgr.page_size)

    @property
    def device_bytes(self) -> int:
        """Device memory this buffer holds now (whole pages)."""
        return self._pages.held

    @property
    def pinned(self) -> bool:
        """True while some thread is inside :meth:`access`."""
        return self._pins > 0

    def page_table(self) -> np.ndarray:
        """A copy of the page table (handles > 0, 0 = device only, negatives reserved)."""
        return self._pages.table.copy()

    # ------------------------------------------------------------------ verbs
    def evict(self) -> int:
        """Move this buffer's pages to the store and free its device memory.

        Returns the device bytes freed (0 if already evicted).  Waits (on the copy
        stream, not the device) for the last recorded use.  Purgeable buffers are
        discarded instead.  Raises :class:`BufferBusyError` inside ``access()``.
        """
        self._mgr._check_open()
        return self._mgr._evict(self, blocking=True, wait=True)

    @contextlib.contextmanager
    def access(self, mode: str = "rw", *, stream: Any = None) -> Iterator[Any]:
        """Use the buffer's bytes: yields a 1-D uint8 array of ``nbytes`` over device memory
        (``cupy.ndarray`` on cuda, ``numpy.ndarray`` on host), restoring first if needed.

        mode
            ``"r"``: read only; a store copy is kept, so evicting the unchanged buffer
            again costs no copy.  ``"w"``: the caller overwrites every byte; nothing is
            restored.  ``"rw"``: read and write.
        stream
            The stream the caller's work runs on (default: the current stream).  It waits
            for the restore; on exit an event is recorded on it, and eviction waits for
            that event on the copy stream.

        While any thread is inside, the buffer is never evicted.  The array must not be
        used after the block ends, nor kept: a live reference to it keeps the device
        memory allocated (as any CuPy array does) after the buffer is evicted.
        """
        if mode not in _MODES:
            raise ValueError(f"mode={mode!r} must be one of {_MODES}")
        mgr = self._mgr
        mgr._check_open()   # closed (or inherited through fork) says so, not "freed"
        user = mgr.backend.user_stream(stream)
        if not callable(getattr(user, "wait_event", None)):
            raise TypeError(f"stream must be a {mgr.backend.name} stream (or None for the "
                            f"current one), got {type(stream).__name__} {stream!r}")
        pinned = used = False
        me = threading.get_ident()
        event = None
        try:
            # The pin and the flag that says to take it back change in one step: a Ctrl-C
            # between them would leave the buffer pinned (never evicted nor freed) for good.
            with self._lock:      # (waited for outside the deferral: Ctrl-C stays live)
                if self.freed:
                    raise BufferFreedError(f"buffer #{self.id} ({self.nbytes:,} B) was freed")
                with deferred_interrupt():
                    self._pins += 1   # from here on the buffer is neither evicted nor freed
                    self._pinners[me] = self._pinners.get(me, 0) + 1
                    pinned = True
            _faults.point("access.pinned")
            mem = mgr._make_resident(self, mode, user)
            mgr._touch(self)
            with mgr.backend.activate():   # the buffer's GPU is current for the caller's work
                used = True
                yield mgr.backend.array(mem, self.nbytes)
        finally:
            if pinned:
                try:
                    if used:
                        with deferred_interrupt():
                            event = mgr.backend.record(user)
                finally:
                    # The pin goes first, under the lock's own (C-level) ``with`` and with
                    # no call before it: no Ctrl-C can keep the buffer pinned.  Eviction
                    # needs this lock, so the use's event still joins the pending uses
                    # before any eviction can look at them.
                    with self._lock:
                        self._pins -= 1
                        left = self._pinners[me] - 1
                        if left:
                            self._pinners[me] = left
                        else:
                            del self._pinners[me]
                        if used:
                            if event is None:   # a Ctrl-C took the first one
                                event = mgr.backend.record(user)
                            self._pages.uses.add(event)
                # An allocation on another thread may be waiting for this buffer to become
                # evictable (see BufferManager._await_release).
                if not self._pins and mgr._awaiting:
                    mgr._notify_released()

    def _pinned_elsewhere(self) -> bool:
        """True while a thread other than the caller is inside :meth:`access`: that pin
        ends without the caller's help, so waiting for it cannot wait for oneself."""
        return self._pins > self._pinners.get(threading.get_ident(), 0)

    def free(self) -> None:
        """Return the device memory and store pages now.  Idempotent."""
        if self._mgr._fork.inherited:   # a forked child: forget, never release the parent's pages
            self._finalizer.detach()
            return
        with self._lock:
            if self._pins:
                raise BufferBusyError(f"buffer #{self.id} is inside access() in {self._pins} thread(s)")
            if self._finalizer.alive:
                # Released, then marked freed: an interrupt in between leaves a free() to
                # call again (releasing twice is harmless), never a buffer marked freed
                # that still holds memory.
                self._mgr._reap(self.id, self._pages)
                self._finalizer.detach()

    def to_host(self) -> np.ndarray:
        """A host copy of the buffer's bytes (restores it if needed; for tests and debugging)."""
        self._mgr._check_open()
        if self.npages == 0:
            if self.freed:
                raise BufferFreedError(f"buffer #{self.id} ({self.nbytes:,} B) was freed")
            return np.empty(0, np.uint8)
        self._pages.uses.synchronize()  # the users' work on it has finished
        with self.access("r"):
            return self._mgr.backend.to_host(self._pages.mem, self.nbytes)

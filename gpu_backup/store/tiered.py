"""``TieredStore``: host memory first, disk behind it (the seed's writeback to a user fd).

Handles are logical.  An indirection table maps each to a slot of the fast store
(``> 0``) or of the slow one (``< 0``), so pages can move between tiers without the
page tables that hold the handles ever changing.  When the fast store cannot take a
backup (its cap, or host memory, runs short) the oldest pages move to disk first.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from typing import Any

import numpy as np

from .. import _faults
from .._fork import ForkGuard
from .._runs import expand_runs, runs_of
from ..errors import ClosedError, InvalidHandleError, StoreFullError
from ._base import backup_pages
from ._checks import as_bytes, as_handles, check_count, reject_duplicates
from ._extents import ExtentSet
from ._workers import deferred_interrupt
from .protocol import PageStore

__all__ = ["TieredStore"]

_CHUNK = 16 << 20  # demotion moves pages through a bounce buffer of this size

log = logging.getLogger("gpu_backup.store")


class TieredStore:
    """Two page stores as one: ``fast`` (a :class:`ShmemStore`) and ``slow`` (a
    :class:`FileStore`).  Owns both (``close()`` closes them).

    Parameters
    ----------
    fast, slow
        Stores of the same page size.
    low_watermark
        After a backup, if the fast store has less than this many bytes available,
        its oldest pages move to disk until it has (default: 0, demote only when full).

    Operations are serialised by one lock (a page may move between tiers at any time);
    copies within a tier still use that store's threads.  A demotion that fails (an I/O
    error on disk) leaves every page where it was, readable, and is tried again by the
    next demotion; fast-tier pages whose drop failed after a move are dropped later.
    """

    kind = "tiered"

    def __init__(self, fast: PageStore, slow: PageStore, *, low_watermark: int = 0) -> None:
        for name, tier in (("fast", fast), ("slow", slow)):
            if getattr(tier, "closed", False) is True:
                raise ValueError(f"{name} store {tier!r} is closed")
            if not isinstance(tier, PageStore):
                raise TypeError(f"{name} must be a page store, got {type(tier).__name__}")
        if fast.page_size != slow.page_size:
            raise ValueError(f"tier page sizes differ: fast {fast.page_size:,}, slow {slow.page_size:,}")
        self.fast, self.slow = fast, slow
        self.page_size = fast.page_size
        self.npages = fast.npages + slow.npages
        self.low_watermark = check_count("low_watermark", low_watermark)
        self._loc = np.zeros(self.npages, np.int64)    # logical index -> +fast / -slow handle
        self._age = np.zeros(self.npages, np.int64)    # backup sequence number, for demotion
        self._seq = itertools.count(1)
        # Allocation batches, oldest first: (sequence number, logical indices).  Demotion
        # takes from the left; entries whose pages were dropped, reused (a newer age) or
        # already moved are skipped, so nothing here needs updating on drop.
        self._fifo: deque[tuple[int, np.ndarray]] = deque()
        self._ids = ExtentSet()
        self._ids.add(0, self.npages)
        self._lock = threading.RLock()
        self._closed = False
        self._guard = ForkGuard()
        self._orphans: list[np.ndarray] = []   # fast-tier handles moved to disk, drop failed
        self.stats_demoted_pages = 0

    def __repr__(self) -> str:
        return f"<TieredStore fast={self.fast!r} slow={self.slow!r}>"

    # ------------------------------------------------------------- properties
    @property
    def capacity(self) -> int:
        return self.npages * self.page_size

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def bytes_used(self) -> int:
        return self.fast.bytes_used + self.slow.bytes_used

    @property
    def bytes_resident(self) -> int:
        """Host memory taken by the fast tier (the slow tier's pages are on disk)."""
        return self.fast.bytes_resident

    def bytes_avail(self) -> int:
        self._check_open()
        return self.fast.bytes_avail() + self.slow.bytes_avail()

    def stats(self) -> dict[str, int]:
        out = {f"fast_{k}": v for k, v in self.fast.stats().items()}
        out.update({f"slow_{k}": v for k, v in self.slow.stats().items()})
        out["demoted_pages"] = self.stats_demoted_pages
        return out

    # ----------------------------------------------------------------- API
    def alloc(self, npages: int, *, populate: bool = True) -> np.ndarray:
        npages = check_count("npages", npages)
        with self._lock:
            self._check_open()
            self._drop_orphans()
            if npages > self._ids.total:
                raise StoreFullError(f"cannot store {npages * self.page_size:,} B: "
                                     f"{self._ids.total * self.page_size:,} B free in both tiers")
            try:
                phys = self.fast.alloc(npages, populate=populate)
            except StoreFullError:
                self._demote(npages * self.page_size - self.fast.bytes_avail())
                try:
                    phys = self.fast.alloc(npages, populate=populate)
                except StoreFullError:
                    phys = self._alloc_split(npages, populate)
            try:
                _faults.point("store.tiered.alloc.reserved")
                with deferred_interrupt():
                    runs = self._ids.take(npages)
                    ids = expand_runs(np.array([s for s, _ in runs], np.int64),
                                      np.array([n for _, n in runs], np.int64))
                    self._loc[ids] = phys
                    seq = next(self._seq)
                    self._age[ids] = seq
                    self._fifo.append((seq, ids))
            except BaseException:
                self._free_phys(phys)
                raise
            if self.low_watermark and self.fast.bytes_avail() < self.low_watermark:
                try:
                    self._demote(self.low_watermark - self.fast.bytes_avail())
                except Exception as e:  # noqa: BLE001 - the pages are stored; demote later
                    log.warning("demoting to keep %s B free in the fast tier failed (%s); "
                                "a later allocation tries again",
                                f"{self.low_watermark:,}", str(e))
                except BaseException:
                    self.drop(ids + 1)
                    raise
            return ids + 1

    def _alloc_split(self, npages: int, populate: bool) -> np.ndarray:
        """What the fast tier can take, the rest on disk; all or nothing."""
        n_fast = min(npages, self.fast.bytes_avail() // self.page_size)
        fast = self.fast.alloc(n_fast, populate=populate) if n_fast else np.empty(0, np.int64)
        try:
            slow = self.slow.alloc(npages - n_fast, populate=populate)
        except BaseException:
            self.fast.drop(fast)
            raise
        return np.concatenate([fast, -slow])

    def write(self, handles: Any, data: Any) -> None:
        src = as_bytes(data, "data", writable=False)
        with self._lock:
            loc = self._lookup(handles, "write")
            if src.shape[0] != loc.size * self.page_size:
                raise ValueError(f"write: data is {src.shape[0]:,} B but {loc.size:,} handles of "
                                 f"{self.page_size:,} B need {loc.size * self.page_size:,} B")
            rows = src.reshape(loc.size, self.page_size)
            fast = loc > 0
            if fast.all():
                self.fast.write(loc, src)
            elif not fast.any():
                self.slow.write(-loc, src)
            else:
                self.fast.write(loc[fast], np.ascontiguousarray(rows[fast]))
                self.slow.write(-loc[~fast], np.ascontiguousarray(rows[~fast]))

    def backup(self, data: Any, *, writeback: bool = False) -> np.ndarray:
        return backup_pages(self, data, writeback)

    def read(self, handles: Any, out: Any) -> None:
        dst = as_bytes(out, "out", writable=True)
        with self._lock:
            loc = self._lookup(handles, "read")
            if dst.shape[0] != loc.size * self.page_size:
                raise ValueError(f"read: out is {dst.shape[0]:,} B but {loc.size:,} handles of "
                                 f"{self.page_size:,} B need {loc.size * self.page_size:,} B")
            fast = loc > 0
            if fast.all():
                self.fast.read(loc, dst)
            elif not fast.any():
                self.slow.read(-loc, dst)
            else:
                rows = dst.reshape(loc.size, self.page_size)
                for mask, store, phys in ((fast, self.fast, loc), (~fast, self.slow, -loc)):
                    tmp = np.empty(int(mask.sum()) * self.page_size, np.uint8)
                    store.read(phys[mask], tmp)
                    rows[mask] = tmp.reshape(-1, self.page_size)

    def drop(self, handles: Any) -> None:
        with self._lock:
            loc = self._lookup(handles, "drop")
            idx = np.sort(as_handles(handles)) - 1
            _faults.point("store.tiered.drop.begin")
            # Table first: the logical handles are free once the tiers' pages are
            # handed to them; a tier that fails to drop keeps them on the orphan list.
            with deferred_interrupt():
                self._loc[idx] = 0
                starts, lengths, _ = runs_of(idx)
                for s, n in zip(starts.tolist(), lengths.tolist()):
                    self._ids.add(s, n)
                self._free_phys(loc)

    def writeback(self, handles: Any) -> bool:
        """Move these pages to disk now."""
        with self._lock:
            loc = self._lookup(handles, "writeback")
            self._drop_orphans()
            idx = as_handles(handles) - 1
            self._move(np.sort(idx[loc > 0]))
            return True

    def prefault(self, nbytes: int) -> int:
        return self.fast.prefault(nbytes)

    def trim(self) -> int:
        with self._lock:
            self._check_open()
            self._drop_orphans()
        return self.fast.trim() + self.slow.trim()

    def demote(self, nbytes: int) -> int:
        """Move the oldest fast-tier pages to disk until ``nbytes`` are free there.
        Returns the bytes moved."""
        with self._lock:
            self._check_open()
            self._drop_orphans()
            return self._demote(check_count("nbytes", nbytes))

    def close(self) -> None:
        """Close both tiers (idempotent).  In a forked child only the child's references
        go: nothing of the parent's pages is touched."""
        if self._guard.inherited:
            self._closed = True
        else:
            with self._lock:
                if self._closed:
                    return
                if not self.fast.closed:
                    try:
                        self._drop_orphans()
                    except Exception as e:  # noqa: BLE001 - the tiers close anyway
                        log.warning("dropping moved pages at close failed: %s", str(e))
                self._closed = True
        self.fast.close()
        self.slow.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ internals
    def _check_open(self) -> None:
        self._guard.check("TieredStore")
        if self._closed:
            raise ClosedError("TieredStore is closed")

    def _free_phys(self, loc: np.ndarray) -> None:
        """Drop tier handles (``> 0`` fast, ``< 0`` slow); what a tier refuses or fails to
        drop goes on the orphan list, retried by the next alloc, trim or close."""
        parts = [p for p in (loc[loc > 0], loc[loc < 0]) if p.size]
        for k, part in enumerate(parts):
            try:
                (self.fast if part[0] > 0 else self.slow).drop(np.abs(part))
            except BaseException:
                self._orphans.extend(parts[k:])
                raise

    def _drop_orphans(self) -> None:
        """Retry the drops that failed.  Runs before anything allocates in a tier, so an
        orphan's slots cannot have been handed out again: a tier that says they are not
        live dropped them already (an interrupt after its drop took effect)."""
        orphans, self._orphans = self._orphans, []
        for k, part in enumerate(orphans):
            try:
                (self.fast if part[0] > 0 else self.slow).drop(np.abs(part))
            except InvalidHandleError:
                continue
            except BaseException:
                self._orphans.extend(orphans[k:])
                raise

    def _lookup(self, handles: Any, what: str) -> np.ndarray:
        self._check_open()
        h = as_handles(handles)
        reject_duplicates(h, what)
        idx = h - 1
        bad = (idx < 0) | (idx >= self.npages)
        if bad.any():
            raise InvalidHandleError(f"{what}: handle {int(h[bad][0])} is out of range 1..{self.npages}")
        loc = self._loc[idx]
        dead = loc == 0
        if dead.any():
            raise InvalidHandleError(f"{what}: handle {int(h[dead][0])} is not live: never handed "
                                     f"out or already dropped ({int(dead.sum())} of {h.size} handles)")
        return loc

    def _demote(self, nbytes: int) -> int:
        want = -(-max(0, int(nbytes)) // self.page_size)
        if want == 0:
            return 0
        want = min(want, self.slow.bytes_avail() // self.page_size)
        picked: list[np.ndarray] = []
        taken: list[tuple[int, np.ndarray]] = []    # fifo entries as they were, oldest first
        while want > 0 and self._fifo:
            seq, ids = self._fifo[0]
            live = ids[(self._age[ids] == seq) & (self._loc[ids] > 0)]
            take = live[:want]
            taken.append((seq, ids))
            if take.size:
                picked.append(take)
                want -= take.size
            if take.size == live.size:
                self._fifo.popleft()
            else:
                self._fifo[0] = (seq, live[take.size:])
        if not picked:
            return 0
        try:
            return self._move(np.sort(np.concatenate(picked)))
        except BaseException:
            # Put the entries back: the pages still in the fast tier are demoted again by
            # a later call (moved ones are skipped, their location is < 0 now).
            if taken and self._fifo and self._fifo[0][0] == taken[-1][0]:
                self._fifo.popleft()
            self._fifo.extendleft(reversed(taken))
            raise

    def _move(self, idx: np.ndarray) -> int:
        """Copy logical pages ``idx`` from the fast tier to the slow one, then free them
        there.  Chunk by chunk, each all or nothing: a failure leaves every page readable
        in one tier (the table is switched before the fast pages are dropped)."""
        per = max(1, _CHUNK // self.page_size)
        bounce = np.empty(min(idx.size, per) * self.page_size, np.uint8)
        for k in range(0, idx.size, per):
            part = idx[k:k + per]
            view = bounce[:part.size * self.page_size]
            old = self._loc[part]
            self.fast.read(old, view)
            new = self.slow.backup(view)     # all or nothing
            try:
                _faults.point("store.tiered.demote.copied")
            except BaseException:
                self.slow.drop(new)
                raise
            with deferred_interrupt():
                self._loc[part] = -new
                self.stats_demoted_pages += part.size
            self._free_phys(old)
        return idx.size * self.page_size

"""``TieredStore``: host memory first, disk behind it (the seed's writeback to a user fd).

Handles are logical.  An indirection table maps each to a slot of the fast store
(``> 0``) or of the slow one (``< 0``), so pages can move between tiers without the
page tables that hold the handles ever changing.  When the fast store cannot take a
backup (its cap, or host memory, runs short) the oldest pages move to disk first.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from typing import Any

import numpy as np

from .._runs import expand_runs, runs_of
from ..errors import ClosedError, InvalidHandleError, StoreFullError
from ._base import as_bytes, as_handles, backup_pages
from ._extents import ExtentSet
from .protocol import PageStore

__all__ = ["TieredStore"]

_CHUNK = 16 << 20  # demotion moves pages through a bounce buffer of this size


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
    copies within a tier still use that store's threads.
    """

    kind = "tiered"

    def __init__(self, fast: PageStore, slow: PageStore, *, low_watermark: int = 0) -> None:
        if fast.page_size != slow.page_size:
            raise ValueError(f"tier page sizes differ: fast {fast.page_size:,}, slow {slow.page_size:,}")
        self.fast, self.slow = fast, slow
        self.page_size = fast.page_size
        self.npages = fast.npages + slow.npages
        self.low_watermark = int(low_watermark)
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
        npages = int(npages)
        if npages < 0:
            raise ValueError(f"{npages=} must be >= 0")
        with self._lock:
            self._check_open()
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
            runs = self._ids.take(npages)
            ids = expand_runs(np.array([s for s, _ in runs], np.int64),
                              np.array([n for _, n in runs], np.int64))
            self._loc[ids] = phys
            seq = next(self._seq)
            self._age[ids] = seq
            self._fifo.append((seq, ids))
            if self.low_watermark and self.fast.bytes_avail() < self.low_watermark:
                self._demote(self.low_watermark - self.fast.bytes_avail())
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
            if idx.size and (np.diff(idx) == 0).any():
                raise InvalidHandleError("drop: a handle appears more than once")
            fast = loc > 0
            if fast.any():
                self.fast.drop(loc[fast])
            if (~fast).any():
                self.slow.drop(-loc[~fast])
            self._loc[idx] = 0
            starts, lengths, _ = runs_of(idx)
            for s, n in zip(starts.tolist(), lengths.tolist()):
                self._ids.add(s, n)

    def writeback(self, handles: Any) -> bool:
        """Move these pages to disk now."""
        with self._lock:
            loc = self._lookup(handles, "writeback")
            idx = np.asarray(handles, np.int64) - 1
            self._move(idx[loc > 0])
            return True

    def prefault(self, nbytes: int) -> int:
        return self.fast.prefault(nbytes)

    def trim(self) -> int:
        return self.fast.trim() + self.slow.trim()

    def demote(self, nbytes: int) -> int:
        """Move the oldest fast-tier pages to disk until ``nbytes`` are free there.
        Returns the bytes moved."""
        with self._lock:
            self._check_open()
            return self._demote(nbytes)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.fast.close()
        self.slow.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("TieredStore is closed")

    def _lookup(self, handles: Any, what: str) -> np.ndarray:
        self._check_open()
        h = as_handles(handles)
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
        while want > 0 and self._fifo:
            seq, ids = self._fifo[0]
            live = ids[(self._age[ids] == seq) & (self._loc[ids] > 0)]
            take = live[:want]
            if take.size:
                picked.append(take)
                want -= take.size
            if take.size == live.size:
                self._fifo.popleft()
            else:
                self._fifo[0] = (seq, live[take.size:])
        if not picked:
            return 0
        return self._move(np.sort(np.concatenate(picked)))

    def _move(self, idx: np.ndarray) -> int:
        """Copy logical pages ``idx`` from the fast tier to the slow one, then free them there."""
        per = max(1, _CHUNK // self.page_size)
        bounce = np.empty(min(idx.size, per) * self.page_size, np.uint8)
        for k in range(0, idx.size, per):
            part = idx[k:k + per]
            view = bounce[:part.size * self.page_size]
            old = self._loc[part]
            self.fast.read(old, view)
            new = self.slow.backup(view)     # all or nothing
            self._loc[part] = -new
            self.fast.drop(old)
            self.stats_demoted_pages += part.size
        return idx.size * self.page_size

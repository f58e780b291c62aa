"""The pinned staging ring and the copy pipeline between device memory and the store.

Eviction, per piece (a run of consecutive pages no larger than one slot)::

    copy stream: wait(last use) -> D2H into a free slot -> record event
    worker:      wait(event) -> store.write(slot) -> slot free again
    caller:      commit(pages, handles) once the piece is in the store

Restore runs the other way: a worker reads store -> slot and enqueues the H2D;
the slot becomes reusable when that copy's event completes; the caller commits
a piece (marks its pages valid, drops or keeps the backup) once its H2D is done.

Either direction may fail or be interrupted part-way: every piece in flight is
settled first (a slot is never reused, nor device memory released, while a copy
still touches it), finished pieces stay committed, and unwritten store slots are
dropped.  The caller's page table is therefore always consistent and the
operation can simply be run again to finish.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._check import check_count
from ._runs import runs_of
from .errors import ClosedError, CopyError
from .store.protocol import PageStore

__all__ = ["Staging", "StagingRing", "pieces"]


@dataclass(frozen=True)
class Staging:
    """Shape of the pinned staging ring.

    slots
        Number of pinned slots (allocated once, reused for every copy).
    slot_bytes
        Bytes per slot; the largest single copy.  Copies of 1-2 MiB and up run near
        link speed; 16 MiB amortises per-copy costs fully.
    threads
        Host copy workers (slot <-> store), overlapped with the device copies.
    """

    slots: int = 4
    slot_bytes: int = 16 << 20
    threads: int = 2

    def __post_init__(self) -> None:
        # ints only: a float (1.5e6) would be truncated silently, or fail deep in a copy
        for name, minimum in (("slots", 1), ("slot_bytes", 1), ("threads", 1)):
            object.__setattr__(self, name, check_count(getattr(self, name), f"Staging.{name}",
                                                       minimum=minimum))


def pieces(pages: np.ndarray, max_pages: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut sorted page indices into pieces: runs of consecutive pages, each at most
    ``max_pages`` long.  Returns ``(offsets, counts)`` into ``pages``; vectorised."""
    _, lengths, offsets = runs_of(pages)
    if lengths.size == 0 or (lengths.size == 1 and lengths[0] <= max_pages):
        return offsets, lengths
    per_run = -(-lengths // max_pages)
    run = np.repeat(np.arange(lengths.size), per_run)
    first = np.cumsum(per_run) - per_run
    k = np.arange(per_run.sum()) - np.repeat(first, per_run)
    return offsets[run] + k * max_pages, np.minimum(max_pages, lengths[run] - k * max_pages)


class _Slot:
    __slots__ = ("owner", "view", "event")

    def __init__(self, owner: Any, view: np.ndarray) -> None:
        self.owner = owner          # keeps the pinned block alive
        self.view = view
        self.event: Any = None      # last device copy that reads this slot


class StagingRing:
    """A fixed set of pinned slots and the host copy workers.  Owns both.

    A slot is handed out only when free: no host copy uses it and its last device
    copy has completed.
    """

    def __init__(self, backend: Any, store: PageStore, config: Staging, page_size: int) -> None:
        slot_pages = config.slot_bytes // page_size
        if slot_pages < 1:
            raise ValueError(f"staging slot_bytes={config.slot_bytes:,} is smaller than one page "
                             f"(page_size={page_size:,})")
        self.backend = backend
        self.store = store
        self.config = config
        self.page_size = page_size
        self.slot_pages = slot_pages
        self.slot_bytes = slot_pages * page_size
        self._cond = threading.Condition()
        self._free: deque[_Slot] = deque()
        self._slots: list[_Slot] = []
        for _ in range(config.slots):
            owner, view = backend.pinned(self.slot_bytes)
            self._slots.append(_Slot(owner, view))
        self._free.extend(self._slots)
        self._pool = ThreadPoolExecutor(config.threads, thread_name_prefix="gpu_backup-staging")
        self._closed = False

    def _acquire(self) -> _Slot:
        with self._cond:
            while not self._free:
                if self._closed:
                    raise ClosedError("staging ring is closed")
                self._cond.wait()
            slot = self._free.popleft()
        if slot.event is not None:
            try:
                slot.event.synchronize()
            except BaseException:
                self._release(slot, slot.event)  # back to the ring, still guarded by its event
                raise
            slot.event = None
        return slot

    def _release(self, slot: _Slot, event: Any = None) -> None:
        slot.event = event
        with self._cond:
            self._free.append(slot)
            self._cond.notify()

    # ------------------------------------------------------------- eviction
    def evict(self, mem: Any, pages: np.ndarray, handles: np.ndarray, *, after: list[Any],
              commit: Callable[[np.ndarray, np.ndarray], None]) -> None:
        """Copy ``pages`` (sorted indices) of device allocation ``mem`` into the store slots
        ``handles`` (already allocated, one per page).  ``after``: events the copies must
        follow (the buffer's pending uses).  ``commit(pages, handles)`` runs on this thread
        for each piece once its bytes are complete in the store.

        On failure, raises after settling every piece.  Handles of pieces not committed are
        the caller's to drop (the caller's page table says which)."""
        stream = self.backend.copy_stream
        for event in after:
            stream.wait_event(event)
        offs, counts = pieces(pages, self.slot_pages)
        ps = self.page_size

        def to_store(slot: _Slot, event: Any, h: np.ndarray, view: np.ndarray) -> None:
            try:
                with self.backend.activate():  # no stray context on another GPU
                    event.synchronize()
                self.store.write(h, view)
            finally:
                # With its copy's event: if the wait above was interrupted, the copy may
                # still be writing into the slot, and the next user must wait for it.
                self._release(slot, event)

        def launch(k: int) -> Future[None]:
            o, n = int(offs[k]), int(counts[k])
            slot = self._acquire()
            try:
                view = slot.view[:n * ps]
                self.backend.d2h(view, mem, int(pages[o]) * ps, stream)
                event = self.backend.record(stream)
                return self._submit(len(offs) == 1, to_store, slot, event, handles[o:o + n], view)
            except BaseException:
                self._release(slot, self.backend.record(stream))
                raise

        def done(k: int, _: None) -> None:
            o, n = int(offs[k]), int(counts[k])
            commit(pages[o:o + n], handles[o:o + n])

        _, error = self._run(len(offs), launch, done)
        if error is not None:
            raise error

    # --------------------------------------------------------------- restore
    def restore(self, mem: Any, pages: np.ndarray, handles: np.ndarray, *,
                commit: Callable[[np.ndarray, np.ndarray], None]) -> Any:
        """Copy the store pages ``handles`` back into ``pages`` of ``mem``.
        ``commit(pages, handles)`` runs on this thread for each piece once its bytes are on
        the device.  Returns an event on the copy stream after the last copy.
        On failure, raises after settling every piece; uncommitted pieces keep their handles."""
        stream = self.backend.copy_stream
        offs, counts = pieces(pages, self.slot_pages)
        ps = self.page_size
        backend = self.backend

        def from_store(slot: _Slot, o: int, n: int) -> Any:
            view = slot.view[:n * ps]
            event = None
            try:
                self.store.read(handles[o:o + n], view)
                with backend.activate():
                    backend.h2d(mem, int(pages[o]) * ps, view, stream)
                    event = self.backend.record(stream)
                return event
            finally:
                self._release(slot, event)

        def launch(k: int) -> Future[Any]:
            slot = self._acquire()
            try:
                return self._submit(len(offs) == 1, from_store, slot, int(offs[k]), int(counts[k]))
            except BaseException:
                self._release(slot)
                raise

        def done(k: int, event: Any) -> None:
            event.synchronize()
            o, n = int(offs[k]), int(counts[k])
            commit(pages[o:o + n], handles[o:o + n])

        _, error = self._run(len(offs), launch, done)
        if error is not None:
            raise error
        return self.backend.record(stream)

    def _submit(self, inline: bool, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn`` on a worker, or, for an operation of one piece, right here: a thread
        hop costs more than a small copy, and there is nothing to overlap it with."""
        if not inline:
            return self._pool.submit(fn, *args)
        fut: Future[Any] = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - delivered through the future, as from a worker
            fut.set_exception(e)
        return fut

    # ------------------------------------------------------------ the driver
    def _run(self, npieces: int, launch: Callable[[int], Future[Any]],
             done: Callable[[int, Any], None]) -> tuple[list[int], BaseException | None]:
        """Launch pieces in order, commit them in order as they finish, and on failure settle
        every piece in flight.  Returns the committed pieces and the error to raise, if any."""
        inflight: deque[tuple[int, Future[Any]]] = deque()
        committed: list[int] = []
        error: BaseException | None = None

        def finish(k: int, fut: Future[Any]) -> None:
            done(k, fut.result())
            committed.append(k)

        try:
            if self._closed:
                raise ClosedError("staging ring is closed")
            for k in range(npieces):
                inflight.append((k, launch(k)))
                while inflight and inflight[0][1].done():
                    finish(*inflight.popleft())
            while inflight:
                k, fut = inflight[0]
                fut.result()
                finish(*inflight.popleft())
        except BaseException as e:
            error = e
        if error is None:
            return committed, None
        interrupted = False
        while inflight:
            k, fut = inflight.popleft()
            while True:
                try:
                    wait([fut])
                    break
                except KeyboardInterrupt:
                    interrupted = True
            try:
                finish(k, fut)
            except BaseException:  # noqa: BLE001 - the first error is the one raised
                pass
        if interrupted and not isinstance(error, KeyboardInterrupt):
            error = KeyboardInterrupt()
        if not isinstance(error, (KeyboardInterrupt, ClosedError, CopyError, MemoryError)):
            wrapped = CopyError(f"copy failed after {len(committed)} of {npieces} pieces: {error!r}")
            wrapped.__cause__ = error
            error = wrapped
        return committed, error

    def close(self) -> None:
        """Wait for copies in flight, stop the workers, free the pinned slots.  Idempotent."""
        if self._closed:
            return
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._pool.shutdown(wait=True)
        for slot in self._slots:
            if slot.event is not None:
                slot.event.synchronize()
        self.backend.copy_stream.synchronize()
        self._slots.clear()
        self._free.clear()


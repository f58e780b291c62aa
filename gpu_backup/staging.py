"""The pinned staging ring and the copy pipeline between device memory and the store.

Eviction, per piece (a run of consecutive pages no larger than one slot)::

    caller:  D2H into a free slot on the D2H stream -> record event -> hand slot to a worker
    worker:  wait(event) -> store.write(slot) -> slot free again
    caller:  commit(pages, handles) once the piece is in the store

Restore runs the other way on the H2D stream: a worker reads store -> slot and enqueues
the H2D; the slot becomes reusable when that copy's event completes; the caller commits a
piece (marks its pages valid, drops or keeps the backup) once its H2D is done.

Every wait is a host wait on the one event it depends on (blocking events, no spinning);
nothing is queued on a copy stream that makes another buffer's copies wait.

Ownership: a slot belongs to exactly one party at every instant — the ring's free list,
the launching thread (its ``held`` list), or the worker that a piece was handed to.  The
driver runs with Ctrl-C deferred and takes it only at its checkpoints (between pieces and
in its waits, which are bounded slices), so no hand-over can be cut in two.  Either
direction may fail or be interrupted part-way: every piece in flight is settled first (a
slot is never reused, nor device memory released, while a copy still touches it: the
operation's last copy event goes to ``track``), finished pieces stay committed, and the
rest is left to the caller, whose page table therefore stays consistent; running the
operation again finishes it.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _faults
from ._check import check_count
from ._interrupts import deferred_interrupt, uninterrupted
from ._runs import runs_of
from .errors import ClosedError, CopyError
from .store.protocol import PageStore

__all__ = ["LateEvent", "Staging", "StagingRing", "pieces"]

LINK_GBPS = 55.0
"""Per-direction host link of the GPUs this library targets (H100/H200, PCIe Gen5 x16)."""
HOST_COPY_GBPS = 10.0
"""One host thread's pinned -> memfd copy, the low end of the 10-20 GB/s measured."""

_SLICE = 0.05
"""Seconds a driver's wait blocks before it looks for a Ctrl-C held off meanwhile."""


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_threads(cores: int | None = None) -> int:
    """Host copy workers for a machine of ``cores`` cores (see :class:`Staging`)."""
    c = _cores() if cores is None else cores
    want = -(-int(1.2 * LINK_GBPS) // int(HOST_COPY_GBPS))   # 7 at 10 GB/s a thread
    return max(2, min(want + 1, c // 2))


@dataclass(frozen=True)
class Staging:
    """Shape of the pinned staging ring; the defaults come from the machine's cores.

    slots
        Pinned slots, allocated once and reused for every copy.  Default: two per host
        thread (one being filled or drained by the copy engine while the worker copies
        the other).
    slot_bytes
        Bytes per slot: the largest single copy.  8 MiB takes ~150 us at 55 GB/s, against
        a piece's fixed cost on the launching thread (a ``cudaMemcpyAsync`` ~3 us, an
        event, the hand-off to a worker: tens of us of Python), which the workers and the
        copy engine overlap with other pieces; bigger slots would pin more memory for
        little gain, smaller ones would make the fixed cost show.
    threads
        Host copy workers (slot <-> store), overlapped with the device copies.
    zero_run_bytes
        An all-zero run between two pages to copy is recorded as zero pages instead of
        copied (when the manager scans) only if at least this long; shorter ones travel
        with their neighbours (zero runs at the edge of a copy are always skipped: they
        shorten it without splitting it).  Skipping an interior run splits a copy in two,
        which costs one more piece: 60-100 us of fixed cost measured on the host backend
        of a 2-core VM (``benchmarks/bench_pipeline.py --pieces``: 64 and 256 MiB with
        8 MiB against 256 KiB slots), the time to move 3.3-5.5 MB at 55 GB/s.  Runs
        shorter than 4 MiB therefore cost more to skip than to copy (a GPU host's figure is owed: the same
        command with ``--device cuda``).

    Why these numbers: the host side must keep up with the link on its own, with margin
    (1.2 x 55 GB/s = 66 GB/s per direction).  One thread copies pinned memory into the
    warm memfd at 10-20 GB/s, so 66 GB/s needs 7 threads at the low end
    (``ceil(66 / 10)``), plus one so that a worker waiting on a copy event does not
    leave the others short: 8 threads, 16 slots, 128 MiB pinned on a 16-core GPU host
    (half its cores; the rest stay with the application and the driver).  A 2-core
    machine gets 2 threads and 4 slots: its host side, not the link, bounds it, which is
    what ``gpu-backup info`` reports.
    """

    slots: int | None = None
    slot_bytes: int = 8 << 20
    threads: int | None = None
    zero_run_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        # ints only: a float (1.5e6) would be truncated silently, or fail deep in a copy
        threads = (default_threads() if self.threads is None else
                   check_count("Staging.threads", self.threads, minimum=1))
        slots = (2 * threads if self.slots is None else
                 check_count("Staging.slots", self.slots, minimum=1))
        object.__setattr__(self, "threads", threads)
        object.__setattr__(self, "slots", slots)
        for name in ("slot_bytes", "zero_run_bytes"):
            object.__setattr__(self, name, check_count(f"Staging.{name}", getattr(self, name),
                                                       minimum=1))


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


class LateEvent:
    """Stands in for the event of a copy whose ``record()`` failed (or never ran): waiting
    on it records a new event on the same stream and waits for that one, which follows
    the copy.  Until then it is never ``done``, so nothing it guards is released early."""

    __slots__ = ("backend", "stream")

    def __init__(self, backend: Any, stream: Any) -> None:
        self.backend = backend
        self.stream = stream

    @property
    def done(self) -> bool:
        return False

    def synchronize(self) -> None:
        with self.backend.activate():
            self.backend.record(self.stream).synchronize()


def record_or_late(backend: Any, stream: Any) -> tuple[Any, BaseException | None]:
    """An event after the work on ``stream``: ``(event, None)``, or ``(LateEvent, error)``
    when ``record()`` raised (the caller raises the error once the event is in place)."""
    try:
        return backend.record(stream), None
    except BaseException as e:  # noqa: BLE001 - handed back to the caller
        return LateEvent(backend, stream), e


def _gate_pieces(gate: Callable[[np.ndarray], None] | None, pages: np.ndarray,
                 offs: np.ndarray, counts: np.ndarray) -> Callable[[int], None] | None:
    if gate is None:
        return None
    return lambda k: gate(pages[int(offs[k]):int(offs[k]) + int(counts[k])])


class _Slot:
    __slots__ = ("owner", "view", "event")

    def __init__(self, owner: Any, view: np.ndarray) -> None:
        self.owner = owner          # keeps the pinned block alive
        self.view = view
        self.event: Any = None      # last device copy that touches this slot


class StagingRing:
    """A fixed set of pinned slots and the host copy workers.  Owns both.

    A slot is handed out only when free: no host copy uses it and its last device copy
    has completed.  ``close()`` refuses new operations, lets those in flight finish, then
    stops the workers and frees the slots.
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
        # A plain lock entered with ``with``: its C-level __enter__ cannot be cut from the
        # block by an interrupt (a Condition's Python-level __enter__ can, and would keep
        # the lock for good).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._free: deque[_Slot] = deque()
        self._slots: list[_Slot] = []
        self._ops = 0                # operations in flight
        self._closed = False
        try:
            for _ in range(int(config.slots or 1)):
                owner, view = backend.pinned(self.slot_bytes)
                self._slots.append(_Slot(owner, view))
        except BaseException:
            self._slots.clear()
            raise
        self._free.extend(self._slots)
        self._pool = ThreadPoolExecutor(int(config.threads or 1),
                                        thread_name_prefix="gpu_backup-staging")

    # ----------------------------------------------------------------- slots
    def _acquire(self, held: list[_Slot], shield: deferred_interrupt) -> None:
        """Move a free slot whose last copy has completed onto ``held`` (the caller's:
        it releases what is left there if it stops).  Ctrl-C lands only while waiting."""
        with self._lock:
            while not self._free:
                if self._closed and not self._ops:
                    raise ClosedError("staging ring is closed")
                self._cond.wait(_SLICE)
                shield.checkpoint()
            held.append(self._free.popleft())
        slot = held[-1]
        if slot.event is not None:   # a copy that failed late: its slot's last device copy
            with self.backend.activate():
                slot.event.synchronize()
            slot.event = None

    def _release(self, slot: _Slot, event: Any = None) -> None:
        """Give a slot back; ``event`` (if any) is its last copy, waited for before reuse."""
        with self._lock:
            slot.event = event
            self._free.append(slot)
            self._cond.notify()

    def _release_held(self, held: list[_Slot]) -> None:
        """Give back the slots a stopped driver still held (each keeps its event)."""
        with self._lock:
            while held:
                self._free.append(held.pop())
            self._cond.notify_all()

    def _begin(self) -> None:
        with self._lock:
            if self._closed:
                raise ClosedError("staging ring is closed")
            self._ops += 1

    def _end(self) -> None:
        with self._lock:
            self._ops -= 1
            self._cond.notify_all()

    # ------------------------------------------------------------- eviction
    def evict(self, mem: Any, pages: np.ndarray, handles: np.ndarray, *,
              commit: Callable[[np.ndarray, np.ndarray], None],
              track: Callable[[Any], None],
              gate: Callable[[np.ndarray], None] | None = None) -> None:
        """Copy ``pages`` (sorted indices) of device allocation ``mem`` into the store slots
        ``handles`` (allocated, one per page).  The caller has waited for every pending
        write to ``mem``.  ``commit(pages, handles)`` runs on this thread for each piece
        once its bytes are complete in the store; ``track(event)`` receives an event after
        the operation's last device copy (also on failure), which the caller keeps until
        it releases ``mem``.  ``gate(pages)``, if given, runs on this thread before each
        piece takes a slot; it may wait, or raise to stop the operation.

        On failure, raises after settling every piece.  Handles of pieces not committed are
        the caller's to drop (the caller's page table says which)."""
        backend = self.backend
        stream = backend.d2h_stream
        offs, counts = pieces(pages, self.slot_pages)
        ps = self.page_size

        def to_store(slot: _Slot, event: Any, h: np.ndarray, view: np.ndarray) -> None:
            try:
                _faults.point("evict.piece.wait")
                with backend.activate():  # no stray context on another GPU
                    event.synchronize()
                _faults.point("evict.piece.write")
                self.store.write(h, view)
            finally:
                # With its copy's event: if the wait above failed, the copy may still be
                # writing into the slot, and the next user must wait for it.
                self._release(slot, event)

        def start(k: int, slot: _Slot) -> Future[None]:
            """Runs with Ctrl-C deferred; owns ``slot`` (hands it on, or releases it)."""
            o, n = int(offs[k]), int(counts[k])
            owned, event, error = True, None, None
            try:
                view = slot.view[:n * ps]
                try:
                    backend.d2h(view, mem, int(pages[o]) * ps, stream)
                finally:
                    event, error = record_or_late(backend, stream)
                if error is not None:
                    raise error
                fut = self._submit(len(offs) == 1, to_store, slot, event, handles[o:o + n], view)
                owned = False   # the work item owns the slot now
                return fut
            finally:
                if owned:
                    self._release(slot, event)

        def done(k: int, _: None) -> None:
            o, n = int(offs[k]), int(counts[k])
            _faults.point("evict.piece.commit")
            commit(pages[o:o + n], handles[o:o + n])

        self._operate(len(offs), start, done, stream, track, "evict",
                      _gate_pieces(gate, pages, offs, counts))

    # --------------------------------------------------------------- restore
    def restore(self, mem: Any, pages: np.ndarray, handles: np.ndarray, *,
                commit: Callable[[np.ndarray, np.ndarray], None],
                track: Callable[[Any], None],
                gate: Callable[[np.ndarray], None] | None = None) -> None:
        """Copy the store pages ``handles`` back into ``pages`` of ``mem``, on the H2D
        stream.  ``commit(pages, handles)`` runs on this thread for each piece once its
        bytes are on the device; ``track(event)`` and ``gate`` as for :meth:`evict`.
        On failure, raises after settling every piece; uncommitted pieces keep their handles."""
        backend = self.backend
        stream = backend.h2d_stream
        offs, counts = pieces(pages, self.slot_pages)
        ps = self.page_size

        def from_store(slot: _Slot, o: int, n: int) -> Any:
            view = slot.view[:n * ps]
            event = None
            try:
                _faults.point("restore.piece.read")
                self.store.read(handles[o:o + n], view)
                _faults.point("restore.piece.h2d")
                with backend.activate(), deferred_interrupt():
                    try:
                        backend.h2d(mem, int(pages[o]) * ps, view, stream)
                    finally:
                        event, error = record_or_late(backend, stream)
                if error is not None:
                    raise error
                return event
            finally:
                self._release(slot, event)

        def start(k: int, slot: _Slot) -> Future[Any]:
            """Runs with Ctrl-C deferred; hands ``slot`` to the work item."""
            return self._submit(len(offs) == 1, from_store, slot, int(offs[k]), int(counts[k]))

        def done(k: int, event: Any) -> None:
            _faults.point("restore.piece.wait")
            with backend.activate():
                event.synchronize()
            o, n = int(offs[k]), int(counts[k])
            _faults.point("restore.piece.commit")
            commit(pages[o:o + n], handles[o:o + n])

        self._operate(len(offs), start, done, stream, track, "restore",
                      _gate_pieces(gate, pages, offs, counts))

    def _submit(self, inline: bool, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn`` on a worker, or, for an operation of one piece, right here: a thread
        hop costs more than a small copy, and there is nothing to overlap it with.
        Either way ``fn`` owns its arguments from here on (it releases the slot)."""
        if not inline:
            return self._pool.submit(fn, *args)
        fut: Future[Any] = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - delivered through the future, as from a worker
            fut.set_exception(e)
        return fut

    # ------------------------------------------------------------ the driver
    def _operate(self, npieces: int, start: Callable[[int, _Slot], Future[Any]],
                 done: Callable[[int, Any], None], stream: Any,
                 track: Callable[[Any], None], what: str,
                 gate: Callable[[int], None] | None) -> None:
        """One operation: counted in flight (``close()`` waits for it), its last copy event
        handed to ``track`` on every path, its error raised after every piece settled.
        Runs with Ctrl-C deferred; it lands at the driver's checkpoints, or at the end."""
        with deferred_interrupt() as shield:
            self._begin()
            try:
                error = self._run(npieces, start, done, what, gate, shield)
            finally:
                try:
                    event, record_error = record_or_late(self.backend, stream)
                    track(event)
                finally:
                    self._end()
        if error is not None:
            raise error
        if record_error is not None:
            raise record_error

    def _run(self, npieces: int, start: Callable[[int, _Slot], Future[Any]],
             done: Callable[[int, Any], None], what: str,
             gate: Callable[[int], None] | None,
             shield: deferred_interrupt) -> BaseException | None:
        """Launch pieces in order, commit them in order as they finish, and on failure settle
        every piece in flight.  Returns the error to raise, if any.

        Runs inside ``shield`` (Ctrl-C deferred): a Ctrl-C lands only at its checkpoints,
        where a slot is either on ``held`` or handed to a piece registered in
        ``inflight``, so every piece is settled below and every slot released once.  The
        settling itself is not interruptible (it waits only for copies in flight)."""
        inflight: deque[tuple[int, Future[Any]]] = deque()
        held: list[_Slot] = []
        ncommitted = 0
        error: BaseException | None = None

        def finish(k: int, fut: Future[Any]) -> None:
            nonlocal ncommitted
            done(k, fut.result())
            ncommitted += 1

        try:
            for k in range(npieces):
                if gate is not None:
                    gate(k)
                self._acquire(held, shield)
                shield.checkpoint(f"{what}.piece.launch")
                inflight.append((k, start(k, held.pop())))
                while inflight and inflight[0][1].done():
                    finish(*inflight.popleft())
            while inflight:
                k, fut = inflight[0]
                while not fut.done():
                    wait([fut], timeout=_SLICE)
                    shield.checkpoint()
                finish(*inflight.popleft())
        except BaseException as e:  # noqa: BLE001 - settled below, then returned
            error = e
        if error is None:
            return None
        self._release_held(held)
        while inflight:
            k, fut = inflight.popleft()
            wait([fut])
            if fut.exception() is not None:
                continue          # a failed piece: nothing to commit (its slot is back)
            try:
                finish(k, fut)
            except BaseException:  # noqa: BLE001 - the first error is the one raised
                pass
        if not isinstance(error, (KeyboardInterrupt, ClosedError, CopyError, MemoryError)):
            wrapped = CopyError(f"copy failed after {ncommitted} of {npieces} pieces: {error!r}")
            wrapped.__cause__ = error
            error = wrapped
        return error

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Refuse new operations, wait for those in flight, stop the workers, free the
        pinned slots once their last copies completed.  Idempotent."""
        if self._closed and not self._slots:
            return
        _faults.point("close.ring.begin")
        with self._lock:
            self._closed = True
            self._cond.notify_all()
            while self._ops:
                self._cond.wait()
        _faults.point("close.ring.drained")
        self._pool.shutdown(wait=True)
        _faults.point("close.ring.stopped")
        for slot in self._slots:
            if slot.event is not None:
                uninterrupted(slot.event.synchronize)
                slot.event = None
        self._slots.clear()
        self._free.clear()

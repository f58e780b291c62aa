"""Page movement for one buffer at a time: evict, restore, zero runs, forgetting backups,
releasing device memory.  Data flows one way: manager -> pager -> staging -> store.

The manager owns the public API, the locks and the accounting; it calls the pager with a
buffer's lock held (or, for a freed buffer, with the buffer unreachable).  The pager owns
no state of its own beyond its collaborators: a buffer's :class:`~gpu_backup.buffer._Pages`
holds everything, including the events the pager must wait for before the buffer's device
memory may be released (``uses``: the users' work; ``last``: the last copy the pipeline
enqueued on it; ``fresh``: the allocation guard of a block from another stream's pool).

Ordering rules that make every interruption point consistent and retryable:

* the page table changes before the store (a handle leaves the table, then it is dropped;
  a leaked page is possible, a page referenced after its drop is not);
* device memory is released only after a host wait on every event above;
* multi-step bookkeeping that cannot be ordered so runs with Ctrl-C deferred
  (:class:`~gpu_backup._interrupts.deferred_interrupt`, microseconds, never a wait).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _faults
from ._interrupts import deferred_interrupt
from ._runs import expand_runs, runs_of
from .buffer import PURGED_PAGE, ZERO_PAGE, _Pages
from .device.oom import is_device_oom
from .errors import BufferFreedError, BufferPurgedError, CopyError, InvalidHandleError
from .staging import LateEvent, StagingRing, record_or_late

if TYPE_CHECKING:
    from .buffer import Buffer
    from .kernels import PageScanner
    from .store.protocol import PageStore

__all__ = ["Pager"]

log = logging.getLogger("gpu_backup")


class _Stopped(CopyError):
    """One side of a swap stopped because the other failed (that one's error is raised)."""


class Pager:
    """Moves buffers' pages between the device and the store through the staging ring.

    Parameters
    ----------
    backend, store, ring, scanner
        The manager's device backend, page store, staging ring and page scanner (not
        owned: the manager closes them).
    page_size
        Bytes per page.
    device_alloc
        ``device_alloc(nbytes)``: the manager's accounted allocation (may reclaim).
    released
        ``released(nbytes)``: the manager's accounting of device bytes given back.
    count
        ``count(**deltas)``: adds to the manager's statistics.
    zero_scan
        ``zero_scan()``: whether to scan for zero pages now; ``zero_scan_failed()`` turns
        it off after a scan that cannot work here.
    """

    def __init__(self, *, backend: Any, store: PageStore, ring: StagingRing, scanner: PageScanner,
                 page_size: int, device_alloc: Callable[[int], Any],
                 released: Callable[[int], None], count: Callable[..., None],
                 zero_scan: Callable[[], bool], zero_scan_failed: Callable[[], None]) -> None:
        self.backend = backend
        self.store = store
        self.ring = ring
        self.scanner = scanner
        self.page_size = page_size
        self._device_alloc = device_alloc
        self._released = released
        self._count = count
        self._zero_scan = zero_scan
        self._zero_scan_failed = zero_scan_failed
        self.zero_run_pages = max(1, -(-ring.config.zero_run_bytes // page_size))
        self._undropped: list[np.ndarray] = []   # handles of failed drops, retried
        # find_victim(target, nbytes, taken): on a miss, an idle resident buffer whose memory
        # the target may take over (its lock put on ``taken``), or None.  Set by the manager.
        self.find_victim: Callable[[Buffer, int, list[Any]], Buffer | None] | None = None
        # Swap only where the two directions run on separate engines: on a GPU.  On the
        # host backend both are CPU copies, and overlapping them gains nothing (measured:
        # 0.8-1.0x of evict + restore in series on a 2-core machine).
        self.swap_on_miss = backend.name == "cuda"

    # ---------------------------------------------------------------- waits
    def _wait_for(self, events: list[Any]) -> None:
        """Host waits on exactly these events (blocking events: no core spins)."""
        if events:
            with self.backend.activate():
                for e in events:
                    e.synchronize()

    @staticmethod
    def busy(p: _Pages) -> bool:
        """Some work on ``p.mem`` is still pending (a non-waiting eviction skips it)."""
        return p.uses.busy or any(e is not None and not e.done for e in (p.fresh, p.last))

    def wait_idle(self, p: _Pages) -> None:
        """Wait until no work touches ``p.mem``: the users' pending uses, the allocation
        guard and the pipeline's last copy.  Interruptible; changes nothing."""
        events = p.uses.pending()
        if p.fresh is not None:
            events.append(p.fresh)
        if p.last is not None:
            events.append(p.last)
        self._wait_for(events)
        p.uses.clear()
        p.fresh = p.last = None

    # -------------------------------------------------------------- evict
    def _drop(self, handles: np.ndarray) -> None:
        """Drop store pages that no page table references any more (the table forgot them
        first).  A store that raises before changing anything (an I/O error, closed) keeps
        them: they are kept here, with a warning, and dropped again by the next drop or
        :meth:`retry_drops` (the manager's safe points), never leaked.  The operation that
        let go of them has done its job, so it does not fail for it.  (A Ctrl-C cannot
        land inside: every caller defers it.)"""
        if self._undropped:
            try:
                self.retry_drops()
            except Exception:   # noqa: BLE001 - still kept; warned when it first failed
                pass
        try:
            self.store.drop(handles)
        except KeyboardInterrupt:
            raise
        except InvalidHandleError as e:
            # Not live (dropped already): a bug, and dropping them later could free pages
            # that the store has handed to another buffer since.  Never kept.
            log.error("dropping %d store pages refused: %s", handles.size, e)
        except Exception as e:
            self._undropped.append(handles)
            log.warning("dropping %d store pages failed (%s: %s); kept and retried later",
                        handles.size, type(e).__name__, e)

    def retry_drops(self) -> int:
        """Drop the store pages an earlier failed drop kept; returns how many went.  Stops
        at the first failure (the rest stay kept)."""
        done = 0
        while self._undropped:
            h = self._undropped.pop()
            try:
                self.store.drop(h)
            except BaseException:
                self._undropped.append(h)
                raise
            done += h.size
        return done

    @property
    def undropped_pages(self) -> int:
        """Store pages no buffer references, kept for a retry of their failed drop."""
        return sum(h.size for h in self._undropped)

    def settle_staged(self, p: _Pages) -> None:
        """Drop the handles an eviction reserved that the page table did not take (the
        eviction stopped).  Runs before every step that drops table handles, so that a
        staged handle is judged while the table still says whether it holds it."""
        if p.staged is None:
            return
        with deferred_interrupt():       # one step: forget them, then drop them
            lost = self._take_unclaimed(p)
            if lost.size:
                self._drop(lost)

    @staticmethod
    def _take_unclaimed(p: _Pages) -> np.ndarray:
        """Forget ``p``'s staged handles; returns those its table did not take (the
        caller drops them, in the same deferred step)."""
        staged, p.staged = p.staged, None
        if staged is None:
            return np.empty(0, np.int64)
        return staged[~np.isin(staged, p.table)]

    def evict(self, buf: Buffer, p: _Pages) -> int:
        """Evict ``buf`` (its lock held, not in ``access()``, memory present).  Returns the
        device bytes freed.  On failure the buffer keeps its memory and the pages already
        in the store; running it again finishes the job."""
        t0 = time.perf_counter()
        p.plain = False
        _faults.point("evict.begin")
        self.wait_idle(p)          # eviction follows every pending use (host wait, this buffer only)
        _faults.point("evict.idle")
        if buf.purgeable:
            return self._purge(buf, p)
        todo = np.flatnonzero(p.valid & (p.table == 0))
        zero = 0
        if self._zero_scan() and todo.size:
            todo, zero = self._skip_zero_runs(p, todo)
        copied = todo.size * self.page_size
        if todo.size:
            self._copy_out(p, todo)
        _faults.point("evict.copied")
        freed = self.release_mem(p)
        dt = time.perf_counter() - t0
        self._count(evictions=1, bytes_evicted=freed, bytes_copied_out=copied, zero_pages=zero,
                    evict_seconds=dt, clean_evictions=int(not copied))
        log.debug("evicted buffer #%d: %d B freed, %d B copied in %.3f ms", buf.id, freed,
                  copied, dt * 1e3)
        return freed

    def _purge(self, buf: Buffer, p: _Pages) -> int:
        _faults.point("evict.purge")
        self.settle_staged(p)
        with deferred_interrupt():          # table first, then the store; one step
            live = p.table[p.table > 0]
            p.table[:] = PURGED_PAGE
            if live.size:
                self._drop(live)
        freed = self.release_mem(p)
        self._count(purges=1, bytes_purged=freed)
        log.debug("purged buffer #%d (%d B)", buf.id, freed)
        return freed

    def _copy_out(self, p: _Pages, todo: np.ndarray) -> None:
        # Slots are reserved here (StoreFullError changes nothing) and faulted in piece by
        # piece by the ring's workers, in parallel with the device copies.
        def commit(pages: np.ndarray, h: np.ndarray) -> None:
            p.table[pages] = h

        def track(event: Any) -> None:
            p.last = event

        self.settle_staged(p)        # an earlier eviction's, if it was interrupted
        # The handles belong to the buffer from the step that reserves them (a Ctrl-C held
        # off meanwhile lands at the end of that step, when they have their owner).
        with deferred_interrupt():
            p.staged = self.store.alloc(todo.size, populate=False)
            p.evicting = True
        try:
            _faults.point("evict.store_alloc")
            self.ring.evict(p.mem, todo, p.staged, commit=commit, track=track)
        finally:
            # Whatever the page table did not take is referenced nowhere: dropped.  (Read
            # from the table itself, so an interrupt between a commit and the ring's own
            # bookkeeping cannot drop a handle the table holds.)
            self.settle_staged(p)

    def _skip_zero_runs(self, p: _Pages, todo: np.ndarray) -> tuple[np.ndarray, int]:
        """Record all-zero runs of at least ``zero_run_pages`` pages as ZERO_PAGE instead of
        copying them; shorter zero runs travel with their neighbours (a split copy costs
        more than the bytes it saves).  The buffer is idle (waited for) and locked."""
        try:
            is_zero = self.scanner.zero_pages(p.mem, p.held, self.page_size,
                                              stream=self.backend.d2h_stream)
        except Exception as e:  # noqa: BLE001 - e.g. the kernel fails to build here
            if is_device_oom(e):
                # The device is full (any allocator's form): eviction must still work, so
                # this one copies every page; the next one scans again.
                log.debug("zero-page scan skipped: %s", e)
                return todo, 0
            log.warning("zero-page scan failed (%s: %s); turned off for this manager, pages "
                        "are copied instead", type(e).__name__, e)
            self._zero_scan_failed()
            return todo, 0
        zero = todo[is_zero[todo]]
        if zero.size == 0:
            return todo, 0
        starts, lengths, _ = runs_of(zero)
        # A zero run between two pages to copy splits one copy in two: skipped only when
        # long.  One at the edge of a run to copy only shortens it: always skipped.
        copy = np.zeros(p.table.shape[0] + 2, bool)     # padded: index i + 1 is page i
        copy[todo[~is_zero[todo]] + 1] = True
        interior = copy[starts] & copy[starts + lengths + 1]
        skip = ~interior | (lengths >= self.zero_run_pages)
        if not skip.any():
            return todo, 0
        zero = expand_runs(starts[skip], lengths[skip])
        p.evicting = True
        p.table[zero] = ZERO_PAGE
        keep = np.ones(p.table.shape[0], bool)
        keep[zero] = False
        return todo[keep[todo]], int(zero.size)

    def release_mem(self, p: _Pages) -> int:
        """Free a buffer's device memory, after a host wait for every copy and use that
        touches it.  Returns the bytes given back."""
        _faults.point("release.wait")
        self.wait_idle(p)
        _faults.point("release.free")
        with deferred_interrupt():
            return self._free_mem(p)

    def _free_mem(self, p: _Pages) -> int:
        freed, p.held = p.held, 0
        p.mem = None
        p.evicting = False
        p.plain = False
        p.valid[:] = False
        self._released(freed)
        return freed

    # -------------------------------------------------------------- restore
    def make_resident(self, buf: Buffer, mode: str, user: Any) -> Any:
        """Make ``buf`` (pinned by the caller) current on the device for ``mode``; the
        ``user`` stream is ordered after the restore.

        Device memory is allocated outside the buffer's lock (the reclaim an allocation may
        run calls shrinkers, which may touch other buffers, or this one) and from the pool
        of the stream that uses it first: the H2D stream for a restore, the user's for
        ``"w"``.  A pool block is handed out in the order of its own stream, so neither
        needs a guard that would make it wait for other work."""
        p = buf._pages
        held = buf.npages * self.page_size
        with buf._lock:
            if p.plain:
                self._guard(p, user)
                return p.mem if buf.npages else self.backend.alloc(0)
            if mode != "w" and (p.table == PURGED_PAGE).any():
                raise BufferPurgedError(
                    f"buffer #{buf.id} ({buf.nbytes:,} B, purgeable) was discarded under memory "
                    f"pressure; access it with mode='w' to get fresh memory")
            need_mem = p.mem is None
        spare = None
        if need_mem and mode != "w" and self.swap_on_miss and self.find_victim is not None:
            taken: list[Any] = []    # the victim's lock, once taken
            try:
                victim = self.find_victim(buf, held, taken)
                if victim is not None:
                    with buf._lock, self.backend.activate():
                        mem = self._swap_locked(victim, buf, mode, user)
                        if mem is not None:
                            p.plain = mode != "r" or not (p.table != 0).any()
                            return mem
            finally:
                if taken:
                    taken[0].release()
        if need_mem:
            first = user if mode == "w" else self.backend.h2d_stream
            with self.backend.allocating_for(first):
                spare = self._device_alloc(held)
        try:
            _faults.point("restore.allocated")
            with buf._lock, self.backend.activate():
                if buf.freed:
                    raise BufferFreedError(f"buffer #{buf.id} was freed while being restored")
                if p.mem is None and spare is not None:
                    with deferred_interrupt():
                        p.mem, p.held, spare = spare, held, None
                if mode == "w":
                    p.valid[:] = True      # valid first: a stale backup is still a backup
                    self.forget_backups(p)
                else:
                    need = ~p.valid
                    if need.any():
                        with self.backend.nvtx("gpu_backup.restore"):
                            self._restore_locked(buf, p, need, keep=mode == "r", user=user)
                    if mode == "rw":
                        self.forget_backups(p)
                self._guard(p, user)
                p.plain = mode != "r" or not (p.table != 0).any()
                return p.mem
        finally:
            if spare is not None:  # another thread restored the buffer meanwhile
                del spare
                self._released(held)

    def _guard(self, p: _Pages, user: Any) -> None:
        """Order the user's stream after the allocation guard and the last restore copy."""
        for attr in ("fresh", "last"):
            e = getattr(p, attr)
            if e is None:
                continue
            if e.done:
                setattr(p, attr, None)
            else:
                user.wait_event(e)

    def _restore_locked(self, buf: Buffer, p: _Pages, need: np.ndarray, *, keep: bool,
                        user: Any) -> None:
        t0 = time.perf_counter()
        ps = self.page_size
        pages = np.flatnonzero(need & (p.table > 0))
        zeros = np.flatnonzero(need & (p.table == ZERO_PAGE))
        stream = self.backend.h2d_stream
        _faults.point("restore.begin")
        if p.fresh is not None:          # a block from another stream's pool, never used yet
            self._wait_for([p.fresh])
            p.fresh = None

        self.settle_staged(p)

        def commit(done: np.ndarray, h: np.ndarray) -> None:
            with deferred_interrupt():   # table first, then the store; one step
                p.valid[done] = True
                if not keep:
                    p.table[done] = 0
                    self._drop(h)

        def track(event: Any) -> None:
            p.last = event

        if zeros.size:
            # One memset per zero run (runs are long: short ones were copied), enqueued
            # before the copies so they overlap the store reads; no host wait: the user's
            # stream waits for the final event.
            _faults.point("restore.zero")
            starts, lengths, _ = runs_of(zeros)
            with deferred_interrupt():
                try:
                    for s, n in zip(starts.tolist(), lengths.tolist()):
                        self.backend.memset(p.mem, s * ps, n * ps, 0, stream)
                finally:
                    p.last, error = record_or_late(self.backend, stream)
                if error is not None:
                    raise error
                p.valid[zeros] = True
                if not keep:
                    p.table[zeros] = 0
        if pages.size:
            # the ring's final event is on the same stream: it follows the memsets too
            self.ring.restore(p.mem, pages, p.table[pages].copy(), commit=commit, track=track)
        _faults.point("restore.done")
        if p.last is not None:
            user.wait_event(p.last)
        dt = time.perf_counter() - t0
        self._count(restores=1, bytes_restored=min(buf.nbytes, int(need.sum()) * ps),
                    bytes_copied_in=pages.size * ps, restore_seconds=dt)
        log.debug("restored buffer #%d: %d pages copied, %d zero, %.3f ms", buf.id, pages.size,
                  zeros.size, dt * 1e3)

    # ----------------------------------------------------------------- swap
    def _swap_locked(self, victim: Buffer, target: Buffer, mode: str, user: Any) -> Any:
        """Restore ``target`` into ``victim``'s device memory while ``victim`` is evicted
        from it: the D2H of the victim's pieces and the H2D of the target's run at once, on
        the two copy streams, and a target piece starts as soon as the victim's pages under
        it are safe in the store.  Both locks held.  Returns the target's memory, or None
        when the pair does not qualify (the caller then evicts and allocates as usual).

        On failure: the victim keeps its memory (pages already in the store are marked
        invalid, the rest stay valid: a partial eviction), the target keeps its store pages,
        nothing is lost and either operation can be run again."""
        a, b = victim._pages, target._pages
        ps = self.page_size
        if (victim.freed or target.freed or victim._pins or victim.purgeable or a.mem is None
                or b.mem is not None or a.held < target.npages * ps
                or (b.table == PURGED_PAGE).any()):
            return None
        t0 = time.perf_counter()
        _faults.point("swap.begin")
        self.wait_idle(a)
        # The rest runs with Ctrl-C deferred: it lands only inside the restore (whose own
        # checkpoints reach it, and whose interruption stops the eviction beside it), or
        # at the end.  Its waits are for copies in flight.
        with deferred_interrupt() as shield:
            return self._swap_shielded(victim, target, mode, user, shield, t0)

    def _swap_shielded(self, victim: Buffer, target: Buffer, mode: str, user: Any,
                       shield: deferred_interrupt, t0: float) -> Any:
        a, b = victim._pages, target._pages
        ps = self.page_size
        a.plain = False
        self.settle_staged(a)
        a.valid &= a.table == 0                # store copies and zero marks are the truth now
        todo = np.flatnonzero(a.valid)
        zero = 0
        if self._zero_scan() and todo.size:
            todo, zero = self._skip_zero_runs(a, todo)
            a.valid[a.table == ZERO_PAGE] = False
        pages = np.flatnonzero(b.table > 0)
        zeros = np.flatnonzero(b.table == ZERO_PAGE)
        handles_b = b.table[pages].copy()
        cond = threading.Condition()
        state: dict[str, Any] = {"done": 0, "error": None, "finished": False, "cancel": False}
        events: dict[str, Any] = {}

        def commit_a(pg: np.ndarray, h: np.ndarray) -> None:
            with deferred_interrupt():
                a.table[pg] = h
                a.valid[pg] = False      # in the store; its device bytes may be overwritten
            with cond:
                state["done"] += pg.size
                cond.notify_all()

        def gate_a(pg: np.ndarray) -> None:
            if state["cancel"]:
                raise _Stopped("swap stopped: the restore beside it failed")

        def gate_b(pg: np.ndarray) -> None:
            need = int(np.searchsorted(todo, int(pg[-1]) + 1))
            with cond:
                while state["done"] < need:
                    if state["finished"]:
                        raise _Stopped("swap stopped: the eviction beside it failed")
                    cond.wait()

        def evict_a() -> None:
            try:
                staged = a.staged if a.staged is not None else np.empty(0, np.int64)
                self.ring.evict(a.mem, todo, staged, commit=commit_a,
                                track=lambda e: events.__setitem__("a", e), gate=gate_a)
            except BaseException as e:  # noqa: BLE001 - reported to the swapping thread
                state["error"] = e
            finally:
                with cond:
                    state["finished"] = True
                    cond.notify_all()

        worker = threading.Thread(target=evict_a, name="gpu_backup-swap", daemon=True)
        error: BaseException | None = None
        try:
            try:
                if todo.size:
                    a.staged = self.store.alloc(todo.size, populate=False)   # the victim's now
                    a.evicting = True
                _faults.point("swap.store_alloc")
            except BaseException as e:   # the victim's eviction never started
                state["error"], state["finished"] = e, True
                raise
            worker.start()
            if pages.size:
                with shield.passing():
                    self.ring.restore(a.mem, pages, handles_b, commit=lambda pg, h: None,
                                      track=lambda e: events.__setitem__("b", e), gate=gate_b)
        except BaseException as e:  # noqa: BLE001 - raised once both sides settled
            error = e
            state["cancel"] = True
        if worker.ident is not None:
            worker.join()
        self.settle_staged(a)         # what the victim's table did not take is dropped
        a_error = state["error"]
        if a_error is not None and (error is None or isinstance(error, _Stopped)):
            error = a_error           # the cause, not the restore it stopped
        if error is not None:
            # the target's copies wrote only where the victim's pages are safe in the
            # store, but the victim's memory must outlive them
            late = [e for e in (events.get("a"), events.get("b")) if e is not None]
            self._wait_for(late)
            if a_error is None:       # the victim is wholly in the store: let its memory go
                with deferred_interrupt():
                    self._free_mem(a)
            raise error
        _faults.point("swap.restored")
        stream = self.backend.h2d_stream
        with deferred_interrupt():
            try:
                for s, n in zip(*(x.tolist() for x in runs_of(zeros)[:2])):
                    self.backend.memset(a.mem, s * ps, n * ps, 0, stream)
            finally:
                last, rec_error = record_or_late(self.backend, stream)
            # the block changes hands: the victim is evicted, the target resident
            mem, held = a.mem, a.held
            a.mem, a.held, a.evicting, a.last = None, 0, False, None
            a.valid[:] = False
            b.mem, b.held, b.last, b.fresh = mem, held, last, None
            b.valid[:] = False
            b.valid[pages] = True
            b.valid[zeros] = True
            if mode == "rw":
                b.table[zeros] = 0
        if rec_error is not None:
            raise rec_error
        if mode == "rw":
            self.forget_backups(b)
        user.wait_event(last)
        dt = time.perf_counter() - t0
        self._count(evictions=1, bytes_evicted=held, bytes_copied_out=todo.size * ps,
                    zero_pages=zero, evict_seconds=dt, restores=1,
                    bytes_restored=target.nbytes, bytes_copied_in=pages.size * ps,
                    restore_seconds=dt, swaps=1)
        log.debug("swapped buffer #%d out for #%d: %d + %d pages copied in %.3f ms", victim.id,
                  target.id, todo.size, pages.size, dt * 1e3)
        return mem

    def forget_backups(self, p: _Pages) -> None:
        """The device copy is about to change: store copies and zero marks become stale.
        The table forgets them first, then the store drops them."""
        _faults.point("forget.begin")
        self.settle_staged(p)
        with deferred_interrupt():       # one step: nothing leaks, nothing dangles
            live = p.table[p.table > 0]
            p.table[:] = 0
            p.evicting = False
            if live.size:
                self._drop(live)

    # ----------------------------------------------------------------- free
    def reap(self, buf_id: int, p: _Pages) -> None:
        """Release a freed buffer's device memory and store pages.  Idempotent: an
        interruption before its last step leaves the rest for the next call."""
        _faults.point("free.begin")
        try:
            self.wait_idle(p)
        except Exception as e:  # noqa: BLE001 - a failed use: the work is over either way
            log.warning("buffer #%d: its last use failed: %s: %s", buf_id, type(e).__name__, e)
            p.uses.clear()
            p.fresh = None
            if not isinstance(p.last, LateEvent):   # a failed copy is over too; a late
                p.last = None                       # event still has to say so
            self.wait_idle(p)
        _faults.point("free.idle")
        with deferred_interrupt():       # no waits left: memory, table, store in one step
            if p.mem is not None:
                self._free_mem(p)
            lost = self._take_unclaimed(p)
            if lost.size and not self.store.closed:
                self._drop(lost)
            live = p.table[p.table > 0]
            p.table[:] = 0
            if live.size and not self.store.closed:
                self._drop(live)

"""Fault injection and invariant checks, for testing code built on gpu_backup (and for the
library's own reliability tests).  Importable without CuPy.

Three tools:

:class:`FaultyStore`
    Wraps a :class:`~gpu_backup.PageStore` and fails (an ``OSError(EIO)`` by default, or
    any error) or interrupts (``KeyboardInterrupt``) at the Nth call of any of its
    methods, before or after the real call; everything else is forwarded.
:func:`record_faults` / :func:`inject_fault`
    The pipeline, the manager and the stores name every step between two state changes
    (``gpu_backup._faults.point``).  ``record_faults()`` lists the points an operation
    passes; ``inject_fault(name, nth)`` raises at the Nth pass of one of them.  Both
    restore the injector they replaced on exit, and stack.
:func:`check_invariants`
    After a failure: every page of every buffer is current on the device, complete in
    the store, or zero (compared byte for byte with what the caller expects); the store
    holds exactly the pages the page tables own; the manager's device accounting matches
    its buffers and the backend's allocations.

Example::

    with inject_fault("alloc.reserved", 1):
        with pytest.raises(KeyboardInterrupt):
            mgr.alloc(1 << 20)
    check_invariants(mgr, {buf: data})
"""

from __future__ import annotations

import contextlib
import errno
import gc
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from . import _faults
from ._interrupts import deferring

__all__ = ["FaultyStore", "FaultRecorder", "Injection", "InvariantError", "check_invariants",
           "inject_fault", "record_faults"]

_STORE_METHODS = ("alloc", "write", "backup", "read", "drop", "writeback", "prefault", "trim",
                  "stats", "bytes_avail", "close")


def _eio() -> BaseException:
    return OSError(errno.EIO, "injected I/O error")


def _make_error(error: Any) -> BaseException:
    """A fresh exception from a class, a factory, or (as given) an instance."""
    if isinstance(error, BaseException):
        return error
    return error()


def _as_set(n: int | Iterable[int]) -> frozenset[int]:
    if isinstance(n, (int, np.integer)):
        return frozenset((int(n),))
    return frozenset(int(x) for x in n)


class FaultyStore:
    """A page store that fails on purpose.

    Parameters
    ----------
    store
        The store to wrap (not owned: closing the wrapper closes nothing unless
        ``close`` is called on it, which is forwarded).
    fail
        ``{"write": 3}``: the 3rd call of ``write`` raises ``error``.  A set of call
        numbers fails each of them: ``{"drop": {1, 2}}``.
    interrupt
        As ``fail``, raising ``KeyboardInterrupt``, but counting only the calls a Ctrl-C
        could interrupt: those made outside a section that holds SIGINT off
        (``deferred_interrupt``).
    error
        What ``fail`` raises: an exception class, a factory, or an instance.  Default:
        a fresh ``OSError(EIO)`` each time.
    after
        Raise after the real call has completed (its result, say the handles of an
        ``alloc``, is lost to the caller) instead of before it.

    Calls are counted per method (``calls``; ``interruptible``: those outside sections
    that hold SIGINT off), thread-safely: copies run on worker threads.  ``fired`` lists ``(method, call number, exception type name)``.
    """

    def __init__(self, store: Any, fail: Mapping[str, int | Iterable[int]] | None = None, *,
                 interrupt: Mapping[str, int | Iterable[int]] | None = None,
                 error: Any = _eio, after: bool = False) -> None:
        for name in list(fail or ()) + list(interrupt or ()):
            if name not in _STORE_METHODS:
                raise ValueError(f"{name!r} is not a PageStore method ({', '.join(_STORE_METHODS)})")
        self.store = store
        self._fail = {k: _as_set(v) for k, v in (fail or {}).items()}
        self._interrupt = {k: _as_set(v) for k, v in (interrupt or {}).items()}
        self._error = error
        self.after = bool(after)
        self.calls: Counter[str] = Counter()
        self.interruptible: Counter[str] = Counter()
        self.fired: list[tuple[str, int, str]] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<FaultyStore over {self.store!r}>"

    def __getattr__(self, name: str) -> Any:
        # Attributes and properties (page_size, npages, closed, bytes_used, ...) pass through.
        return getattr(self.__dict__["store"], name)

    def _call(self, method: str, *args: Any, **kw: Any) -> Any:
        held = deferring()   # inside a section that holds SIGINT off: no Ctrl-C lands here
        with self._lock:
            self.calls[method] += 1
            n = self.calls[method]
            if not held:
                self.interruptible[method] += 1
            k = self.interruptible[method]
        exc: BaseException | None = None
        if not held and k in self._interrupt.get(method, ()):
            exc = KeyboardInterrupt()
        elif n in self._fail.get(method, ()):
            exc = _make_error(self._error)
        if exc is not None and not self.after:
            self._fired(method, n, exc)
            raise exc
        result = getattr(self.store, method)(*args, **kw)
        if exc is not None:
            self._fired(method, n, exc)
            raise exc
        return result

    def _fired(self, method: str, n: int, exc: BaseException) -> None:
        with self._lock:
            self.fired.append((method, n, type(exc).__name__))

    # The PageStore methods, each counted and faultable.
    def alloc(self, npages: int, *, populate: bool = True) -> np.ndarray:
        return self._call("alloc", npages, populate=populate)

    def write(self, handles: Any, data: Any) -> None:
        return self._call("write", handles, data)

    def backup(self, data: Any, *, writeback: bool = False) -> np.ndarray:
        return self._call("backup", data, writeback=writeback)

    def read(self, handles: Any, out: Any) -> None:
        return self._call("read", handles, out)

    def drop(self, handles: Any) -> None:
        return self._call("drop", handles)

    def writeback(self, handles: Any) -> bool:
        return self._call("writeback", handles)

    def prefault(self, nbytes: int) -> int:
        return self._call("prefault", nbytes)

    def trim(self) -> int:
        return self._call("trim")

    def stats(self) -> dict[str, int]:
        return self._call("stats")

    def bytes_avail(self) -> int:
        return self._call("bytes_avail")

    def close(self) -> None:
        return self._call("close")


# ------------------------------------------------------------------ fault points
class FaultRecorder:
    """The fault points passed while :func:`record_faults` is active, in order:
    ``hits`` is a list of ``(name, on_caller)`` where ``on_caller`` says a Ctrl-C could
    land there: the point was passed on the thread that entered the context (not on a
    worker), outside any section that holds SIGINT off (``deferred_interrupt``)."""

    def __init__(self) -> None:
        self.hits: list[tuple[str, bool]] = []

    def counts(self, *, caller_only: bool = False) -> dict[str, int]:
        """How many times each point was passed (on the calling thread only, if asked)."""
        return dict(Counter(n for n, mine in self.hits if mine or not caller_only))


@contextlib.contextmanager
def record_faults() -> Iterator[FaultRecorder]:
    """Record every fault point passed inside the block (on any thread)."""
    rec = FaultRecorder()
    caller = threading.get_ident()
    lock = threading.Lock()
    previous: Callable[[str], None] | None = None

    def injector(name: str) -> None:
        with lock:
            rec.hits.append((name, threading.get_ident() == caller and not deferring()))
        if previous is not None:
            previous(name)

    previous = _faults.set_injector(injector)
    try:
        yield rec
    finally:
        _faults.set_injector(previous)


class Injection:
    """State of an :func:`inject_fault` block: ``hits`` (passes of the point counted so
    far), ``fired`` (whether the error was raised)."""

    def __init__(self, point: str, nth: int) -> None:
        self.point = point
        self.nth = nth
        self.hits = 0
        self.fired = False


@contextlib.contextmanager
def inject_fault(point: str, nth: int = 1, error: Any = KeyboardInterrupt, *,
                 caller_only: bool | None = None) -> Iterator[Injection]:
    """Raise ``error`` (a class, factory or instance; default ``KeyboardInterrupt``) at the
    ``nth`` pass of the fault point ``point`` inside the block, once.

    ``caller_only``: count (and raise at) only passes where a Ctrl-C could land: on the
    calling thread, outside sections that hold SIGINT off.  Default: True for
    ``KeyboardInterrupt`` (a Ctrl-C lands on the main thread, never on a worker, and waits
    for the end of a ``deferred_interrupt`` section), False for other errors.
    """
    if nth < 1:
        raise ValueError(f"{nth=} must be >= 1")
    if caller_only is None:
        caller_only = error is KeyboardInterrupt or isinstance(error, KeyboardInterrupt)
    inj = Injection(point, nth)
    caller = threading.get_ident()
    lock = threading.Lock()
    previous: Callable[[str], None] | None = None

    def injector(name: str) -> None:
        if previous is not None:
            previous(name)
        if name != point or (caller_only and (threading.get_ident() != caller
                                               or deferring())):
            return
        with lock:
            inj.hits += 1
            fire = inj.hits == nth
            if fire:
                inj.fired = True
        if fire:
            raise _make_error(error)

    previous = _faults.set_injector(injector)
    try:
        yield inj
    finally:
        _faults.set_injector(previous)


# -------------------------------------------------------------------- invariants
class InvariantError(AssertionError):
    """An invariant does not hold; the message lists every violation found, ``summary``
    has the figures (``wrong_bytes`` among them)."""

    summary: dict[str, int] = {}


def _unwrap(store: Any) -> Any:
    while isinstance(store, FaultyStore):
        store = store.store
    return store


def check_invariants(mgr: Any, expected: Mapping[Any, np.ndarray | None] | None = None, *,
                     other_store_bytes: int = 0, other_device_bytes: int = 0) -> dict[str, int]:
    """Check a manager at rest (no operation in flight) after whatever happened to it.

    Parameters
    ----------
    mgr
        The :class:`~gpu_backup.BufferManager`.
    expected
        ``{buffer: bytes}``: the contents each buffer must have (``nbytes`` uint8), or
        None where the contents are undefined (an interrupted ``access("w")``: only the
        structure is checked).  Buffers not named, or freed, are not compared.
    other_store_bytes
        Store bytes that belong to someone else (a store shared with other managers).
    other_device_bytes
        Bytes allocated from the manager's backend by someone else (the host backend's
        allocations are compared with the manager's accounting).

    Returns a summary (``buffers``, ``pages``, ``pages_compared``, ``wrong_bytes``,
    ``store_pages``).  Raises :class:`InvariantError` listing every violation: a page
    neither current on the device, nor in the store, nor zero; wrong bytes on the device
    or in the store; a store page owned twice, or owned by no page table (leaked); device
    accounting that differs from the buffers' or the backend's.
    """
    from .buffer import PURGED_PAGE, ZERO_PAGE  # noqa: PLC0415 - keeps this module light

    gc.collect()                 # buffers and arrays only a traceback kept alive
    bufs = mgr.buffers()         # releases what collected buffers held, first
    expected = expected or {}
    ps = mgr.page_size
    store = _unwrap(mgr.store)
    problems: list[str] = []
    owned: list[np.ndarray] = []
    held_total = pages_total = compared = wrong = 0
    for buf in bufs:
        p = buf._pages
        p.uses.synchronize()
        t = p.table.copy()
        n = buf.npages
        pages_total += n
        held_total += p.held
        has_mem = p.mem is not None
        if has_mem != (p.held > 0) and n:
            problems.append(f"buffer #{buf.id}: mem={'present' if has_mem else 'None'} but "
                            f"held={p.held:,} B")
        if has_mem and p.held != n * ps:
            problems.append(f"buffer #{buf.id}: holds {p.held:,} B for {n} pages of {ps} B")
        valid = p.valid.copy() if has_mem else np.zeros(n, bool)
        stored = t > 0
        ok = valid | stored | (t == ZERO_PAGE) | (t == PURGED_PAGE)
        if not ok.all():
            bad = np.flatnonzero(~ok)
            problems.append(f"buffer #{buf.id}: {bad.size} page(s) neither current on the "
                            f"device, nor in the store, nor zero: {bad[:8].tolist()}")
        if (t == PURGED_PAGE).any() and not buf.purgeable:
            problems.append(f"buffer #{buf.id}: purged pages in a buffer that is not purgeable")
        if (t < PURGED_PAGE).any():
            problems.append(f"buffer #{buf.id}: page table values below {PURGED_PAGE}")
        owned.append(t[stored])
        if p.staged is not None:   # reserved by a stopped eviction: dropped by its next step
            owned.append(p.staged[~np.isin(p.staged, t)])
        want = expected.get(buf)
        if want is None or buf.freed:
            continue
        want = np.asarray(want, np.uint8).reshape(-1)
        if want.shape[0] != buf.nbytes:
            raise ValueError(f"expected bytes for buffer #{buf.id}: {want.shape[0]:,} B, the "
                             f"buffer has {buf.nbytes:,} B")
        full = np.zeros(n * ps, np.uint8)
        full[:buf.nbytes] = want
        tail = np.zeros(n * ps, bool)
        tail[buf.nbytes:] = True              # bytes past nbytes: not compared
        full_pages, tail_pages = full.reshape(n, ps), tail.reshape(n, ps)
        if has_mem and valid.any():
            dev = mgr.backend.to_host(p.mem, n * ps).reshape(n, ps)
            diff = (dev[valid] != full_pages[valid]) & ~tail_pages[valid]
            compared += int(valid.sum())
            if diff.any():
                wrong += int(diff.sum())
                problems.append(f"buffer #{buf.id}: {int(diff.sum()):,} wrong bytes on the device "
                                f"in pages {np.flatnonzero(valid)[diff.any(1)][:8].tolist()}")
        if stored.any():
            got = np.empty(int(stored.sum()) * ps, np.uint8)
            try:
                store.read(t[stored], got)
            except Exception as e:  # noqa: BLE001 - reported as a violation
                problems.append(f"buffer #{buf.id}: reading its store pages failed: "
                                f"{type(e).__name__}: {e}")
            else:
                got = got.reshape(-1, ps)
                diff = (got != full_pages[stored]) & ~tail_pages[stored]
                compared += int(stored.sum())
                if diff.any():
                    wrong += int(diff.sum())
                    problems.append(
                        f"buffer #{buf.id}: {int(diff.sum()):,} wrong bytes in the store for "
                        f"pages {np.flatnonzero(stored)[diff.any(1)][:8].tolist()}")
        zero = (t == ZERO_PAGE) & ~valid
        if zero.any():
            diff = (full_pages[zero] != 0) & ~tail_pages[zero]
            compared += int(zero.sum())
            if diff.any():
                wrong += int(diff.sum())
                problems.append(f"buffer #{buf.id}: pages marked zero hold {int(diff.sum()):,} "
                                f"non-zero bytes")
    owned.extend(mgr._pager._undropped)   # kept for a retry of their failed drop
    handles = np.concatenate(owned) if owned else np.zeros(0, np.int64)
    uniq, counts = np.unique(handles, return_counts=True)
    if (counts > 1).any():
        problems.append(f"store pages owned by two pages at once: {uniq[counts > 1][:8].tolist()}")
    if not store.closed:
        want_used = uniq.size * ps + other_store_bytes
        if store.bytes_used != want_used:
            problems.append(f"store holds {store.bytes_used:,} B, the page tables own "
                            f"{uniq.size * ps:,} B (+{other_store_bytes:,} B elsewhere): "
                            f"{(store.bytes_used - want_used) // ps:+,} pages leaked or lost")
    if mgr._device_bytes != held_total:
        problems.append(f"manager accounts {mgr._device_bytes:,} device bytes, its buffers hold "
                        f"{held_total:,} B")
    used = None
    if mgr.backend.name == "host" and not mgr.closed:   # the host backend's allocations
        free, total = mgr.backend.mem_info()
        used = total - free
    if used is not None and used != mgr._device_bytes + other_device_bytes:
        problems.append(f"the backend has {used:,} B allocated, the manager accounts "
                        f"{mgr._device_bytes:,} B (+{other_device_bytes:,} B elsewhere)")
    summary = {"buffers": len(bufs), "pages": pages_total, "pages_compared": compared,
               "wrong_bytes": wrong, "store_pages": int(uniq.size)}
    if problems:
        err = InvariantError("; ".join(problems))
        err.summary = summary
        raise err
    return summary

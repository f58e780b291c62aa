"""The measurements behind ``gpu-backup bench``, one function per scenario.

Each function returns raw times in seconds (``time.perf_counter`` around enqueue and
synchronise), as many as its :class:`~.stats.Repeats` policy asks for (an int means
exactly that many); :func:`record` turns them into a result row.  Every function checks the
bytes it moved once, outside the timed region, and raises :class:`VerifyError` if they
differ.  Resources (device allocations, pinned buffers, managers, stores) are released
before a function returns, also on error.

The same code runs on both backends: on ``host`` the "device" is host RAM and the
numbers are host numbers, never GPU numbers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import GpuBackupError
from ..manager import BufferManager
from ..staging import Staging
from ..store import ShmemStore
from .stats import Repeats, as_repeats, spread

__all__ = [
    "PAGE_CHUNK", "OVERSUB_BUFFERS", "COPY", "EFFECTIVE", "VerifyError", "EvictRestoreTimes",
    "OversubResult", "write_device", "read_device", "check_equal", "record", "roundtrip_gbps",
    "raw_buffers", "link_times", "page_at_a_time_times", "pageable_times",
    "evict_restore_times", "first_cycle_times", "evict_zero_times", "oversubscribe",
    "swap_times", "torch_times",
]

PAGE_CHUNK = 4096
"""Bytes per copy in ``page_at_a_time``: the literal "page by page" alternative."""

OVERSUB_BUFFERS = 8
"""Buffers in the oversubscription scenario; they total twice the device budget."""

COPY = "copy"
"""A scenario that moves its bytes over the link: reported as ``ratio_to_link``."""
EFFECTIVE = "effective"
"""A scenario that copies nothing or not every byte (``evict_clean``, ``evict_zero``,
``oversubscribe``): reported as ``effective_ratio``, never against the link line."""


class VerifyError(GpuBackupError, RuntimeError):
    """Bytes read back differ from the bytes written: a correctness failure, not a timing."""


# ------------------------------------------------------------------ helpers
def write_device(arr: Any, data: np.ndarray) -> None:
    """Copy host ``data`` into the array ``access()`` yielded (numpy on host, cupy on cuda)."""
    if isinstance(arr, np.ndarray):
        arr[:] = data
    else:
        arr.set(data)  # cupy.ndarray.set: host -> device on the current stream


def read_device(arr: Any) -> np.ndarray:
    """A host copy of the array ``access()`` yielded."""
    return arr.copy() if isinstance(arr, np.ndarray) else arr.get()


def check_equal(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Raise :class:`VerifyError` with the first differing offset unless bit-exact."""
    if got.shape == want.shape and np.array_equal(got, want):
        return
    if got.shape != want.shape:
        raise VerifyError(f"{what}: read back {got.size:,} B, expected {want.size:,} B")
    bad = np.flatnonzero(got != want)
    raise VerifyError(f"{what}: {bad.size:,} of {want.size:,} B differ, first at offset "
                      f"{int(bad[0]):,} (got {int(got[bad[0]])}, expected {int(want[bad[0]])})")


def roundtrip_gbps(d2h: float, h2d: float) -> float:
    """The link figure for a round trip: bytes / (t_d2h + t_h2d) = 1 / (1/d2h + 1/h2d)."""
    return 1.0 / (1.0 / d2h + 1.0 / h2d)


def record(scenario: str, size: int, times: list[float], *, link_gbps: float | None,
           direction: str | None, kind: str = COPY, note: str | None = None,
           nbytes: int | None = None, repeats: Repeats | None = None,
           **extra: Any) -> dict[str, Any]:
    """One result row.  ``gbps`` = bytes / median time / 1e9 (``gbps_min``/``gbps_max`` from
    the slowest/fastest repeat, ``gbps_lo``/``gbps_hi`` from the quartiles).  A :data:`COPY` row has ``ratio_to_link`` = gbps /
    ``link_gbps`` (the link of the same direction at the same size, this run); an
    :data:`EFFECTIVE` row has ``effective_ratio`` instead and ``ratio_to_link`` None."""
    st = spread(times)
    moved = size if nbytes is None else nbytes
    gbps = moved / st["p50_us"] * 1e-3
    ratio = gbps / link_gbps if link_gbps else None
    rec: dict[str, Any] = {
        "scenario": scenario,
        "kind": kind,
        "size_bytes": size,
        "gbps": gbps,
        "gbps_min": moved / st["max_us"] * 1e-3,
        "gbps_max": moved / st["min_us"] * 1e-3,
        # the error bar: the interquartile range, or the full range below 5 repeats
        "gbps_lo": moved / (st["q3_us"] or st["max_us"]) * 1e-3,
        "gbps_hi": moved / (st["q1_us"] or st["min_us"]) * 1e-3,
        "ratio_to_link": ratio if kind == COPY else None,
        "effective_ratio": ratio if kind == EFFECTIVE else None,
        **st,
        "repeats": len(times),
        "stopped": (repeats or Repeats(len(times))).stop_reason(times),
        "direction": direction,
        "link_gbps": link_gbps,
    }
    if note:
        rec["note"] = note
    rec.update(extra)
    return rec


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --------------------------------------------------------- raw backend copies
@contextlib.contextmanager
def raw_buffers(backend: Any, data: np.ndarray) -> Iterator[tuple[Any, np.ndarray]]:
    """One device allocation holding ``data`` and one pinned host buffer of the same size.

    Both are the backend's, outside any manager.  They are released on exit, after the
    copy stream has drained, so no copy in flight touches them; the caller must not keep
    references past the block.
    """
    stream = backend.copy_stream
    dev = backend.alloc(data.size)
    try:
        owner, pin = backend.pinned(data.size)
        try:
            backend.h2d(dev, 0, data, stream)
            stream.synchronize()
            yield dev, pin
        finally:
            stream.synchronize()
            del pin, owner          # frees the pinned block (cuda: cudaFreeHost)
    finally:
        del dev                     # back to the allocator


def _copy_times(enqueue: Callable[[], None], stream: Any, repeats: int | Repeats) -> list[float]:
    """Times of ``enqueue(); stream.synchronize()`` after one untimed warm-up."""
    def once() -> None:
        enqueue()
        stream.synchronize()

    once()
    return as_repeats(repeats).run(once)


def link_times(backend: Any, dev: Any, pin: np.ndarray, data: np.ndarray,
               repeats: int | Repeats) -> tuple[list[float], list[float]]:
    """The link limit: one ``d2h`` (then one ``h2d``) of the whole buffer per operation
    between the device allocation and one pinned buffer.  Returns (d2h, h2d) times."""
    stream = backend.copy_stream
    pin.fill(0)
    d2h = _copy_times(lambda: backend.d2h(pin, dev, 0, stream), stream, repeats)
    check_equal(pin, data, "link_d2h")
    h2d = _copy_times(lambda: backend.h2d(dev, 0, pin, stream), stream, repeats)
    return d2h, h2d


def page_at_a_time_times(backend: Any, dev: Any, pin: np.ndarray, data: np.ndarray,
                         nbytes: int, repeats: int | Repeats) -> list[float]:
    """One 4 KiB ``d2h`` per page of the first ``nbytes``, then one synchronise: the literal
    page-by-page copy.  A Python loop per page on purpose: it is the alternative compared."""
    stream = backend.copy_stream
    views = [(pin[o:o + PAGE_CHUNK], o) for o in range(0, nbytes, PAGE_CHUNK)]
    d2h = backend.d2h

    def enqueue() -> None:
        for view, off in views:
            d2h(view, dev, off, stream)

    pin.fill(0)
    times = _copy_times(enqueue, stream, repeats)
    check_equal(pin[:nbytes], data[:nbytes], "page_at_a_time")
    return times


def pageable_times(backend: Any, dev: Any, data: np.ndarray,
                   repeats: int | Repeats) -> list[float]:
    """The route spill managers such as cuDF's take: a synchronous copy into a fresh
    pageable numpy array, then a copy of that into a preallocated host "store" array."""
    store = np.empty(data.size, np.uint8)
    store.fill(1)  # touched: the store side is warm, as gpu_backup's is

    def once() -> None:
        tmp = backend.to_host(dev, data.size)
        store[:] = tmp

    once()
    times = as_repeats(repeats).run(once)
    check_equal(store, data, "pageable")
    return times


# ----------------------------------------------------------- gpu_backup itself
@dataclass
class EvictRestoreTimes:
    evict: list[float]
    restore: list[float]
    clean: list[float]
    all_warm: bool          # every timed eviction found bytes_warm >= size
    clean_evictions: int    # how many timed clean evictions the manager counted as no-copy


def _warm_bytes(store: Any) -> int | None:
    return getattr(store, "bytes_warm", None)


def evict_restore_times(mgr: BufferManager, data: np.ndarray, repeats: int | Repeats, *,
                        clean: bool = True) -> EvictRestoreTimes:
    """gpu_backup evict and restore of one buffer in ``mgr`` as it is configured, then
    (``clean``) clean re-eviction.

    Per repeat: ``evict()`` (timed), then ``access("rw")`` of the evicted buffer (timed: the
    restore; "rw" drops the backups, so the next eviction is a real copy).  One untimed
    evict/restore comes first: the buffer's first cycle is measured on its own by
    :func:`first_cycle_times`.  Clean: after ``access("r")`` the backup stays valid, and
    ``evict()`` (timed) copies nothing.
    """
    size = data.size
    rep = as_repeats(repeats)
    buf = mgr.alloc(size)
    try:
        with buf.access("w") as arr:
            write_device(arr, data)
        buf.evict()                        # untimed: the first cycle is its own scenario
        with buf.access("rw"):
            pass
        evict: list[float] = []
        restore: list[float] = []
        all_warm = True

        def touch() -> None:
            with buf.access("rw"):
                pass

        for _ in rep.cycles(evict, restore):
            warm = _warm_bytes(mgr.store)
            all_warm &= warm is not None and warm >= size
            evict.append(_timed(buf.evict))
            restore.append(_timed(touch))
        check_equal(buf.to_host(), data, "evict/restore")
        if not clean:
            return EvictRestoreTimes(evict, restore, [], all_warm, 0)

        before = mgr.stats()["clean_evictions"]
        buf.evict()                        # a real copy; access("r") below keeps the backup
        clean_t: list[float] = []

        def read_only() -> None:
            with buf.access("r"):
                pass

        for _ in rep.cycles(clean_t):
            read_only()
            clean_t.append(_timed(buf.evict))
        cleaned = mgr.stats()["clean_evictions"] - before
        check_equal(buf.to_host(), data, "clean re-eviction")
    finally:
        buf.free()
    return EvictRestoreTimes(evict, restore, clean_t, all_warm, cleaned)


def first_cycle_times(device: Any, page_size: int, staging: Staging, data: np.ndarray,
                      repeats: int | Repeats) -> tuple[list[float], list[float]]:
    """The first evict and restore of a buffer in a new ``BufferManager`` with its own
    default store, as a user's first eviction runs: a new manager per repeat.  Returns
    (evict, restore) times; the bytes are checked after the last repeat."""
    evict: list[float] = []
    restore: list[float] = []
    rep = as_repeats(repeats)
    for _ in rep.cycles(evict, restore):
        with BufferManager(device, page_size=page_size, staging=staging) as mgr:
            buf = mgr.alloc(data.size)
            try:
                with buf.access("w") as arr:
                    write_device(arr, data)
                evict.append(_timed(buf.evict))

                def touch() -> None:
                    with buf.access("rw"):
                        pass

                restore.append(_timed(touch))
                got = buf.to_host()
            finally:
                buf.free()
        check_equal(got, data, "first evict/restore")
    return evict, restore


def evict_zero_times(device: Any, page_size: int, staging: Staging, size: int,
                     repeats: int | Repeats, store: ShmemStore | None = None) -> list[float]:
    """Eviction of an all-zero buffer with the zero-page scan on: the scan finds every page
    zero, nothing is copied, and restore is a memset.  Verifies both.  ``store`` None:
    the manager's own default store."""
    times: list[float] = []
    with BufferManager(device, store=store, page_size=page_size, staging=staging,
                       zero_scan=True) as mgr:
        buf = mgr.alloc(size)
        zeros = np.zeros(size, np.uint8)
        with buf.access("w") as arr:
            write_device(arr, zeros)
        for _ in as_repeats(repeats).cycles(times):
            times.append(_timed(buf.evict))
            with buf.access("rw"):
                pass
        copied = mgr.stats()["bytes_copied_out"]
        if copied:
            raise VerifyError(f"evict_zero: {copied:,} B were copied for an all-zero buffer")
        check_equal(buf.to_host(), zeros, "evict_zero")
        buf.free()
    return times


def swap_times(device: Any, page_size: int, staging: Staging, data: np.ndarray,
               repeats: int | Repeats, *, swap: bool | None = None,
               series: list[float] | None = None) -> tuple[list[float], int]:
    """A miss under a one-buffer ``device_limit``: two buffers of ``data.size`` B, one
    resident; each timed repeat is ``access("rw")`` of the evicted one, which evicts the
    other to make room.  With swap on a miss (``swap`` None: the manager's default, on for
    cuda) the target is restored into the victim's memory while the victim is evicted from
    it, both directions at once; otherwise the two run in series.

    ``series`` (a list): also time, alternating with the swaps, the same miss done in
    series (``victim.evict()`` then the restore), appended there.  Returns the swap times
    and how many misses the manager served by swapping; both buffers are checked at the
    end."""
    size = data.size
    datas = [data, data[::-1].copy()]
    with BufferManager(device, device_limit=size, page_size=page_size,
                       staging=staging) as mgr:
        if swap is not None:
            mgr._pager.swap_on_miss = swap
        bufs = []
        try:
            for d in datas:
                b = mgr.alloc(size)         # the second evicts the first
                with b.access("w") as arr:
                    write_device(arr, d)
                bufs.append(b)
            resident, evicted = bufs[1], bufs[0]

            def miss(first_evict: bool) -> float:
                nonlocal resident, evicted
                t0 = time.perf_counter()
                if first_evict:
                    resident.evict()
                with evicted.access("rw"):  # rw: the backups go, the next eviction copies
                    pass
                dt = time.perf_counter() - t0
                resident, evicted = evicted, resident
                return dt

            for _ in range(2):              # untimed: the store's pages and the pools warm
                miss(False)
            swaps0 = mgr.stats()["swaps"]
            times: list[float] = []
            timed = (times,) if series is None else (times, series)
            for _ in as_repeats(repeats).cycles(*timed):
                times.append(miss(False))
                if series is not None:
                    series.append(miss(True))
            swaps = mgr.stats()["swaps"] - swaps0
            for b, d in zip(bufs, datas):
                check_equal(b.to_host(), d, "swap")
        finally:
            for b in bufs:
                b.free()
    return times, swaps


@dataclass
class OversubResult:
    seconds: float          # all timed touches
    touch_times: list[float]
    touches: int
    misses: int             # restores the manager counted during the timed touches
    device_limit: int
    buffers: int


def _read_byte(arr: Any) -> int:
    return int(arr[0])      # cupy: a device -> host copy and a sync


def oversubscribe(device: Any, page_size: int, staging: Staging, data: np.ndarray,
                  touches: int, rng: np.random.Generator, store: ShmemStore | None = None,
                  host_capacity: int | None = None) -> OversubResult:
    """:data:`OVERSUB_BUFFERS` buffers of ``data.size`` B under a ``device_limit`` of half
    their total, touched in random order (``access("rw")``, read one byte).  ``store``
    None: the manager's own default store.

    One untimed pass touches every buffer first; the timed touches follow.  Every buffer
    is checked at the end.
    """
    size = data.size
    limit = OVERSUB_BUFFERS * size // 2
    with BufferManager(device, device_limit=limit, store=store, page_size=page_size,
                       staging=staging, host_capacity=host_capacity) as mgr:
        bufs = []
        try:
            for _ in range(OVERSUB_BUFFERS):
                buf = mgr.alloc(size)
                bufs.append(buf)
                with buf.access("w") as arr:
                    write_device(arr, data)

            def touch(i: int) -> None:
                with bufs[i].access("rw") as arr:
                    _read_byte(arr)

            for i in rng.permutation(OVERSUB_BUFFERS).tolist():
                touch(i)
            order = rng.integers(0, OVERSUB_BUFFERS, touches).tolist()
            before = mgr.stats()["restores"]
            t_all = time.perf_counter()
            times = [_timed(lambda i=i: touch(i)) for i in order]
            seconds = time.perf_counter() - t_all
            misses = mgr.stats()["restores"] - before
            for k, buf in enumerate(bufs):
                check_equal(buf.to_host(), data, f"oversubscribe buffer {k}")
        finally:
            for buf in bufs:
                buf.free()
    return OversubResult(seconds, times, touches, misses, limit, OVERSUB_BUFFERS)


# ------------------------------------------------------------------ torch
def torch_times(device_id: int, data: np.ndarray,
                repeats: int | Repeats) -> tuple[list[float], list[float]]:
    """PyTorch's own route: ``pinned.copy_(t_cuda, non_blocking=True)`` then
    ``torch.cuda.synchronize()``, and back.  Needs torch with CUDA; returns (d2h, h2d)."""
    import torch

    dev = torch.device("cuda", device_id)
    src = torch.from_numpy(data).to(dev)
    host = torch.empty(data.size, dtype=torch.uint8, pin_memory=True)
    try:
        def d2h() -> None:
            host.copy_(src, non_blocking=True)
            torch.cuda.synchronize(dev)

        def h2d() -> None:
            src.copy_(host, non_blocking=True)
            torch.cuda.synchronize(dev)

        d2h()
        check_equal(host.numpy(), data, "torch d2h")
        t_d2h = as_repeats(repeats).run(d2h)
        h2d()
        t_h2d = as_repeats(repeats).run(h2d)
        return t_d2h, t_h2d
    finally:
        del src, host
        torch.cuda.empty_cache()

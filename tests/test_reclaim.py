"""Reclaim that neither spins nor gives up early: progress is what the manager's accounting
shows released, a shrinker that lies or returns nonsense is skipped (and named), and an
allocation waits for memory another thread is evicting instead of failing."""

from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np
import pytest

import gpu_backup as gb
from gpu_backup.testing import check_invariants

PS = gb.PAGE_SIZE
STAGING = gb.Staging(slots=2, slot_bytes=4 * PS, threads=2)


class Liar:
    """Claims whatever it is asked for; frees nothing."""

    def __init__(self) -> None:
        self.calls = 0

    def __repr__(self) -> str:
        return "<Liar cache>"

    def count(self) -> int:
        return 1 << 30

    def scan(self, n: int) -> int:
        self.calls += 1
        return n


def _fill(buf, value) -> None:
    with buf.access("w") as a:
        a[:] = value


def _alloc_in_thread(mgr, nbytes, timeout=20):
    out = []

    def go():
        try:
            out.append(mgr.alloc(nbytes))
        except BaseException as e:  # noqa: BLE001 - reported below
            out.append(f"{type(e).__name__}: {e}")

    t = threading.Thread(target=go)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "alloc hangs"
    return out[0]


def test_lying_shrinker_cannot_make_alloc_spin():
    with gb.BufferManager("host", host_capacity=16 * PS, staging=STAGING) as mgr:
        mgr.reclaim_wait = 0.5
        liar = Liar()
        mgr.register_shrinker(liar)
        b = mgr.alloc(16 * PS)
        with b.access("r"):                          # pinned: the LRU shrinker cannot help
            # The allocation waits (bounded) for the main thread's access() to end, which
            # it never does here; it reclaims again and again meanwhile.
            got = _alloc_in_thread(mgr, 8 * PS)
        assert isinstance(got, str) and got.startswith("OutOfDeviceMemory: cannot allocate 32,768 B")
        assert "waited 0.5 s" in got
        s = mgr.stats()
        assert s["reclaim_false_claims"] == 2
        assert s["reclaim_calls"] > 3                # it did reclaim again while waiting...
        assert liar.calls == 2                       # ...but asked the liar twice only
        assert mgr.device_bytes == 16 * PS and mgr.backend.allocated_bytes == 16 * PS


@pytest.mark.parametrize("value", [None, math.nan, 1.5, -7, "lots", np.float64(4096), True])
def test_shrinker_nonsense_is_named_and_skipped(value, caplog):
    class Odd:
        def __repr__(self):
            return "<Odd cache>"

        def count(self):
            return 1000

        def scan(self, n):
            return value

    with gb.BufferManager("host", staging=STAGING) as mgr:
        mgr.register_shrinker(Odd())
        b = mgr.alloc(4 * PS)
        _fill(b, 1)
        with caplog.at_level(logging.WARNING, logger="gpu_backup"):
            freed = mgr.shrink(8 * PS)                     # more than the LRU can give
        assert type(freed) is int and freed == 4 * PS      # the LRU shrinker did its part
        msgs = [r.getMessage() for r in caplog.records]
        assert any("<Odd cache>" in m and repr(value) in m for m in msgs), msgs
        assert mgr.stats()["reclaim_shrinkers_skipped"] >= 1


@pytest.mark.parametrize("value", [None, math.nan, -5, "x"])
def test_shrinker_count_nonsense_is_skipped(value, caplog):
    class OddCount:
        scanned = 0

        def count(self):
            return value

        def scan(self, n):
            self.scanned += 1
            return n

    with gb.BufferManager("host", staging=STAGING) as mgr:
        odd = OddCount()
        mgr.register_shrinker(odd)
        with caplog.at_level(logging.WARNING, logger="gpu_backup"):
            assert mgr.shrink(100) == 0
        assert odd.scanned == 0
        assert any("count()" in r.getMessage() for r in caplog.records)


def test_log_records_keep_no_exception_or_buffer_alive(caplog):
    class Raises:
        def count(self):
            return 100

        def scan(self, n):
            raise RuntimeError("cache bug")

    with gb.BufferManager("host", staging=STAGING) as mgr:
        mgr.register_shrinker(Raises())
        b = mgr.alloc(4 * PS)
        _fill(b, 1)
        real = mgr._evict

        def fail(buf, **kw):
            raise gb.CopyError(f"injected for {buf!r}")

        mgr._evict = fail
        with caplog.at_level(logging.WARNING, logger="gpu_backup"):
            mgr.shrink(4 * PS)
        mgr._evict = real
        assert len(caplog.records) >= 2
        for r in caplog.records:
            assert isinstance(r.msg, str) and r.exc_info is None
            for arg in r.args or ():
                assert isinstance(arg, (str, int, float)), (r.msg, arg)
        msgs = " ".join(r.getMessage() for r in caplog.records)
        assert "RuntimeError: cache bug" in msgs and "CopyError: injected" in msgs


def test_allocation_waits_for_an_eviction_in_flight():
    """Thread E's reclaim evicts buffer X (its store write is held up); thread A needs X's memory
    under the limit.  The old reclaim gave up after three tries in ~3 ms; now A waits on
    the release and succeeds.  No sleeps: E's write proceeds only once A is waiting."""
    gate_open = threading.Event()
    waiting = threading.Event()

    class SlowStore(gb.ShmemStore):
        def write(self, handles, data):
            assert waiting.wait(20), "the allocation never waited"
            super().write(handles, data)

    store = SlowStore(1 << 20)
    try:
        with gb.BufferManager("host", store=store, device_limit=8 * PS, staging=STAGING) as mgr:
            x = mgr.alloc(8 * PS)
            _fill(x, 0x5A)
            cond = mgr._mem_freed
            real_wait_for = cond.wait_for

            woke: list[bool] = []

            def wait_for(pred, timeout=None):
                waiting.set()
                woke.append(real_wait_for(pred, timeout))
                return woke[-1]

            cond.wait_for = wait_for
            # E's eviction is a reclaim on another thread (its own allocation, say)
            evictor = threading.Thread(target=lambda: (gate_open.set(), mgr.shrink(8 * PS)))
            evictor.start()
            assert gate_open.wait(20)
            while not x._lock.locked():      # until E holds X (its eviction is under way)
                pass
            got = _alloc_in_thread(mgr, 8 * PS)
            evictor.join(20)
            assert isinstance(got, gb.Buffer), got
            assert waiting.is_set() and woke[-1] is True     # woken by the release, not a timeout
            assert mgr.device_bytes == 8 * PS and mgr.stats()["peak_device_bytes"] <= 8 * PS
            got.free()
            assert np.unique(x.to_host()).tolist() == [0x5A]
    finally:
        store.close()


def test_sixteen_threads_under_a_small_limit_never_oom_spuriously():
    """16 threads, each pinning at most one buffer of at most 4 pages at a time, under a
    limit of 16 x 4 pages: pinned + requested never exceeds the limit, so no allocation
    may fail."""
    nthreads, maxp, ops = 16, 16, 250
    limit = nthreads * maxp * PS

    class SlowStore(gb.ShmemStore):
        """Writes that take a while, as a real store's page faults do: evictions stay in
        flight long enough for other threads to need the memory they are freeing (the
        results never depend on how long)."""

        def write(self, handles, data):
            time.sleep(0.0005)
            super().write(handles, data)

    store = SlowStore(16 << 20)
    errors: list[str] = []
    ooms = [0]
    with gb.BufferManager("host", store=store, device_limit=limit, staging=STAGING) as mgr:
        models: list[dict] = [{} for _ in range(nthreads)]

        def worker(i):
            r = np.random.default_rng(i)
            mine = models[i]
            try:
                for _ in range(ops):
                    op = r.integers(0, 10)
                    if len(mine) > 1:           # few buffers: the memory others need is
                        b = next(iter(mine))    # often in flight, not idle
                        b.free()
                        del mine[b]
                    if op < 3 or not mine:
                        n = int(r.integers(maxp // 2, maxp + 1)) * PS - int(r.integers(0, 100))
                        try:
                            b = mgr.alloc(n)
                        except gb.OutOfDeviceMemory:
                            ooms[0] += 1
                            continue
                        d = r.integers(0, 256, n, dtype=np.uint8)
                        _fill(b, d)
                        mine[b] = d
                        continue
                    b = list(mine)[int(r.integers(0, len(mine)))]
                    if op < 6:
                        with b.access("rw") as a:
                            if not np.array_equal(a, mine[b]):
                                errors.append(f"thread {i}: buffer #{b.id} wrong before a write")
                            a[:7] = r.integers(0, 256, 7, dtype=np.uint8)
                            mine[b] = a.copy()
                            time.sleep(0.0005)  # a kernel runs: most memory is pinned
                    elif op < 8:
                        if not np.array_equal(b.to_host(), mine[b]):
                            errors.append(f"thread {i}: buffer #{b.id} wrong")
                    elif op < 9:
                        b.evict()
                    else:
                        b.free()
                        del mine[b]
            except gb.OutOfDeviceMemory:
                ooms[0] += 1
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(f"thread {i}: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(nthreads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads), "deadlock"
        assert ooms[0] == 0, f"{ooms[0]} spurious OutOfDeviceMemory"
        assert not errors, errors[:5]
        expected = {b: d for m in models for b, d in m.items()}
        check_invariants(mgr, expected)
        assert mgr.stats()["peak_device_bytes"] <= limit
        for b in expected:
            b.free()
        models.clear()
        assert mgr.device_bytes == 0 and store.bytes_used == 0
        assert mgr.backend.allocated_bytes == 0
    store.close()

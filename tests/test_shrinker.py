"""Reclaim: the shrinker contract, the LRU policy, device limits and the CuPy hook."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import gpu_backup as gb
from conftest import fill, random_bytes

PS = gb.PAGE_SIZE
R = gb.Residency


class FakeCache:
    """An application cache that can drop entries: a shrinker of its own."""

    def __init__(self, nbytes: int, *, stop_after: int | None = None, seeks: int = 2) -> None:
        self.held = nbytes
        self.calls: list[int] = []
        self.stop_after = stop_after
        self.seeks = seeks

    def count(self) -> int:
        return self.held if self.held else gb.SHRINK_EMPTY

    def scan(self, nr_to_scan: int) -> int:
        self.calls.append(nr_to_scan)
        if self.stop_after is not None and len(self.calls) > self.stop_after:
            return gb.SHRINK_STOP
        got = min(nr_to_scan, self.held, 100)
        self.held -= got
        return got


def test_working_set_of_three_times_the_limit(make_mgr, rng):
    limit = 40 * PS
    mgr = make_mgr(device_limit=limit)
    bufs, data = [], []
    for _ in range(12):                       # 12 x 10 pages = 3 x the limit
        b = mgr.alloc(10 * PS - 123)
        d = random_bytes(rng, b.nbytes)
        fill(b, d)
        bufs.append(b)
        data.append(d)
        assert mgr.device_bytes <= limit
    for i in rng.integers(0, len(bufs), 60):
        b, d = bufs[i], data[i]
        with b.access("rw") as arr:
            assert mgr.device_bytes <= limit
            new = random_bytes(rng, 16)
            if isinstance(arr, np.ndarray):
                arr[:16] = new
            else:
                arr[:16].set(new)
            d[:16] = new
    for b, d in zip(bufs, data):
        np.testing.assert_array_equal(b.to_host(), d)
    s = mgr.stats()
    assert s["peak_device_bytes"] <= limit
    assert s["evictions"] > 0 and s["restores"] > 0 and s["reclaim_calls"] > 0


def test_custom_shrinker_contract(mgr):
    cache = FakeCache(1000)
    mgr.register_shrinker(cache)
    assert mgr.shrink(250) == 250
    assert cache.calls and all(n > 0 for n in cache.calls)
    assert cache.held == 750
    with pytest.raises(ValueError, match="already registered"):
        mgr.register_shrinker(cache)
    mgr.unregister_shrinker(cache)
    assert mgr.shrink(100) == 0
    assert cache.held == 750
    with pytest.raises(ValueError, match="not registered"):
        mgr.unregister_shrinker(cache)
    with pytest.raises(TypeError, match="count"):
        mgr.register_shrinker(object())


def test_shrink_stop_ends_the_pass(mgr):
    stopper = FakeCache(10_000, stop_after=0)
    other = FakeCache(10_000)
    mgr.register_shrinker(stopper)
    mgr.register_shrinker(other)
    freed = mgr.shrink(5_000)
    assert len(stopper.calls) == 1            # SHRINK_STOP: not asked again in this reclaim
    assert len(other.calls) == 50             # the others go on while they make progress
    assert freed == 5_000 and stopper.held == 10_000


def test_pressure_is_shared_by_count_over_seeks(mgr):
    cheap = FakeCache(10_000, seeks=1)
    dear = FakeCache(10_000, seeks=4)
    mgr.register_shrinker(cheap)
    mgr.register_shrinker(dear)
    mgr.shrink(50)
    assert cheap.calls[0] == 40 and dear.calls[0] == 10


def test_empty_shrinker_is_not_scanned(mgr):
    empty = FakeCache(0)
    mgr.register_shrinker(empty)
    assert mgr.shrink(10) == 0
    assert empty.calls == []


def test_reclaim_never_recurses(mgr):
    class Reentrant:
        def __init__(self):
            self.inner = None

        def count(self):
            return 100

        def scan(self, n):
            self.inner = mgr.shrink(n)    # e.g. the cache allocates while freeing
            return gb.SHRINK_STOP

    r = Reentrant()
    mgr.register_shrinker(r)
    mgr.shrink(10)
    assert r.inner == 0
    assert mgr.stats()["reclaim_recursions_refused"] >= 1


def test_buffers_in_use_are_never_evicted(make_mgr, rng):
    mgr = make_mgr(device_limit=30 * PS)
    a, b = mgr.alloc(10 * PS), mgr.alloc(10 * PS)
    fill(a, random_bytes(rng, a.nbytes))
    fill(b, random_bytes(rng, b.nbytes))
    with a.access("r"), b.access("r"):
        assert mgr.shrink(1 << 30) == 0
        assert a.state is R.RESIDENT and b.state is R.RESIDENT
        with pytest.raises(gb.OutOfDeviceMemory, match=r"asked 61,440 B, reclaimable 0 B, pinned in access\(\) 81,920 B"):
            mgr.alloc(15 * PS)
    assert mgr.alloc(10 * PS).state is R.RESIDENT


def test_own_pins_fail_at_once_without_waiting(make_mgr):
    """Only this thread's accesses hold the device: waiting could only wait for itself, so
    the allocation fails at once rather than after reclaim_wait."""
    mgr = make_mgr(device_limit=20 * PS)
    mgr.reclaim_wait = 5.0
    a, b = mgr.alloc(10 * PS), mgr.alloc(10 * PS)
    with a.access("w"), b.access("w"):
        t0 = time.monotonic()
        with pytest.raises(gb.OutOfDeviceMemory, match=r"pinned in access\(\) 81,920 B"):
            mgr.alloc(PS)
        assert time.monotonic() - t0 < 1.0


def test_allocation_waits_for_another_threads_access_to_end(make_mgr, rng):
    """The device is full of buffers inside another thread's access(): the allocation waits
    for that access to end, then evicts the buffer and succeeds; no byte is lost."""
    mgr = make_mgr(device_limit=20 * PS)
    a, b = mgr.alloc(10 * PS), mgr.alloc(10 * PS)
    da, db = random_bytes(rng, a.nbytes), random_bytes(rng, b.nbytes)
    fill(a, da)
    fill(b, db)
    inside, leave = threading.Event(), threading.Event()

    def user():
        with a.access("r"), b.access("r"):
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=user)
    t.start()
    assert inside.wait(10)
    threading.Timer(0.3, leave.set).start()
    t0 = time.monotonic()
    c = mgr.alloc(10 * PS)          # waits for the other thread's access() to end
    waited = time.monotonic() - t0
    t.join(10)
    assert 0.2 < waited < 5.0, waited
    assert c.state is R.RESIDENT
    assert (a.state, b.state).count(R.EVICTED) == 1
    assert np.array_equal(a.to_host(), da) and np.array_equal(b.to_host(), db)


def test_threads_waiting_on_each_others_pins_give_up_after_reclaim_wait(make_mgr):
    """Two threads each hold the device through an access() and each want more: neither
    pin can end while both wait, so the wait is bounded by reclaim_wait.  The first to give
    up says so and leaves its access(); the other may then evict that buffer and succeed."""
    mgr = make_mgr(device_limit=20 * PS)
    mgr.reclaim_wait = 0.5
    bufs = [mgr.alloc(10 * PS) for _ in range(2)]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []
    got: list[gb.Buffer] = []

    def user(i):
        with bufs[i].access("w"):
            barrier.wait(10)
            try:
                got.append(mgr.alloc(10 * PS))
            except gb.OutOfDeviceMemory as e:
                errors.append(e)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(2)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads)
    assert errors and len(errors) + len(got) == 2, (errors, got)
    assert all("waited 0.5 s for memory other threads held" in str(e) for e in errors), errors
    assert 0.4 < time.monotonic() - t0 < 10
    assert mgr.device_bytes == 20 * PS
    assert not any(b.pinned for b in mgr.buffers())
    assert mgr.alloc(10 * PS).state is R.RESIDENT   # nothing left pinned


def test_purgeable_and_clean_go_first_then_lru_order(make_mgr, rng):
    mgr = make_mgr()
    old_dirty = mgr.alloc(8 * PS)
    dirty = mgr.alloc(8 * PS)
    clean = mgr.alloc(8 * PS)
    purgeable = mgr.alloc(8 * PS, purgeable=True)
    for x in (old_dirty, dirty, clean, purgeable):
        fill(x, random_bytes(rng, x.nbytes))
    clean.evict()
    with clean.access("r"):
        pass                                  # resident again, backup still valid
    out0 = mgr.stats()["bytes_copied_out"]
    assert mgr.shrink(16 * PS) == 16 * PS     # no copy needed for these two
    assert purgeable.state is R.PURGED and clean.state is R.EVICTED
    assert old_dirty.state is R.RESIDENT and dirty.state is R.RESIDENT
    s = mgr.stats()
    assert s["lru_cheap_freed"] == 16 * PS and s["bytes_copied_out"] == out0
    with old_dirty.access("r"):
        pass                                  # now the most recently used
    assert mgr.shrink(PS) == 8 * PS
    assert dirty.state is R.EVICTED and old_dirty.state is R.RESIDENT
    assert mgr.stats()["lru_idle_freed"] == 8 * PS


def test_pending_use_is_waited_for_only_in_the_last_pass(make_mgr, rng, slow_write):
    mgr = make_mgr()
    busy = mgr.alloc(1 << 20)
    idle = mgr.alloc(1 << 20)
    fill(idle, random_bytes(rng, idle.nbytes))
    stream = slow_write.stream(mgr)
    with busy.access("rw", stream=stream) as arr:
        expected = slow_write(stream, arr)
    assert mgr.shrink(1) == 1 << 20
    assert idle.state is R.EVICTED and busy.state is R.RESIDENT   # idle first
    assert mgr.shrink(1) == 1 << 20                                # then waits for busy
    np.testing.assert_array_equal(busy.to_host(), expected)


def test_host_store_full_refuses_rather_than_overcommit(make_mgr, rng):
    store = gb.ShmemStore(4 * PS)
    try:
        mgr = make_mgr(store=store)
        b = mgr.alloc(8 * PS)
        d = random_bytes(rng, b.nbytes)
        fill(b, d)
        assert mgr.shrink(8 * PS) == 0
        assert b.state is R.RESIDENT and store.bytes_used == 0
        assert mgr.stats()["lru_skipped_host_full"] >= 1
        np.testing.assert_array_equal(b.to_host(), d)
        mgr.close()
    finally:
        store.close()


def test_failed_eviction_moves_to_lru_tail(make_mgr, rng, monkeypatch):
    mgr = make_mgr()
    first, second = mgr.alloc(4 * PS), mgr.alloc(4 * PS)
    for x in (first, second):
        fill(x, random_bytes(rng, x.nbytes))
    real = mgr._evict

    def fail_first(buf, **kw):
        if buf is first:
            raise gb.CopyError("injected")
        return real(buf, **kw)

    monkeypatch.setattr(mgr, "_evict", fail_first)
    assert mgr.shrink(PS) == 4 * PS
    assert second.state is R.EVICTED and first.state is R.RESIDENT
    assert mgr.buffers()[-1] is first


def test_device_oom_triggers_reclaim(rng):
    with gb.BufferManager("host", host_capacity=32 * PS,
                          staging=gb.Staging(slots=2, slot_bytes=8 * PS, threads=1)) as mgr:
        bufs = [mgr.alloc(8 * PS) for _ in range(4)]
        data = [random_bytes(rng, b.nbytes) for b in bufs]
        for b, d in zip(bufs, data):
            fill(b, d)
        extra = mgr.alloc(16 * PS)            # the "device" is full: two LRU buffers go
        assert extra.state is R.RESIDENT
        assert [b.state for b in bufs[:2]] == [R.EVICTED, R.EVICTED]
        for b, d in zip(bufs, data):
            np.testing.assert_array_equal(b.to_host(), d)
        with pytest.raises(gb.OutOfDeviceMemory, match="cannot allocate 167,936 B on host"):
            mgr.alloc(41 * PS)
        assert isinstance(gb.OutOfDeviceMemory("x"), MemoryError)


def test_concurrent_allocation_under_pressure(make_mgr):
    mgr = make_mgr(device_limit=96 * PS)
    errors: list[BaseException] = []
    stop = time.monotonic() + 20

    def worker(seed):
        r = np.random.default_rng(seed)
        try:
            mine = []
            for _ in range(30):
                if time.monotonic() > stop:
                    break
                b = mgr.alloc(int(r.integers(1, 24)) * PS)
                d = random_bytes(r, b.nbytes)
                fill(b, d)
                mine.append((b, d))
                b2, d2 = mine[int(r.integers(0, len(mine)))]
                np.testing.assert_array_equal(b2.to_host(), d2)
            for b, d in mine:
                np.testing.assert_array_equal(b.to_host(), d)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert not errors, errors[0]
    assert mgr.stats()["peak_device_bytes"] <= 96 * PS


def test_device_limit_arguments():
    with pytest.raises(ValueError, match=r"device_limit=1.5 as a fraction must be in \(0, 1\]"):
        gb.BufferManager("host", device_limit=1.5)
    with pytest.raises(ValueError, match="must be > 0 bytes"):
        gb.BufferManager("host", device_limit=0)
    with gb.BufferManager("host", device_limit=0.5, host_capacity=1 << 20) as m:
        assert m.device_limit == 1 << 19
        with pytest.raises(gb.OutOfDeviceMemory, match="larger than device_limit=524,288 B"):
            m.alloc(1 << 20)


# -------------------------------------------------------------- CuPy allocator hook
class FakeDevice:
    """A CuPy-style allocator over a fixed budget, raising CuPy's own OutOfMemoryError."""

    def __init__(self, cupy, capacity: int) -> None:
        self.cp = cupy
        self.capacity = capacity
        self.used = 0

    def malloc(self, nbytes: int):
        if self.used + nbytes > self.capacity:
            raise self.cp.cuda.memory.OutOfMemoryError(nbytes, self.used)
        self.used += nbytes
        return ("block", nbytes)


def test_cupy_allocator_hook_reclaims_and_restores(mgr):
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    original = cupy.cuda.get_allocator()
    fake = FakeDevice(cupy, 1000)
    cache = FakeCache(0)

    class Frees:                       # frees the fake device's memory when scanned
        def count(self):
            return fake.used or gb.SHRINK_EMPTY

        def scan(self, n):
            got = min(n, fake.used)
            fake.used -= got
            cache.calls.append(n)
            return got

    cupy.cuda.set_allocator(fake.malloc)
    try:
        mgr.register_shrinker(Frees())
        with mgr.cupy_allocator():
            assert cupy.cuda.get_allocator() != fake.malloc
            hooked = cupy.cuda.get_allocator()
            assert hooked(600) == ("block", 600)
            assert hooked(600) == ("block", 600)      # OOM -> reclaim -> retry
            assert cache.calls
            with pytest.raises(gb.OutOfDeviceMemory, match=r"Out of memory allocating 5,000 bytes "
                               r"\(allocated so far: 0 bytes\): gpu_backup reclaimed 600 B"):
                hooked(5000)
        assert cupy.cuda.get_allocator() == fake.malloc   # put back
        s = mgr.stats()
        assert s["cupy_oom_events"] == 2 and s["cupy_oom_recovered"] == 1
    finally:
        cupy.cuda.set_allocator(original)
    assert cupy.cuda.get_allocator() == original


def test_cupy_allocator_restored_on_error_and_close(make_mgr):
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    original = cupy.cuda.get_allocator()
    mgr = make_mgr()
    with pytest.raises(RuntimeError, match="boom"):
        with mgr.cupy_allocator():
            raise RuntimeError("boom")
    assert cupy.cuda.get_allocator() == original
    cm = mgr.cupy_allocator()
    cm.__enter__()
    assert cupy.cuda.get_allocator() != original
    mgr.close()                                    # close puts it back too
    assert cupy.cuda.get_allocator() == original

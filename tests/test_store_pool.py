"""The store's free-page pool (like TTM's ttm_pool): sized to half of host memory by default,
kept to the working set, given back under memory pressure, after idle decay, and on trim.

Host memory and time are injected (``host_memory=``, ``clock=``), so pressure and decay
are simulated exactly; passes are run with ``reclaim(now=...)``.
"""

from __future__ import annotations

import threading
import time
import weakref

import numpy as np
import pytest

import gpu_backup as gb
from gpu_backup import _faults, _os
from gpu_backup.store import _pool
from conftest import pages, readback

PS = gb.PAGE_SIZE
GiB = 1 << 30


class FakeHost:
    """A host-memory reader whose RAM is ``limit`` bytes, of which the stores attached to it
    take what their files hold (``bytes_resident``), and ``other`` is taken by the rest."""

    def __init__(self, limit: int = 8 * GiB, other: int = 0) -> None:
        self.limit, self.other = limit, other
        self.stores: list[gb.ShmemStore] = []

    def read(self, *, fresh: bool = False) -> dict[str, int]:
        used = self.other + sum(s.bytes_resident for s in self.stores if not s.closed)
        return {"total": self.limit, "available": max(0, self.limit - used),
                "swap_total": 0, "swap_free": 0}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def host():
    return FakeHost()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def make(host, clock):
    made: list[gb.ShmemStore] = []

    def make(capacity=64 << 20, **kw):
        kw.setdefault("host_reserve", 0)
        s = gb.ShmemStore(capacity, host_memory=host, clock=clock, **kw)
        host.stores.append(s)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


# ------------------------------------------------------------------ sizing
def test_default_pool_is_half_of_the_memory_the_process_may_use(host):
    host.limit = 6 * GiB          # as a cgroup limit would report it through the reader
    with gb.ShmemStore(1 << 20, host_memory=host) as s:
        assert s.warm_slack == 3 * GiB
    with gb.ShmemStore(1 << 20, host_memory=host, warm_slack=PS) as s:
        assert s.warm_slack == PS  # an explicit cap wins
    with gb.ShmemStore(1 << 20) as s:  # the process's own reader
        assert s.warm_slack == _os.host_memory.read(fresh=True)["total"] // 2


def test_pool_grows_to_the_working_set_and_no_further(make, rng):
    s = make()
    n = 96
    data = pages(rng, n)
    for _ in range(5):
        h = s.backup(data)
        np.testing.assert_array_equal(readback(s, h), data)
        s.drop(h)
        assert s.bytes_warm == n * PS and s.bytes_resident == n * PS
    st = s.stats()
    assert st["cold_allocs"] == n and st["warm_hits"] == 4 * n and st["pages_released"] == 0
    # Two buffers alive at once: the working set doubles, and so does the pool; no more.
    for _ in range(3):
        a, b = s.backup(data), s.backup(data)
        s.drop(a)
        s.drop(b)
    assert s.bytes_warm == 2 * n * PS and s.bytes_resident == 2 * n * PS
    assert s._audit() == {"cold": s.npages - 2 * n, "warm": 2 * n, "used": 0, "busy": 0}


def test_drop_punches_no_hole_on_the_callers_thread(make, rng, monkeypatch):
    removes: list[str] = []
    real = _os.Mapping.madvise

    def spy(self, advice, offset, length):
        if advice == _os.MADV_REMOVE:
            removes.append(threading.current_thread().name)
        return real(self, advice, offset, length)

    monkeypatch.setattr(_os.Mapping, "madvise", spy)
    s = make()
    data = pages(rng, 256)
    for _ in range(4):
        s.drop(s.backup(data))
    assert removes == []
    host_pressure = FakeHost(other=8 * GiB)          # no memory left at all
    s._mem = host_pressure
    s.drop(s.backup(data))                           # under pressure: released now
    assert removes and s.bytes_warm == 0 and s.bytes_resident == 0


def test_explicit_slack_caps_the_pool(make, rng):
    s = make(warm_slack=16 * PS)
    s.drop(s.backup(pages(rng, 100)))
    assert s.bytes_warm == 16 * PS and s.bytes_resident == 16 * PS


# ----------------------------------------------------------------- pressure
def test_pressure_shrinks_the_pool_to_its_floor_and_backups_still_succeed(make, host, clock, rng):
    host.limit = 64 << 20
    s = make(watermark=16 << 20, warm_floor=8 * PS, warm_slack=64 << 20)
    n = (40 << 20) // PS
    s.drop(s.backup(pages(rng, n)))
    assert s.bytes_warm == n * PS                       # 24 MiB available: no pressure
    assert s.reclaim() == 0 and s.bytes_warm == n * PS
    host.other = 16 << 20                               # something else takes 16 MiB
    assert host.read()["available"] < s.watermark
    assert s.reclaim() == (n - 8) * PS                  # one pass: down to the floor
    assert s.bytes_warm == 8 * PS and s.bytes_resident == 8 * PS
    assert s.stats()["pages_reclaimed"] == n - 8
    # A backup that needs the memory the pool gave back succeeds, bytes intact.
    big = pages(rng, (48 << 20) // PS - 8)
    h = s.backup(big)
    np.testing.assert_array_equal(readback(s, h), big)
    assert s._audit()["busy"] == 0


def test_the_maintainer_reclaims_under_pressure_within_one_decay_period(make, host, clock, rng):
    host.limit = 64 << 20
    s = make(watermark=16 << 20, warm_decay=2.0)
    s.drop(s.backup(pages(rng, 1024)))
    maint = s._holder.maintainer
    assert maint is not None and maint.alive and maint.interval <= s.warm_decay / 4
    host.other = 60 << 20
    passes = s.stats()["reclaim_passes"]
    maint.wake()
    deadline = time.monotonic() + 30
    while s.bytes_warm and time.monotonic() < deadline:
        maint.wake()
        time.sleep(0.01)
    assert s.bytes_warm == 0 and s.stats()["reclaim_passes"] > passes


# -------------------------------------------------------------------- decay
def test_idle_pages_decay_after_one_to_two_periods(make, clock, rng):
    s = make(warm_decay=10.0)
    t0 = clock.t
    s.drop(s.backup(pages(rng, 64)))
    assert s.reclaim(now=t0 + 5) == 0                  # the period is not over
    assert s.reclaim(now=t0 + 10) == 0                 # the pool was empty early in it
    assert s.bytes_warm == 64 * PS
    assert s.reclaim(now=t0 + 15) == 0
    assert s.reclaim(now=t0 + 20) == 64 * PS           # unused for a whole period
    assert s.bytes_warm == 0 and s.bytes_resident == 0
    assert s.stats()["pages_decayed"] == 64


def test_a_pool_in_use_does_not_decay_only_its_idle_part_does(make, clock, rng):
    s = make(warm_decay=10.0, warm_floor=4 * PS)
    t0 = clock.t
    a = s.backup(pages(rng, 32))
    s.drop(s.backup(pages(rng, 64)))                   # pool: 64, working set 32 more
    s.drop(a)                                          # pool: 96
    s.reclaim(now=t0 + 10)                             # window 1 ends (started empty)
    for k in range(3):                                 # each period reuses 40 pages
        s.drop(s.backup(pages(rng, 40)))
        s.reclaim(now=t0 + 20 + 10 * k)
    assert s.bytes_warm == 40 * PS                     # 56 idle pages went
    s.reclaim(now=t0 + 50)
    s.reclaim(now=t0 + 60)
    assert s.bytes_warm == 4 * PS                      # then all but the floor


def test_trim_returns_everything(make, rng):
    s = make(warm_floor=8 * PS)
    keep = s.backup(pages(rng, 4))
    s.drop(s.backup(pages(rng, 60)))
    assert s.trim() == 60 * PS
    assert s.bytes_warm == 0 and s.bytes_resident == 4 * PS
    assert s.trim() == 0
    s.drop(keep)


# ------------------------------------------------------------- prefault
def test_prefault_runs_in_the_background_and_races_correctly(host, clock, rng):
    in_step, go = threading.Event(), threading.Event()

    def hold(name):
        if name == "store.prefault.reserved" and threading.current_thread().name.endswith("-pool"):
            in_step.set()
            assert go.wait(30)

    monkey = (_pool, "_PREFAULT_STEP", 16 << 20)
    old_step = getattr(*monkey[:2])
    setattr(*monkey)
    old = _faults.set_injector(hold)
    try:
        s = gb.ShmemStore(32 << 20, host_memory=host, clock=clock, host_reserve=0,
                          warm_slack=0, prefault=32 << 20)
        # The constructor returned although the first step is held mid-way.
        assert in_step.wait(30)
        assert s.stats()["pages_pending"] == (16 << 20) // PS
        data = pages(rng, s.npages)               # needs every slot, some still in flight
        out: list = []
        t = threading.Thread(target=lambda: out.append(s.backup(data)))
        t.start()
        t.join(0.2)
        assert t.is_alive()                      # waits for the step, does not fail
        go.set()
        t.join(30)
        assert not t.is_alive()
        np.testing.assert_array_equal(readback(s, out[0]), data)
        assert s._audit()["used"] == s.npages
        s.drop(out[0])
        assert s.bytes_warm == s.capacity        # the prefaulted floor stays warm
        s.close()
    finally:
        _faults.set_injector(old)
        setattr(monkey[0], monkey[1], old_step)
        go.set()


def test_prefault_completes_and_sets_the_floor(host, clock, rng):
    with gb.ShmemStore(8 << 20, host_memory=host, clock=clock, host_reserve=0,
                       prefault=4 << 20) as s:
        deadline = time.monotonic() + 30
        while s.bytes_warm < 4 << 20 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert s.bytes_warm == 4 << 20 and s.warm_floor == 4 << 20
        s.reclaim(now=clock.t + 100)
        s.reclaim(now=clock.t + 200)
        assert s.bytes_warm == 4 << 20           # the floor does not decay
        assert s.stats()["cold_allocs"] == 0
        s.drop(s.backup(pages(rng, 1024)))
        assert s.stats()["warm_hits"] == 1024 and s.stats()["cold_allocs"] == 0


# ------------------------------------------------------------- the thread
def test_maintainer_is_owned_started_lazily_and_joined(make, rng):
    s = make()
    assert s._holder.maintainer is None                 # no pool yet, no thread
    s.drop(s.backup(pages(rng, 8)))
    maint = s._holder.maintainer
    assert maint.alive
    s.close()
    assert not maint.alive and s._holder.maintainer is None


def test_maintainer_never_keeps_a_store_alive(host, clock, rng):
    s = gb.ShmemStore(1 << 20, host_memory=host, clock=clock, host_reserve=0)
    s.drop(s.backup(pages(rng, 8)))
    thread = s._holder.maintainer._thread
    ref = weakref.ref(s)
    del s
    import gc

    gc.collect()
    assert ref() is None
    thread.join(30)
    assert not thread.is_alive()


def test_pool_bytes_count_as_available(make, rng):
    s = make(256 * PS)
    s.drop(s.backup(pages(rng, 200)))
    assert s.bytes_avail() == 256 * PS


def test_concurrent_use_while_the_maintainer_reclaims(host, rng):
    """Backups, reads and drops on four threads while the maintainer runs a pass every few
    milliseconds, with pressure switching on and off: no byte lost, no slot owned twice."""
    host.limit = 256 << 20
    s = gb.ShmemStore(64 << 20, host_memory=host, host_reserve=0, watermark=192 << 20,
                      warm_decay=0.01)
    host.stores.append(s)
    errors: list[BaseException] = []

    def worker(seed):
        r = np.random.default_rng(seed)
        try:
            live = []
            for i in range(150):
                if i % 25 == 0:
                    host.other = (100 << 20) if host.other == 0 else 0   # pressure on/off
                d = pages(r, int(r.integers(1, 64)))
                live.append((s.backup(d), d))
                if len(live) > 3:
                    h, d = live.pop(int(r.integers(0, len(live))))
                    np.testing.assert_array_equal(readback(s, h), d)
                    s.drop(h)
            for h, d in live:
                np.testing.assert_array_equal(readback(s, h), d)
                s.drop(h)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]
    assert s.stats()["reclaim_passes"] > 0
    audit = s._audit()
    assert audit["used"] == 0 and audit["busy"] == 0
    s.trim()
    assert s.bytes_resident == 0
    s.close()


@pytest.mark.parametrize("how", ["close", "gc"])
def test_every_store_thread_is_joined(monkeypatch, rng, how):
    import gc

    from gpu_backup.store import _base

    def ours():
        return {t for t in threading.enumerate() if t.name.startswith("gpu_backup-shmem")}

    before = ours()
    monkeypatch.setattr(_base, "_PARALLEL_MIN", 1 << 20)
    s = gb.ShmemStore(16 << 20, threads=3, host_reserve=0)
    s.drop(s.backup(pages(rng, 1024)))             # copy threads and the maintainer
    started = ours() - before
    assert len(started) == 3                       # two copy helpers and the maintainer
    if how == "close":
        s.close()
    else:
        ref = weakref.ref(s)
        del s
        gc.collect()
        assert ref() is None                       # no thread keeps the store alive
    for t in started:
        t.join(30)
    assert not any(t.is_alive() for t in started)

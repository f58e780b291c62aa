"""The copy pipeline against a recording fake backend: which streams and events each
operation waits on, and that no memory or pinned slot is released while a copy touches
it, whatever fails or is interrupted, wherever.  Host only; deterministic (the fake's
copies hold no reference to the memory they touch, so a premature release is seen)."""

from __future__ import annotations

import ctypes
import gc
import threading
import time

import numpy as np
import pytest

import gpu_backup as gb
from gpu_backup import _faults
from gpu_backup._interrupts import deferring
from gpu_backup.device.host import HostBackend, HostStream

PS = gb.PAGE_SIZE
SLOT = 16 * PS


# ------------------------------------------------------------ the fake backend
class RecEvent:
    """A host event that says which stream it was recorded on and logs host waits."""

    __slots__ = ("inner", "tag", "log")

    def __init__(self, inner, tag, log):
        self.inner, self.tag, self.log = inner, tag, log

    @property
    def done(self):
        return self.inner.done

    def synchronize(self):
        self.log.append(("host_wait", self.tag))
        self.inner.synchronize()


class RecStream(HostStream):
    def __init__(self, fake, name):
        super().__init__(f"fake-{name}")
        self.fake, self.name = fake, name

    def record(self):
        self.fake.count_record(self.name)
        return RecEvent(super().record(), self.name, self.fake.log)

    def wait_event(self, event):
        self.fake.log.append(("wait_event", self.name, getattr(event, "tag", None)))
        super().wait_event(event)

    def synchronize(self):
        self.fake.log.append(("stream_sync", self.name))
        super().synchronize()


class FakeBackend(HostBackend):
    """The host backend, recording every stream wait and sync, and checking that no
    device block or pinned slot is released or reused while a copy touches it."""

    def __init__(self, capacity=1 << 30, copy_delay=0.0005):
        super().__init__("fake", capacity=capacity)
        self.copy_delay = copy_delay
        self.log: list[tuple] = []
        self.violations: list[str] = []
        self.records = 0
        self.fail_record_at: int | None = None
        self._inflight: dict[int, tuple[int, int, int, int]] = {}
        self._tokens = iter(range(1 << 62))
        self._ilock = threading.RLock()   # a finalizer (_release) may run inside a locked section
        self.d2h_stream.close()
        self.h2d_stream.close()
        self.d2h_stream = RecStream(self, "d2h")
        self.h2d_stream = RecStream(self, "h2d")
        self.copy_stream = self.d2h_stream

    def count_record(self, name):
        with self._ilock:
            self.records += 1
            fail = self.records == self.fail_record_at
        if fail:
            raise RuntimeError(f"injected: record #{self.records} on {name} failed")

    # copies hold addresses, not arrays: nothing keeps the memory alive but its owner
    def _copy(self, name, stream, dst_addr, src_addr, n, dev_addr, host_addr):
        self.log.append((name, stream.name))
        with self._ilock:
            for lo_d, hi_d, lo_h, hi_h in self._inflight.values():
                if lo_h < host_addr + n and host_addr < hi_h:
                    self.violations.append(f"{name}: pinned slot reused while a copy touches it")
            tok = next(self._tokens)
            self._inflight[tok] = (dev_addr, dev_addr + n, host_addr, host_addr + n)

        def run():
            if self.copy_delay:
                time.sleep(self.copy_delay)   # widens the window a premature release hits
            ctypes.memmove(dst_addr, src_addr, n)
            with self._ilock:
                del self._inflight[tok]

        try:
            stream.launch(run)
        except BaseException:
            with self._ilock:
                del self._inflight[tok]
            raise

    def d2h(self, dst, src, offset, stream):
        n = dst.shape[0]
        s, d = src.ctypes.data + offset, dst.ctypes.data
        self._copy("d2h", stream, d, s, n, s, d)

    def h2d(self, dst, offset, src, stream):
        n = src.shape[0]
        d, s = dst.ctypes.data + offset, src.ctypes.data
        self._copy("h2d", stream, d, s, n, d, s)

    def host_range_busy(self, arr) -> bool:
        lo = arr.ctypes.data
        hi = lo + arr.nbytes
        with self._ilock:
            return any(a < hi and lo < b for _, _, a, b in self._inflight.values())

    def _release(self, size, raw):
        if raw is not None:
            lo = raw.ctypes.data
            with self._ilock:
                if any(a < lo + size and lo < b for a, b, _, _ in self._inflight.values()):
                    self.violations.append("device memory released while a copy touches it")
        super()._release(size, raw)

    def syncs(self):
        return [e for e in self.log if e[0] == "stream_sync"]


@pytest.fixture
def fake_mgr(monkeypatch):
    made = []

    def make(**kw):
        fake = FakeBackend()
        monkeypatch.setattr("gpu_backup.manager.open_backend", lambda *a, **k: fake)
        kw.setdefault("staging", gb.Staging(slots=3, slot_bytes=SLOT, threads=2, zero_run_bytes=2 * PS))
        mgr = gb.BufferManager("host", **kw)
        mgr._pager.swap_on_miss = True        # exercised on the host too
        store = mgr.store
        real_write, real_read = store.write, store.read

        def write(h, view):   # the worker reads the slot: its D2H must be complete
            if fake.host_range_busy(view):
                fake.violations.append("store.write from a slot a D2H still writes")
            return real_write(h, view)

        def read(h, out):     # the worker overwrites the slot: its last H2D must be complete
            if fake.host_range_busy(out):
                fake.violations.append("store.read into a slot an H2D still reads")
            return real_read(h, out)

        store.write, store.read = write, read
        made.append(mgr)
        return mgr, fake

    yield make
    for m in made:
        m.close()


def data_of(rng, npages):
    d = rng.integers(0, 256, npages * PS, dtype=np.uint8)
    d.reshape(-1, PS)[[1, 2, 3, 9]] = 0          # zero runs: interior long, interior short
    return d


def filled(mgr, data):
    b = mgr.alloc(data.size)
    with b.access("w") as a:
        a[:] = data
    return b


# ------------------------------------------------------------ streams and waits
def test_no_stream_or_device_sync_and_directions_on_their_own_streams(fake_mgr, rng):
    mgr, fake = fake_mgr(zero_scan=True, device_limit=2 * 40 * PS)
    datas = [data_of(rng, 40) for _ in range(3)]
    a, b, c = (filled(mgr, d) for d in datas[:2]), None, None
    a, b = list(a)
    a.evict()
    with a.access("r"):
        pass
    a.evict()                              # clean: no copy
    with a.access("rw"):
        pass
    c = mgr.alloc(40 * PS)                 # over the limit: reclaim evicts the LRU buffer
    with c.access("w") as arr:
        arr[:] = datas[2]
    with b.access("r"):                    # a miss under the limit: swap
        pass
    assert mgr.stats()["swaps"] >= 1
    p = mgr.alloc(8 * PS, purgeable=True)
    p.evict()
    c.free()
    del p
    gc.collect()
    mgr.shrink(1 << 30)
    for buf, d in ((a, datas[0]), (b, datas[1])):
        np.testing.assert_array_equal(buf.to_host(), d)
    assert fake.syncs() == []                                  # nothing but close() syncs
    assert [e for e in fake.log if e[0] == "wait_event" and e[1] in ("d2h", "h2d")] == []
    d2h = {e[1] for e in fake.log if e[0] == "d2h"}
    h2d = {e[1] for e in fake.log if e[0] == "h2d"}
    assert d2h == {"d2h"} and h2d == {"h2d"}
    assert fake.violations == []
    mgr.close()
    assert {e[1] for e in fake.syncs()} <= {"d2h", "h2d"}


def test_evicting_a_never_waits_on_b(fake_mgr, rng):
    """B's user work is stuck behind a gate; A is evicted and restored meanwhile: no wait
    of any kind on B's events, so both complete while B's work is still pending."""
    mgr, fake = fake_mgr()
    da, db = data_of(rng, 40), data_of(rng, 40)
    a, b = filled(mgr, da), filled(mgr, db)
    user_b = RecStream(fake, "userB")
    gate = threading.Event()
    with b.access("rw", stream=user_b):
        user_b.launch(lambda: gate.wait(30))
    outcome = []

    def work():
        a.evict()
        with a.access("rw"):
            pass
        a.evict()
        outcome.append("done")

    t = threading.Thread(target=work)
    t.start()
    t.join(20)
    still_pending = not gate.is_set()
    gate.set()
    assert outcome == ["done"] and still_pending
    assert not [e for e in fake.log if "userB" in e[1:]]        # no wait on B's events
    b.evict()                                                    # B waits for its own work
    assert ("host_wait", "userB") in fake.log
    np.testing.assert_array_equal(a.to_host(), da)
    np.testing.assert_array_equal(b.to_host(), db)
    user_b.close()
    assert fake.violations == []


def test_access_on_a_stream_that_is_not_current_waits_for_the_allocation_guard(monkeypatch, fake_mgr):
    """A block from the current stream's pool may still be touched by work queued there:
    the first access on another stream waits for it (on that stream, not on the host),
    and a non-waiting eviction skips the buffer meanwhile."""
    mgr, fake = fake_mgr()
    current = RecStream(fake, "current")
    gate = threading.Event()
    current.launch(lambda: gate.wait(30))          # the previous owner's work, still queued
    monkeypatch.setattr(fake, "mark_current", current.record)
    b = mgr.alloc(4 * PS)
    assert b._pages.fresh is not None and not b._pages.fresh.done
    assert mgr._evict(b, blocking=False, wait=False) == 0
    user = RecStream(fake, "user")
    with b.access("w", stream=user):
        pass
    assert ("wait_event", "user", "current") in fake.log
    assert not [e for e in fake.log if e[0] == "host_wait"]   # nobody blocked on the host
    gate.set()
    user.synchronize()
    b.evict()
    user.close()
    current.close()


def test_host_backend_reuses_freed_blocks_like_a_pool():
    be = HostBackend(capacity=8 << 20, cache_limit=4 << 20)
    try:
        a = be.alloc(1 << 20)
        addr = a.ctypes.data
        view = a[10:20]
        del a
        assert be.cached_bytes == 0                  # a view keeps the block in use
        del view
        assert be.cached_bytes == 1 << 20 and be.mem_info()[0] == 8 << 20
        b = be.alloc(1 << 20)
        assert b.ctypes.data == addr and be.cached_bytes == 0       # reused, no first touch
        c = be.alloc(2 << 20)
        del c
        assert be.cached_bytes == 2 << 20
        big = be.alloc(6 << 20)                      # does not fit beside the cache: cache goes
        assert be.cached_bytes == 0
        with pytest.raises(gb.device.DeviceOOM):
            be.alloc(2 << 20)
        del b, big                                   # 6 MiB is over the cache's bound
        assert be.cached_bytes == 1 << 20
    finally:
        be.close()
    assert be.cached_bytes == 0


@pytest.mark.gpu
def test_gpu_pipeline_streams_swap_and_zero_runs(rng):
    """On a GPU: two copy streams, blocking events, swap and zero runs, user stream not
    the current one; bytes exact."""
    from conftest import cuda_unusable_reason

    why = cuda_unusable_reason()
    if why:
        pytest.skip(f"no usable GPU: {why}")
    import cupy as cp

    size = 8 << 20
    with gb.BufferManager("cuda", device_limit=size, zero_scan=True) as mgr:
        be = mgr.backend
        assert be.d2h_stream.ptr != be.h2d_stream.ptr
        da = data_of(rng, size // PS)
        db = rng.integers(0, 256, size, dtype=np.uint8)
        db[: 5 << 20] = 0                              # a long zero run: skipped
        a = mgr.alloc(size)
        s = cp.cuda.Stream(non_blocking=True)          # not the current stream
        with a.access("w", stream=s) as arr:
            with s:
                arr.set(da, stream=s)
        b = mgr.alloc(size)                            # over the limit: a is evicted
        with b.access("w") as arr:
            arr.set(db)
        for _ in range(3):                             # misses: swaps
            for buf, d in ((a, da), (b, db)):
                with buf.access("r", stream=s) as arr:
                    got = cp.asnumpy(arr, stream=s)
                s.synchronize()
                np.testing.assert_array_equal(got, d)
        st = mgr.stats()
        assert st["swaps"] >= 4 and st["zero_pages"] >= (4 << 20) // PS


# ------------------------------------------------------ faults at every step
NPAGES = 40          # 3 pieces of at most 16 pages each, less the zero runs


def scenario(mgr, rng):
    """Buffers for every step of the pipeline: a, c resident; b, d evicted; e purgeable.
    Returns the buffers and their expected bytes (None: purgeable, contents not kept)."""
    da, db, dc, dd = (data_of(rng, NPAGES) for _ in range(4))
    a, b, c, d = (filled(mgr, x) for x in (da, db, dc, dd))
    e = mgr.alloc(8 * PS, purgeable=True)
    with e.access("w") as arr:
        arr[:] = 1
    b.evict()
    d.evict()
    mgr.device_limit = (2 * NPAGES + 8) * PS     # a, c and e fill it
    return [(a, da), (b, db), (c, dc), (d, dd), (e, None)]


def steps(bufs):
    (a, _), (b, _), (c, _), (d, _), (e, _) = bufs
    yield "purge", e.evict
    yield "evict", a.evict
    yield "restore rw", lambda: _enter(b, "rw")  # device: b, c
    yield "swap", lambda: _enter(a, "r")         # over the limit: a takes c's memory
    yield "swap", lambda: _enter(d, "r")         # and d takes b's
    yield "free", c.free


def _enter(buf, mode):
    with buf.access(mode):
        pass


def check(mgr, fake, bufs, ring_slots):
    # every slot back once, no memory or slot released with a copy in flight
    ring = mgr._ring
    assert len(ring._free) == ring_slots and len({id(s) for s in ring._free}) == ring_slots
    assert fake.violations == []
    live = [(b, d) for b, d in bufs if not b.freed and d is not None]
    mgr.stats()     # a safe point: what a failed drop kept is dropped again there
    # a retry completes, and no byte was lost
    for b, d in live:
        b.evict()
        np.testing.assert_array_equal(b.to_host(), d)
    held = sum(b.device_bytes for b, _ in bufs if not b.freed)
    assert mgr.device_bytes == held
    referenced = sum(int((b.page_table() > 0).sum()) for b, _ in bufs if not b.freed)
    assert mgr.store.bytes_used == referenced * PS, "store pages leaked"
    assert fake.violations == []


def discover(fake_mgr, rng):
    mgr, fake = fake_mgr(zero_scan=True)
    bufs = scenario(mgr, rng)
    seen: list[str] = []
    interruptible: set[str] = set()      # hit at least once where a Ctrl-C could land

    def record(name: str) -> None:
        seen.append(name)
        if not deferring():
            interruptible.add(name)

    old = _faults.set_injector(record)
    try:
        for _, step in steps(bufs):
            step()
    finally:
        _faults.set_injector(old)
    records = fake.records
    mgr.close()
    return sorted(set(seen)), records, interruptible


def _run_with(fake_mgr, rng, *, point=None, exc=None, record_at=None):
    mgr, fake = fake_mgr(zero_scan=True)
    bufs = scenario(mgr, rng)
    fired = []

    def injector(name):
        # A Ctrl-C lands only where the code does not hold it off: inside a
        # deferred_interrupt block (the store's own steps within one, say) it would wait
        # for the block's end, so an injected one waits for the next hit outside.
        if exc is KeyboardInterrupt and deferring():
            return
        if name == point and not fired:
            fired.append(threading.current_thread().name)
            raise exc("injected at " + name) if exc is not KeyboardInterrupt else KeyboardInterrupt()

    fake.fail_record_at = None if record_at is None else fake.records + record_at
    old = _faults.set_injector(injector)
    raised = []
    try:
        for what, step in steps(bufs):
            try:
                step()
            except (KeyboardInterrupt, gb.GpuBackupError, RuntimeError, OSError) as e:
                raised.append((what, type(e).__name__))
    finally:
        _faults.set_injector(old)
        fake.fail_record_at = None
    try:
        check(mgr, fake, bufs, 3)
    except AssertionError as e:
        raise AssertionError(f"after a fault at {point or f'record #{record_at}'} "
                             f"({exc and exc.__name__}; raised {raised}): {e}") from e
    mgr.close()
    return fired, raised


def test_fault_points_cover_every_step(fake_mgr, rng):
    names, _, _ = discover(fake_mgr, rng)
    for prefix in ("evict.purge", "evict.", "restore.", "release.", "swap.", "free.", "forget."):
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    assert {"evict.piece.launch", "evict.piece.wait", "evict.piece.write", "evict.piece.commit",
            "restore.piece.read", "restore.piece.h2d", "restore.piece.wait",
            "restore.piece.commit"} <= set(names)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_fault_at_every_point_loses_nothing_and_releases_nothing_early(fake_mgr, rng, exc):
    names, _, interruptible = discover(fake_mgr, rng)
    hit = set()
    for name in names:
        fired, raised = _run_with(fake_mgr, rng, point=name, exc=exc)
        if fired:
            hit.add(name)
            # A failed drop of pages no table references is kept and retried (check()
            # proves none leaked), not raised: the operation that let go of them is done.
            assert raised or name.startswith("store.drop"), \
                f"{name}: the injected {exc.__name__} vanished"
    # an error can come from every step; a Ctrl-C from every step that does not hold it off
    assert hit == (set(names) if exc is OSError else set(names) & interruptible)
    assert len(hit) > 20


def test_failing_record_at_every_call_loses_nothing_and_releases_nothing_early(fake_mgr, rng):
    _, records, _ = discover(fake_mgr, rng)
    assert records > 10
    # the records of the steps (after the scenario's set-up), each one failing in turn
    mgr, fake = fake_mgr(zero_scan=True)
    scenario(mgr, rng)
    setup = fake.records
    mgr.close()
    failed = 0
    for k in range(1, records - setup + 1):
        _, raised = _run_with(fake_mgr, rng, record_at=k)
        failed += bool(raised)
    assert failed >= (records - setup) // 2


def test_interrupt_inside_submit_after_the_work_is_queued(fake_mgr, rng):
    """A SIGINT that arrives inside ThreadPoolExecutor.submit once the work item is
    queued: the slot is released exactly once and the piece is settled before the
    interrupt surfaces."""
    import os
    import signal

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    mgr, fake = fake_mgr()
    data = data_of(rng, 64)
    b = filled(mgr, data)
    pool = mgr._ring._pool
    real = pool.submit
    calls = []

    def submit(fn, *args):
        fut = real(fn, *args)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)    # delivered while the work item is queued
        calls.append(fut)
        return fut

    pool.submit = submit
    try:
        with pytest.raises(KeyboardInterrupt):
            b.evict()
    finally:
        del pool.submit
    assert all(f.done() for f in calls)
    check(mgr, fake, [(b, data)], 3)


# --------------------------------------------------------------- close races
@pytest.mark.parametrize("op", ["evict", "restore"])
def test_close_racing_an_operation_leaves_no_thread_waiting(fake_mgr, rng, op):
    mgr, fake = fake_mgr()
    bufs = [filled(mgr, data_of(rng, 64)) for _ in range(4)]
    if op == "restore":
        for b in bufs:
            b.evict()
    started = threading.Event()
    results = []

    def work():
        started.set()
        for b in bufs:
            try:
                if op == "evict":
                    b.evict()
                else:
                    _enter(b, "r")
                results.append("ok")
            except (gb.ClosedError, gb.CopyError) as e:
                results.append(type(e).__name__)

    t = threading.Thread(target=work)
    t.start()
    started.wait(10)
    mgr.close()
    t.join(20)
    assert not t.is_alive(), "a thread was left waiting"
    assert len(results) == len(bufs)
    assert fake.violations == []


def test_memory_and_slot_outlive_a_copy_whose_record_failed(fake_mgr, rng):
    """A D2H is enqueued behind other work, then its record() fails: the buffer's memory
    (freed right after) and the slot (reused right after) are held until that copy ends."""
    mgr, fake = fake_mgr()
    data = data_of(rng, 40)
    a, b = filled(mgr, data), filled(mgr, data_of(rng, 40))
    gate = threading.Event()
    fake.d2h_stream.launch(lambda: gate.wait(30))       # the D2H queues behind this
    fake.fail_record_at = fake.records + 1
    with pytest.raises(gb.CopyError, match="injected"):
        a.evict()
    assert (a.page_table() == 0).all() and mgr.store.bytes_used == 0   # nothing moved
    done = []
    t1 = threading.Thread(target=lambda: (a.free(), done.append("free")))
    t2 = threading.Thread(target=lambda: (b.evict(), done.append("evict")))
    t1.start()
    t2.start()
    t1.join(0.3)
    t2.join(0.3)
    held_back = list(done)
    gate.set()
    t1.join(20)
    t2.join(20)
    assert held_back == [] and sorted(done) == ["evict", "free"]
    assert fake.violations == []
    assert mgr.device_bytes == 0 and mgr.store.bytes_used == b.npages * PS


def test_every_other_page_zero_moves_in_as_few_copies_as_dense(fake_mgr, rng):
    """The zero scan never cuts a dense buffer into page-sized copies: with every other
    page zero, evict and restore issue as many copies as for the dense buffer."""
    mgr, fake = fake_mgr(zero_scan=True)
    dense = rng.integers(1, 256, 64 * PS, dtype=np.uint8)
    half = dense.copy()
    half.reshape(-1, PS)[::2] = 0
    copies = {}
    for name, data in (("dense", dense), ("half", half)):
        b = filled(mgr, data)
        before = len(fake.log)
        b.evict()
        with b.access("rw"):
            pass
        copies[name] = sum(1 for e in fake.log[before:] if e[0] in ("d2h", "h2d"))
        np.testing.assert_array_equal(b.to_host(), data)
        b.free()
    assert copies["half"] == copies["dense"] == 2 * 4      # 64 pages in 16-page slots


@pytest.mark.parametrize("point", ["close.ring.begin", "close.ring.drained", "close.ring.stopped"])
def test_interrupted_ring_close_can_be_run_again(fake_mgr, rng, point):
    """The staging ring's close, interrupted at each step, finishes when run again."""
    mgr, fake = fake_mgr()
    b = filled(mgr, data_of(rng, 40))
    b.evict()
    threads = threading.active_count()

    def injector(name):
        if name == point:
            raise KeyboardInterrupt

    old = _faults.set_injector(injector)
    try:
        with pytest.raises(KeyboardInterrupt):
            mgr._ring.close()
    finally:
        _faults.set_injector(old)
    mgr._ring.close()
    assert mgr._ring._slots == [] and mgr._ring.closed
    with pytest.raises(gb.ClosedError):
        b.to_host()                      # new operations are refused
    mgr.close()
    assert threading.active_count() <= threads
    assert fake.violations == []


def test_swaps_from_many_threads_keep_every_byte(fake_mgr):
    """Threads reading and writing random buffers under a device limit of three: misses
    become swaps (and, when no victim qualifies, evictions); no byte is lost, nothing hangs."""
    mgr, fake = fake_mgr(device_limit=3 * 32 * PS)
    rng0 = np.random.default_rng(7)
    datas = [rng0.integers(0, 256, 32 * PS, dtype=np.uint8) for _ in range(6)]
    bufs = [filled(mgr, d) for d in datas]
    locks = [threading.Lock() for _ in bufs]      # the model: one writer per buffer at a time
    errors = []

    def worker(seed):
        r = np.random.default_rng(seed)
        try:
            for _ in range(25):
                i = int(r.integers(0, len(bufs)))
                with locks[i]:
                    if r.random() < 0.5:
                        with bufs[i].access("r") as arr:
                            np.testing.assert_array_equal(arr, datas[i])
                    else:
                        with bufs[i].access("rw") as arr:
                            arr[:: PS] += 1
                            datas[i][:: PS] += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert not errors, errors[0]
    assert mgr.stats()["swaps"] > 0 and mgr.device_bytes <= mgr.device_limit
    for b, d in zip(bufs, datas):
        np.testing.assert_array_equal(b.to_host(), d)
    assert fake.violations == []

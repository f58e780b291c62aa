"""Store fault paths: an error or a KeyboardInterrupt at every step of every store operation
leaves each slot owned by exactly one party, committed bytes intact, and a retry that
completes; failed releases are retried, never leaked; duplicate and out-of-range handles
and bad arguments are refused before anything changes."""

from __future__ import annotations

import errno
import logging
import threading

import numpy as np
import pytest

import gpu_backup as gb
from gpu_backup import _faults, _os
from gpu_backup.store import StoreSetupError, _base, _pool
from conftest import pages, readback

PS = gb.PAGE_SIZE


class Inject:
    """Raise ``exc`` at the ``nth`` hit of any store point on the test's own thread (the
    pool maintainers of other stores are ignored); with ``exc=None`` only record."""

    def __init__(self, exc: type[BaseException] | None = None, nth: int = -1) -> None:
        self.exc, self.nth = exc, nth
        self.hits: list[str] = []
        self.thread = threading.current_thread()
        self.fired = False

    def __call__(self, name: str) -> None:
        if threading.current_thread() is not self.thread or not name.startswith("store."):
            return
        self.hits.append(name)
        if self.exc is not None and len(self.hits) - 1 == self.nth:
            self.fired = True
            raise self.exc("injected") if self.exc is OSError else self.exc()

    def __enter__(self) -> Inject:
        self._old = _faults.set_injector(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _faults.set_injector(self._old)


# Each operation: (store options, run(store, rng, state) -> None).  ``state`` holds the
# live handles and their bytes; an operation updates it only when it completes.
def _backup(n):
    def run(s, rng, state):
        data = pages(rng, n)
        h = s.backup(data)
        state[tuple(h.tolist())] = data
    return run


def _alloc_write(n):
    def run(s, rng, state):
        h = s.alloc(n)
        data = pages(rng, n)
        try:
            s.write(h, data)
        except BaseException:
            s.drop(h)
            raise
        state[tuple(h.tolist())] = data
    return run


def _drop_first(s, rng, state):
    key = next(iter(state))
    s.drop(np.array(key, np.int64))
    del state[key]


def _trim(s, rng, state):
    s.trim()


def _prefault(s, rng, state):
    s.prefault(256 * PS)


def _reclaim(s, rng, state):
    """A pass under pressure (a ShmemStore: no host has 4 EiB free), then two decay periods."""
    s.watermark = 1 << 62
    try:
        s.reclaim()
    finally:
        s.watermark = None
    s.reclaim(now=s._clock() + 1e6)
    s.reclaim(now=s._clock() + 2e6)


OPS = {
    "backup": ({}, _backup(8)),
    "backup_parallel": ({"threads": 3}, _backup(1024)),
    "alloc_write": ({}, _alloc_write(16)),
    "alloc_write_parallel": ({"threads": 3}, _alloc_write(1024)),
    "drop_to_pool": ({}, _drop_first),
    "drop_release": ({"warm_slack": 0}, _drop_first),
    "trim": ({}, _trim),
    "prefault": ({"warm_slack": 0}, _prefault),
    "reclaim": ({}, _reclaim),
}


def _setup(make_store, rng, opts):
    s = make_store(8 << 20, background=False, **opts)
    state = {}
    for n in (4, 300):
        d = pages(rng, n)
        state[tuple(s.backup(d).tolist())] = d
    s.drop(s.backup(pages(rng, 40)))                  # something in the pool
    return s, state


def _check(s, state):
    audit = s._audit()
    live = sum(len(k) for k in state)
    assert audit["busy"] == 0 and audit["used"] == live, (audit, live)
    assert s.bytes_used == live * PS
    for key, data in state.items():
        np.testing.assert_array_equal(readback(s, np.array(key, np.int64)), data)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
@pytest.mark.parametrize("op", sorted(OPS))
def test_a_fault_at_every_step(make_store, monkeypatch, op, exc):
    monkeypatch.setattr(_base, "_PARALLEL_MIN", 1 << 20)
    opts, run = OPS[op]
    s, state = _setup(make_store, np.random.default_rng(1), opts)
    with Inject() as rec:
        run(s, np.random.default_rng(2), dict(state))
    points = rec.hits
    assert points, f"{op} passes no fault point"
    s.close()
    for nth, name in enumerate(points):
        s, state = _setup(make_store, np.random.default_rng(1), opts)
        before = dict(state)
        with Inject(exc, nth) as inj:
            try:
                run(s, np.random.default_rng(2), state)
            except (KeyboardInterrupt, OSError, gb.StoreFullError):
                pass
        assert inj.fired, (op, name)
        # A drop either took effect or did not; any other op left the live set alone.
        assert set(state) <= set(before)
        if set(state) != set(before):
            assert op.startswith("drop")
        elif op.startswith("drop") and s.bytes_used != sum(len(k) for k in state) * PS:
            state = {k: v for k, v in state.items() if k != next(iter(before))}
        _check(s, state)
        run(s, np.random.default_rng(3), state)          # the retry completes
        _check(s, state)
        for key in list(state):
            s.drop(np.array(key, np.int64))
        assert s._audit() == {"cold": s._audit()["cold"], "warm": s._audit()["warm"],
                              "used": 0, "busy": 0}
        s.trim()
        assert s.bytes_warm == 0
        s.close()


def test_interrupt_waits_for_the_copy_threads(monkeypatch, rng):
    """A KeyboardInterrupt on the caller of a parallel copy returns only after every copy
    thread has finished with the slots, which the failed backup then frees."""
    monkeypatch.setattr(_base, "_PARALLEL_MIN", 1 << 20)
    caller = threading.current_thread()
    started, raised = threading.Event(), threading.Event()
    finished: list[int] = []
    real = _base.copy_segments

    def copy(flat, buf, segs, into_store, faulter=None):
        if threading.current_thread() is caller:
            assert started.wait(30)         # a helper holds a job of this batch
            raised.set()
            raise KeyboardInterrupt
        started.set()
        assert raised.wait(30)
        real(flat, buf, segs, into_store, faulter)
        finished.append(len(segs))

    monkeypatch.setattr(_base, "copy_segments", copy)
    with gb.ShmemStore(16 << 20, threads=4, host_reserve=0) as s:
        with pytest.raises(KeyboardInterrupt):
            s.backup(pages(rng, 2048))
        helpers = len(finished)
        assert helpers >= 1                 # the helpers ran, and were waited for
        monkeypatch.setattr(_base, "copy_segments", real)
        assert s._audit()["used"] == 0 and s._audit()["busy"] == 0
        data = pages(rng, 2048)
        h = s.backup(data)
        np.testing.assert_array_equal(readback(s, h), data)
        assert len(finished) == helpers     # nothing ran late


def test_an_error_in_a_copy_thread_reaches_the_caller(monkeypatch, rng):
    monkeypatch.setattr(_base, "_PARALLEL_MIN", 1 << 20)
    caller = threading.current_thread()
    failed = threading.Event()
    real = _base.copy_segments

    def copy(flat, buf, segs, into_store, faulter=None):
        if threading.current_thread() is not caller:
            failed.set()
            raise OSError(errno.EIO, "injected in a copy thread")
        assert failed.wait(30)              # a helper took a job of this batch and failed
        real(flat, buf, segs, into_store, faulter)

    with gb.ShmemStore(16 << 20, threads=3, host_reserve=0) as s:
        keep = pages(rng, 8)
        hk = s.backup(keep)
        monkeypatch.setattr(_base, "copy_segments", copy)
        with pytest.raises(gb.StoreFullError, match="injected in a copy thread") as ei:
            s.backup(pages(rng, 2048))         # cold slots: an OSError means no memory
        assert isinstance(ei.value.__cause__, OSError)
        assert s._audit()["used"] == 8
        np.testing.assert_array_equal(readback(s, hk), keep)


# ---------------------------------------------------------- failed releases
def test_a_failed_release_keeps_the_pages_and_retries(make_store, rng, monkeypatch, caplog):
    s = make_store(warm_slack=0)
    real = _os.Mapping.madvise

    def failing(self, advice, offset, length):
        if advice == _os.MADV_REMOVE:
            raise OSError(errno.EIO, "injected")
        return real(self, advice, offset, length)

    h = s.backup(pages(rng, 32))
    resident = s.bytes_resident
    monkeypatch.setattr(_os.Mapping, "madvise", failing)
    with caplog.at_level(logging.WARNING, logger="gpu_backup.store"):
        s.drop(h)                                   # the drop itself succeeds
    assert s.bytes_used == 0
    assert s.bytes_warm == 32 * PS and s.bytes_resident == resident   # owned by the pool
    assert s.stats()["release_failures"] == 1
    rec = [r for r in caplog.records if "back to the OS failed" in r.getMessage()]
    assert rec and "stay in the pool" in rec[0].getMessage()
    assert not any(isinstance(a, BaseException) for r in caplog.records for a in r.args or ())
    monkeypatch.undo()
    assert s.reclaim() == 32 * PS                   # cut to the cap (0) by the next pass
    assert s.bytes_warm == 0 and s.bytes_resident == 0
    assert s._audit()["busy"] == 0


# --------------------------------------------------------------- bad handles
@pytest.mark.parametrize("what", ["read", "write", "drop", "writeback"])
def test_duplicate_handles_are_refused_before_anything_changes(make_store, rng, what):
    s = make_store()
    data = pages(rng, 4)
    h = s.backup(data)
    dup = np.array([h[2], h[0], h[2]])
    call = {"read": lambda: s.read(dup, np.empty(3 * PS, np.uint8)),
            "write": lambda: s.write(dup, pages(rng, 3)),
            "drop": lambda: s.drop(dup), "writeback": lambda: s.writeback(dup)}[what]
    with pytest.raises(gb.InvalidHandleError, match=f"handle {h[2]} appears more than once"):
        call()
    assert s.bytes_used == 4 * PS
    np.testing.assert_array_equal(readback(s, h), data)


@pytest.mark.parametrize("value", [2**64 - 1, 2**63])
def test_huge_handles_are_reported_as_themselves(make_store, rng, value):
    s = make_store()
    s.backup(pages(rng, 1))
    for arr in (np.array([value], np.uint64), [value]):
        with pytest.raises(gb.InvalidHandleError, match=f"handle {value} is out of range"):
            s.read(arr, np.empty(PS, np.uint8))
        with pytest.raises(gb.InvalidHandleError, match=f"handle {value} is out of range"):
            s.drop(arr)
    assert s.bytes_used == PS


def test_tiered_refuses_duplicates_and_huge_handles(tmp_path, rng):
    with gb.TieredStore(gb.ShmemStore(8 * PS, warm_slack=0, host_reserve=0),
                        gb.FileStore(tmp_path, 64 * PS)) as t:
        data = pages(rng, 4)
        h = t.backup(data)
        dup = np.array([h[1], h[1]])
        for call in (lambda: t.writeback(dup), lambda: t.drop(dup),
                     lambda: t.read(dup, np.empty(2 * PS, np.uint8)),
                     lambda: t.write(dup, pages(rng, 2))):
            with pytest.raises(gb.InvalidHandleError, match=f"handle {h[1]} appears more than once"):
                call()
        with pytest.raises(gb.InvalidHandleError, match="18446744073709551615"):
            t.drop(np.array([2**64 - 1], np.uint64))
        assert t.bytes_used == 4 * PS and t.slow.bytes_used == 0
        np.testing.assert_array_equal(readback(t, h), data)


# ------------------------------------------------------------------ bad input
def test_bad_counts_and_sizes(make_store, tmp_path, resources):
    fds = resources()
    s = make_store()
    for bad, err, text in ((1.7, TypeError, "1.7"), (True, TypeError, "True"),
                           ("3", TypeError, "'3'"), (-1, ValueError, "-1")):
        with pytest.raises(err, match=text):
            s.alloc(bad)
        with pytest.raises(err, match=text):
            s.prefault(bad)
    assert s.alloc(np.int64(2)).size == 2
    assert s.bytes_used == 2 * PS and s._audit()["busy"] == 0
    for kw, err, text in (({"capacity": 1.5e9}, TypeError, "1500000000.0"),
                          ({"capacity": -5}, ValueError, "-5"),
                          ({"warm_slack": -1}, ValueError, "warm_slack=-1"),
                          ({"warm_slack": 2.5}, TypeError, "2.5"),
                          ({"warm_decay": 0}, ValueError, "warm_decay=0.0"),
                          ({"warm_decay": float("nan")}, ValueError, "nan"),
                          ({"threads": 0}, ValueError, "threads=0"),
                          ({"prefault": 1.5}, TypeError, "1.5"),
                          ({"host_reserve": -1}, ValueError, "host_reserve=-1"),
                          ({"page_size": 4096.0}, TypeError, "4096.0")):
        cap = kw.pop("capacity", 1 << 20)
        with pytest.raises(err, match=text):
            gb.ShmemStore(cap, **kw)
    with pytest.raises(TypeError, match="2.5"):
        gb.FileStore(tmp_path, 2.5)
    with pytest.raises(ValueError, match="warm_decay=-1.0"):
        gb.FileStore(tmp_path / "never.bin", 1 << 20, warm_decay=-1)
    assert not (tmp_path / "never.bin").exists()        # refused before the file was made
    with pytest.raises(ValueError, match="low_watermark=-1"):
        gb.TieredStore(gb.ShmemStore(PS), gb.FileStore(tmp_path, PS), low_watermark=-1)
    closed = gb.ShmemStore(PS)
    closed.close()
    slow = gb.FileStore(tmp_path, PS)
    with pytest.raises(ValueError, match="closed"):
        gb.TieredStore(closed, slow)
    slow.close()
    s.close()
    assert resources() == fds                           # no refused store kept an fd


def test_constructor_os_errors_carry_the_path_and_numbers(tmp_path):
    missing = tmp_path / "no" / "such" / "dir" / "swap.bin"
    with pytest.raises(StoreSetupError, match="no/such/dir/swap.bin") as ei:
        gb.FileStore(missing, 1 << 20)
    assert ei.value.errno == errno.ENOENT and isinstance(ei.value.__cause__, OSError)
    assert isinstance(ei.value, gb.GpuBackupError) and isinstance(ei.value, OSError)
    with pytest.raises(StoreSetupError, match=r"4,611,686,018,427,387,904 B") as ei:
        gb.ShmemStore(1 << 62)
    assert ei.value.__cause__ is not None


# ------------------------------------------------------------------ TieredStore
class FlakySlow:
    """A FileStore whose next ``fail`` backups raise EIO (a disk error)."""

    def __init__(self, inner, fail=1):
        self.inner, self.fail = inner, fail

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def closed(self):
        return self.inner.closed

    @property
    def capacity(self):
        return self.inner.capacity

    @property
    def bytes_used(self):
        return self.inner.bytes_used

    @property
    def bytes_resident(self):
        return self.inner.bytes_resident

    def backup(self, data, *, writeback=False):
        if self.fail:
            self.fail -= 1
            raise OSError(errno.EIO, "injected disk error")
        return self.inner.backup(data, writeback=writeback)


def test_tiered_recovers_after_an_io_error_mid_demotion(tmp_path, rng):
    slow = FlakySlow(gb.FileStore(tmp_path, 64 * PS))
    with gb.TieredStore(gb.ShmemStore(8 * PS, warm_slack=0, host_reserve=0), slow) as t:
        a = pages(rng, 6)
        ha = t.backup(a)
        with pytest.raises(OSError, match="injected disk error"):
            t.backup(pages(rng, 6))                # needs a demotion; the disk fails
        assert t.bytes_used == 6 * PS and t.stats()["demoted_pages"] == 0
        np.testing.assert_array_equal(readback(t, ha), a)
        b = pages(rng, 6)
        hb = t.backup(b)                           # demotes again, now it works
        assert t.stats()["demoted_pages"] == 4 and t.slow.bytes_used == 4 * PS
        np.testing.assert_array_equal(readback(t, ha), a)
        np.testing.assert_array_equal(readback(t, hb), b)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_tiered_fault_at_every_step(tmp_path, rng, exc):
    def make():
        t = gb.TieredStore(gb.ShmemStore(8 * PS, warm_slack=0, host_reserve=0),
                           gb.FileStore(tmp_path, 64 * PS))
        first = pages(np.random.default_rng(1), 6)
        return t, {tuple(t.backup(first).tolist()): first}

    def op(t, state):
        d = pages(np.random.default_rng(2), 6)
        h = t.backup(d)                              # demotes 4 of the first pages
        state[tuple(h.tolist())] = d
        key = next(iter(state))
        t.drop(np.array(key, np.int64))
        del state[key]

    t, state = make()
    with Inject() as rec:
        op(t, state)
    t.close()
    assert "store.tiered.demote.copied" in rec.hits and "store.tiered.drop.begin" in rec.hits
    for nth in range(len(rec.hits)):
        t, state = make()
        with Inject(exc, nth) as inj:
            try:
                op(t, state)
            except (KeyboardInterrupt, OSError, gb.StoreFullError):
                pass
        assert inj.fired
        # A drop frees its logical handles first (the tiers' pages may follow later).
        state = {k: v for k, v in state.items() if (t._loc[np.array(k) - 1] != 0).all()}
        live = sum(len(k) for k in state)
        # Orphaned tier pages (a drop that failed) are dropped by the next operation.
        t.trim()
        assert t.fast.bytes_used + t.slow.bytes_used == live * PS, rec.hits[nth]
        for key, data in state.items():
            np.testing.assert_array_equal(readback(t, np.array(key, np.int64)), data)
        op(t, state)                                   # the retry completes
        for key in list(state):
            t.drop(np.array(key, np.int64))
        t.trim()
        assert t.fast.bytes_used == 0 and t.slow.bytes_used == 0
        assert t.fast._audit()["busy"] == 0 and t.slow._audit()["busy"] == 0
        t.close()


# ------------------------------------------------------------- real signals
def test_deferred_interrupt_holds_sigint_to_the_end_of_the_block():
    import signal

    from gpu_backup._interrupts import deferred_interrupt

    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            signal.raise_signal(signal.SIGINT)
            done.append("after the signal")       # still runs: the interrupt waits
    assert done == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_sigint_soak_on_store_operations(rng, monkeypatch):
    """Real SIGINTs at random instants into backup/read/drop loops (parallel copies
    included): after each, every slot is in one state and committed bytes are intact.

    The handler raises ``KeyboardInterrupt`` only while the loop is armed, so that the
    checks between rounds run undisturbed."""
    import random
    import signal
    import time

    monkeypatch.setattr(_base, "_PARALLEL_MIN", 256 << 10)
    main = threading.main_thread().ident
    r = random.Random(7)
    armed = [False]
    stop = threading.Event()

    def handler(signum, frame):
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt

    def shoot():
        while not stop.is_set():
            time.sleep(r.uniform(0.0002, 0.003))
            signal.pthread_kill(main, signal.SIGINT)

    old = signal.signal(signal.SIGINT, handler)
    shooter = threading.Thread(target=shoot, daemon=True)
    shooter.start()
    s = gb.ShmemStore(32 << 20, threads=3, host_reserve=0, warm_slack=2 << 20)
    live: dict[tuple, np.ndarray] = {}
    hits = rounds = 0
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            d = None
            rounds += 1
            try:
                armed[0] = True
                d = rng.integers(0, 256, int(rng.integers(1, 128)) * PS, dtype=np.uint8)
                h = s.backup(d)
                live[tuple(h.tolist())] = d
                d = None
                if len(live) > 4:
                    key = next(iter(live))
                    np.testing.assert_array_equal(readback(s, np.array(key)), live[key])
                    s.drop(np.array(key))
                    del live[key]
                armed[0] = False
            except KeyboardInterrupt:
                armed[0] = False
                hits += 1
            _settle(s, live, d)
    finally:
        armed[0] = False
        stop.set()
        shooter.join()
        signal.signal(signal.SIGINT, old)
    _settle(s, live, None)
    assert hits > 50, (hits, rounds)
    s.close()


def _settle(s, live, pending):
    """After an interrupt, with no signal in flight.  A key being dropped may or may not be
    dropped; a backup that returned just before the interrupt (``pending``, its handles
    not yet recorded) holds exactly its pages; everything else is as the model says."""
    audit = s._audit()
    assert audit["busy"] == 0
    for key in list(live):
        state = s._state[np.array(key) - 1]
        if ((state == _pool.WARM) | (state == _pool.COLD)).any():
            del live[key]              # the interrupt hit after the drop took effect
    known = np.zeros(s.npages, bool)
    for key in live:
        known[np.array(key) - 1] = True
    held = (s._state == _pool.USED) | (s._state == _pool.UNFAULTED)
    unknown = np.flatnonzero(held & ~known)
    if unknown.size:                   # only a backup that returned can hold them
        assert pending is not None and unknown.size == pending.size // PS
        s.drop(unknown + 1)
    assert s._audit()["used"] == sum(len(k) for k in live)
    for key, data in live.items():
        np.testing.assert_array_equal(readback(s, np.array(key)), data)


def test_tiered_watermark_demotion_failure_keeps_the_allocation(tmp_path, rng, caplog):
    slow = FlakySlow(gb.FileStore(tmp_path, 64 * PS))
    with gb.TieredStore(gb.ShmemStore(16 * PS, warm_slack=0, host_reserve=0), slow,
                        low_watermark=8 * PS) as t:
        data = pages(rng, 12)
        with caplog.at_level(logging.WARNING, logger="gpu_backup.store"):
            h = t.backup(data)                   # stored; the watermark demotion failed
        assert "a later allocation tries again" in caplog.text
        np.testing.assert_array_equal(readback(t, h), data)
        t.backup(pages(rng, 1))                  # demotes now
        assert t.slow.bytes_used > 0 and t.fast.bytes_avail() >= 8 * PS
        np.testing.assert_array_equal(readback(t, h), data)

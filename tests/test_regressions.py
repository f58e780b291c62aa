"""Regression tests for failure modes found in review: each once lost bytes, leaked a
resource or deadlocked.  Host backend (real threads and events); bounded by timeouts."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

import numpy as np
import pytest

import gpu_backup as gb
from gpu_backup._interrupts import deferred_interrupt
from gpu_backup.device.host import HostStream

PS = gb.PAGE_SIZE


def test_eviction_follows_every_pending_use_not_only_the_latest():
    with gb.BufferManager("host") as mgr:
        s_a, s_b = mgr.backend.new_stream(), mgr.backend.new_stream()
        b = mgr.alloc(1 << 20)
        with b.access("w") as a:
            a[:] = 1
        with b.access("rw", stream=s_a) as a:
            s_a.launch(lambda a=a: (time.sleep(0.3), a.fill(7)))   # still running at exit
        with b.access("r", stream=s_b):
            pass                                                    # a later, idle use
        b.evict()
        assert np.unique(b.to_host()).tolist() == [7]
        s_a.close()
        s_b.close()


def test_concurrent_accesses_on_two_streams_are_both_waited_for():
    """Two threads inside access() at once: the one with pending work exits first."""
    with gb.BufferManager("host") as mgr:
        s_slow, s_idle = mgr.backend.new_stream(), mgr.backend.new_stream()
        b = mgr.alloc(PS)
        with b.access("w") as a:
            a[:] = 1
        both_in, slow_out = threading.Barrier(2), threading.Event()

        def slow():
            with b.access("rw", stream=s_slow) as a:
                both_in.wait(5)
                s_slow.launch(lambda a=a: (time.sleep(0.4), a.fill(7)))
            slow_out.set()

        def idle():
            with b.access("r", stream=s_idle):
                both_in.wait(5)
                slow_out.wait(5)          # exits last: its event is the latest

        threads = [threading.Thread(target=f) for f in (slow, idle)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        b.evict()
        assert np.unique(b.to_host()).tolist() == [7]
        s_slow.close()
        s_idle.close()


def test_collected_buffer_is_released_at_a_safe_point_not_in_gc(monkeypatch):
    with gb.BufferManager("host") as mgr:
        b = mgr.alloc(8 * PS)
        with b.access("w") as a:
            a[:] = 3
        b.evict()
        reaped = []
        real = mgr._reap
        monkeypatch.setattr(mgr, "_reap", lambda *a: (reaped.append(a[0]), real(*a)))
        cycle = [b]
        cycle.append(cycle)          # a reference cycle: only the cyclic GC frees it
        del b, cycle
        gc.collect()
        assert reaped == [] and len(mgr._graveyard) == 1   # GC only queued it
        mgr.alloc(PS)                                      # a safe point
        assert len(reaped) == 1 and mgr.store.bytes_used == 0


def test_shrinker_that_frees_the_buffer_being_restored_does_not_deadlock():
    """A real device OOM runs every shrinker while a buffer is being restored; one that
    frees that very buffer must not deadlock the access."""
    with gb.BufferManager("host", host_capacity=8 * PS) as mgr:
        b = mgr.alloc(8 * PS)
        with b.access("w") as a:
            a[:] = 5
        del a                         # an array kept past access() keeps the memory alive
        b.evict()
        other = mgr.alloc(8 * PS)     # the emulated device is now full

        class Rude:
            def count(self):
                return 1

            def scan(self, n):
                b.free()                  # the buffer whose access is allocating
                return gb.SHRINK_STOP

        mgr.register_shrinker(Rude())
        # The access waits (bounded) for the main thread's access() of `other` to end,
        # which it does only after the join below.
        mgr.reclaim_wait = 0.5
        outcome = []

        def go():
            try:
                with b.access("r"):
                    outcome.append("entered")
            except BaseException as e:  # noqa: BLE001
                outcome.append(type(e).__name__)

        with other.access("r"):           # the LRU shrinker cannot help: only Rude is asked
            t = threading.Thread(target=go)
            t.start()
            t.join(20)
        assert not t.is_alive(), "deadlock"
        assert outcome == ["OutOfDeviceMemory"]
        with b.access("r") as a:          # and nothing was lost
            assert int(a[0]) == 5


def test_interrupted_one_piece_eviction_does_not_hand_out_a_busy_slot(monkeypatch):
    """Ctrl-C while the one-piece eviction waits for its copy: the copy is still queued
    behind the user's kernel, so the slot must not be reused until it completes."""
    from gpu_backup.device import host

    with gb.BufferManager("host", staging=gb.Staging(slots=1, slot_bytes=1 << 16)) as mgr:
        n = 1 << 16
        b_buf = mgr.alloc(n)
        with b_buf.access("w") as a:
            a[:] = 0xBB
        b_buf.evict()
        a_buf = mgr.alloc(n)
        user = mgr.backend.new_stream()
        with a_buf.access("w", stream=user) as a:
            user.launch(lambda a=a: (time.sleep(0.5), a.fill(0xAA)))
        real = host.HostEvent.synchronize
        armed = [True]

        def interrupted(self):
            if armed[0] and threading.current_thread() is threading.main_thread():
                armed[0] = False
                raise KeyboardInterrupt
            return real(self)

        monkeypatch.setattr(host.HostEvent, "synchronize", interrupted)
        with pytest.raises(KeyboardInterrupt):
            a_buf.evict()
        assert np.unique(b_buf.to_host()).tolist() == [0xBB]   # reuses the slot
        assert np.unique(a_buf.to_host()).tolist() == [0xAA]
        user.close()


def test_slot_survives_an_interrupted_wait_in_acquire(monkeypatch):
    with gb.BufferManager("host", staging=gb.Staging(slots=1, slot_bytes=1 << 16)) as mgr:
        ring = mgr._ring

        class Boom:
            done = False

            def synchronize(self):
                raise KeyboardInterrupt

        ring._slots[0].event = Boom()
        held: list = []
        with pytest.raises(KeyboardInterrupt), deferred_interrupt() as shield:
            ring._acquire(held, shield)
        assert held == [ring._slots[0]] and not ring._free   # the caller's, not lost
        ring._release_held(held)
        assert len(ring._free) == 1 and ring._slots[0].event is not None  # still guarded
        ring._slots[0].event = None
        b = mgr.alloc(1 << 16)
        with b.access("w") as a:
            a[:] = 9
        b.evict()
        assert np.unique(b.to_host()).tolist() == [9]


def _threads_and_fds():
    return threading.active_count(), len(os.listdir("/proc/self/fd"))


def test_failed_constructor_and_dropped_streams_leak_nothing():
    before = _threads_and_fds()
    for _ in range(5):
        with pytest.raises(ValueError, match="device_limit"):
            gb.BufferManager("host", device_limit=-5)
        with pytest.raises(ValueError, match="slot_bytes"):
            gb.BufferManager("host", staging=gb.Staging(slot_bytes=100))
    for _ in range(10):
        HostStream()
    gc.collect()
    deadline = time.monotonic() + 5
    while _threads_and_fds() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _threads_and_fds() == before


def test_access_of_a_resident_buffer_skips_the_page_table(monkeypatch):
    with gb.BufferManager("host") as mgr:
        b = mgr.alloc(64 * PS)
        with b.access("w"):
            pass
        calls = []
        monkeypatch.setattr(mgr._pager, "_restore_locked", lambda *a, **k: calls.append(a))
        monkeypatch.setattr(mgr._pager, "forget_backups", lambda *a, **k: calls.append(a))
        for mode in ("r", "rw", "w"):
            with b.access(mode):
                pass
        assert calls == []


def test_raising_shrinker_is_skipped_not_fatal():
    with gb.BufferManager("host") as mgr:
        class Broken:
            def count(self):
                return 100

            def scan(self, n):
                raise RuntimeError("cache bug")

        mgr.register_shrinker(Broken())
        b = mgr.alloc(4 * PS)
        with b.access("w") as a:
            a[:] = 1
        assert mgr.shrink(4 * PS) == 4 * PS     # the LRU shrinker still did its part


class _SigintOnWrite:
    """A store whose ``write`` number ``n`` (counted across the test) sends a real SIGINT to
    this process first: it lands while a piece of an eviction is in flight."""

    def __init__(self, store, n: int) -> None:
        self._store, self._n, self.calls = store, n, 0

    def write(self, handles, data):
        self.calls += 1
        if self.calls == self._n:
            signal.raise_signal(signal.SIGINT)
        return self._store.write(handles, data)

    def __getattr__(self, name):
        return getattr(self._store, name)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_real_sigint_in_a_multi_piece_eviction_keeps_every_slot_and_page(n, rng):
    """A real Ctrl-C while the pipeline's pieces are in flight: it is taken at a checkpoint
    of the copy driver (or the eviction's end), never inside a hand-over.  After it every
    slot is free, every store page is owned (by the page table or the buffer's staged
    handles), and running the eviction again completes it with every byte intact."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread only")
    from gpu_backup.testing import check_invariants
    store = gb.ShmemStore(4 << 20)
    wrapped = _SigintOnWrite(store, n)
    staging = gb.Staging(slots=3, slot_bytes=2 * PS, threads=2)
    with gb.BufferManager("host", store=wrapped, staging=staging) as mgr:
        mgr.zero_scan = False
        data = rng.integers(0, 256, 24 * PS, dtype=np.uint8)
        b = mgr.alloc(data.size)
        with b.access("w") as a:
            a[:] = data
        del a
        with pytest.raises(KeyboardInterrupt):
            b.evict()
        assert len(mgr._ring._free) == 3          # every slot back in the ring
        check_invariants(mgr, {b: data})         # pages owned once, bytes right, nothing leaked
        assert b.evict() > 0 or b.state is gb.Residency.EVICTED
        assert b.state is gb.Residency.EVICTED and b._pages.staged is None
        assert store.bytes_used == 24 * PS
        assert np.array_equal(b.to_host(), data)
        b.free()
        assert store.bytes_used == 0
    store.close()


def test_interrupted_wait_on_a_host_event_leaves_it_usable():
    """A Ctrl-C while the main thread waits for a host stream's event: the wait raises, and
    the event (a lock the stream releases) can be waited for again: nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread only")
    stream = HostStream()
    gate = threading.Lock()
    gate.acquire()
    stream.launch(lambda: gate.acquire())      # the stream blocks until the test lets it go
    ev = stream.record()
    timer = threading.Timer(0.05, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        ev.synchronize()
    timer.join()
    assert not ev.done
    gate.release()
    ev.synchronize()                           # completes: the interrupted wait held nothing
    assert ev.done
    stream.close()

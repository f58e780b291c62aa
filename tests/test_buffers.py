"""Buffer behaviour, run on every backend available (host always; cuda when a GPU is present)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import gpu_backup as gb
from gpu_backup.buffer import PURGED_PAGE
from conftest import fill, random_bytes

PS = gb.PAGE_SIZE
R = gb.Residency


@pytest.mark.parametrize("nbytes", [1, PS - 1, PS, PS + 1, 3 * PS, 1_000_003, 5 << 20])
def test_round_trip_is_bit_exact(mgr, rng, nbytes):
    buf = mgr.alloc(nbytes)
    data = random_bytes(rng, nbytes)
    fill(buf, data)
    assert buf.state is R.RESIDENT and buf.resident_bytes == nbytes
    held = -(-nbytes // PS) * PS
    assert mgr.device_bytes == held
    assert buf.evict() == held
    assert buf.state is R.EVICTED and buf.resident_bytes == 0 and buf.device_bytes == 0
    assert mgr.device_bytes == 0 and mgr.store.bytes_used == held
    table = buf.page_table()
    assert (table > 0).all()
    np.testing.assert_array_equal(buf.to_host(), data)
    assert buf.state is R.RESIDENT


def test_zero_size_buffer(mgr):
    buf = mgr.alloc(0)
    assert buf.state is R.RESIDENT and buf.npages == 0
    assert buf.evict() == 0
    with buf.access() as arr:
        assert arr.shape == (0,)
    buf.free()


def test_many_small_buffers(mgr, rng):
    bufs = []
    for _ in range(120):
        n = int(rng.integers(1, 3 * PS))
        b = mgr.alloc(n)
        d = random_bytes(rng, n)
        fill(b, d)
        bufs.append((b, d))
    for b, _ in bufs:
        b.evict()
    assert mgr.device_bytes == 0
    for b, d in bufs[::-1]:
        np.testing.assert_array_equal(b.to_host(), d)


def test_read_mode_keeps_backup_for_free_reeviction(mgr, rng):
    buf = mgr.alloc(300_000)
    data = random_bytes(rng, buf.nbytes)
    fill(buf, data)
    buf.evict()
    out_before = mgr.stats()["bytes_copied_out"]
    with buf.access("r") as arr:
        assert arr.shape == (buf.nbytes,)
    assert mgr.store.bytes_used == buf.npages * PS          # backup kept
    assert buf.evict() == buf.npages * PS
    s = mgr.stats()
    assert s["bytes_copied_out"] == out_before               # no copy the second time
    assert s["clean_evictions"] == 1
    np.testing.assert_array_equal(buf.to_host(), data)


def test_rw_mode_drops_backups(mgr, rng):
    buf = mgr.alloc(200_000)
    data = random_bytes(rng, buf.nbytes)
    fill(buf, data)
    buf.evict()
    with buf.access("rw"):
        pass
    assert mgr.store.bytes_used == 0
    assert (buf.page_table() == 0).all()
    np.testing.assert_array_equal(buf.to_host(), data)


def test_write_mode_skips_restore(mgr, rng):
    buf = mgr.alloc(200_000)
    fill(buf, random_bytes(rng, buf.nbytes))
    buf.evict()
    copied_in = mgr.stats()["bytes_copied_in"]
    new = random_bytes(rng, buf.nbytes)
    fill(buf, new)
    assert mgr.stats()["bytes_copied_in"] == copied_in
    assert mgr.store.bytes_used == 0
    np.testing.assert_array_equal(buf.to_host(), new)


def test_modified_buffer_is_copied_again(mgr, rng):
    buf = mgr.alloc(100_000)
    fill(buf, random_bytes(rng, buf.nbytes))
    buf.evict()
    new = random_bytes(rng, buf.nbytes)
    fill(buf, new)
    buf.evict()
    assert mgr.stats()["clean_evictions"] == 0
    np.testing.assert_array_equal(buf.to_host(), new)


def test_purgeable_is_discarded_not_copied(mgr, rng):
    buf = mgr.alloc(100_000, purgeable=True)
    fill(buf, random_bytes(rng, buf.nbytes))
    assert buf.evict() == buf.npages * PS
    assert buf.state is R.PURGED
    assert mgr.stats()["bytes_copied_out"] == 0 and mgr.store.bytes_used == 0
    assert (buf.page_table() == PURGED_PAGE).all()
    with pytest.raises(gb.BufferPurgedError, match=r"buffer #\d+ \(100,000 B, purgeable\) was discarded"):
        with buf.access("r"):
            pass
    assert buf.state is R.PURGED and mgr.device_bytes == 0
    new = random_bytes(rng, buf.nbytes)
    fill(buf, new)                       # mode "w" hands back fresh memory
    assert buf.state is R.RESIDENT
    np.testing.assert_array_equal(buf.to_host(), new)


def test_interrupted_eviction_is_consistent_and_resumable(mgr, rng, monkeypatch):
    buf = mgr.alloc(20 * 64 << 10)       # 20 slot-sized pieces
    data = random_bytes(rng, buf.nbytes)
    fill(buf, data)
    real = mgr.store.write
    calls = {"n": 0}

    def flaky(handles, src):
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError(5, "injected I/O error")
        return real(handles, src)

    monkeypatch.setattr(mgr.store, "write", flaky)
    with pytest.raises(gb.CopyError, match="copy failed after"):
        buf.evict()
    monkeypatch.undo()
    table = buf.page_table()
    assert buf.state is R.PARTIAL
    assert 0 < (table > 0).sum() < buf.npages            # some pieces made it
    assert mgr.store.bytes_used == (table > 0).sum() * PS  # nothing else is held
    assert buf.device_bytes == buf.npages * PS            # device memory kept
    assert buf.evict() == buf.npages * PS                 # resume
    assert buf.state is R.EVICTED
    np.testing.assert_array_equal(buf.to_host(), data)


def test_keyboard_interrupt_during_eviction(mgr, rng, monkeypatch):
    buf = mgr.alloc(10 * 64 << 10)
    data = random_bytes(rng, buf.nbytes)
    fill(buf, data)
    real = mgr.backend.d2h
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(mgr.backend, "d2h", interrupted)
    with pytest.raises(KeyboardInterrupt):
        buf.evict()
    monkeypatch.undo()
    assert buf.state is R.PARTIAL
    assert (buf.page_table() > 0).sum() == 3 * 16         # 3 pieces of 16 pages done
    buf.evict()
    np.testing.assert_array_equal(buf.to_host(), data)


def test_interrupted_restore_is_consistent_and_resumable(mgr, rng, monkeypatch):
    buf = mgr.alloc(20 * 64 << 10)
    data = random_bytes(rng, buf.nbytes)
    fill(buf, data)
    buf.evict()
    real = mgr.store.read
    calls = {"n": 0}

    def flaky(handles, out):
        calls["n"] += 1
        if calls["n"] == 9:
            raise OSError(5, "injected I/O error")
        return real(handles, out)

    monkeypatch.setattr(mgr.store, "read", flaky)
    with pytest.raises(gb.CopyError):
        with buf.access("rw"):
            pass
    monkeypatch.undo()
    table = buf.page_table()
    assert buf.state is R.PARTIAL
    restored = (table == 0).sum()
    assert 0 < restored < buf.npages
    assert mgr.store.bytes_used == (table > 0).sum() * PS   # dropped as read back
    assert not buf.pinned
    np.testing.assert_array_equal(buf.to_host(), data)      # resumes
    assert buf.state is R.RESIDENT


def test_store_full_leaves_buffer_resident(make_mgr, rng):
    store = gb.ShmemStore(8 * PS)
    try:
        mgr = make_mgr(store=store)
        buf = mgr.alloc(16 * PS)
        data = random_bytes(rng, buf.nbytes)
        fill(buf, data)
        with pytest.raises(gb.StoreFullError):
            buf.evict()
        assert buf.state is R.RESIDENT and store.bytes_used == 0
        np.testing.assert_array_equal(buf.to_host(), data)
        mgr.close()
        assert not store.closed            # not owned by the manager
    finally:
        store.close()


def test_eviction_waits_for_the_users_last_work(make_mgr, rng, slow_write):
    """A kernel writes the buffer on the user's stream; the buffer is evicted at once on
    the copy stream: the evicted bytes must be the kernel's."""
    mgr = make_mgr()
    buf = mgr.alloc(4 << 20)
    fill(buf, np.zeros(buf.nbytes, np.uint8))
    stream = slow_write.stream(mgr)
    with buf.access("rw", stream=stream) as arr:
        expected = slow_write(stream, arr)
    buf.evict()
    np.testing.assert_array_equal(buf.to_host(), expected)


def test_restore_is_ordered_before_the_users_work(make_mgr, rng, slow_write):
    mgr = make_mgr()
    buf = mgr.alloc(2 << 20)
    data = random_bytes(rng, buf.nbytes)
    fill(buf, data)
    buf.evict()
    stream = slow_write.stream(mgr)
    with buf.access("rw", stream=stream) as arr:
        expected = slow_write.add_one(stream, arr, data)
    np.testing.assert_array_equal(buf.to_host(), expected)


def test_concurrent_threads(make_mgr):
    mgr = make_mgr(device_limit=64 * PS * 6)
    errors: list[BaseException] = []
    shared = mgr.alloc(32 * PS)
    shared_data = np.arange(shared.nbytes, dtype=np.uint64).astype(np.uint8)
    fill(shared, shared_data)

    def worker(seed):
        r = np.random.default_rng(seed)
        try:
            mine = []
            for i in range(25):
                n = int(r.integers(1, 64 * PS))
                b = mgr.alloc(n)
                d = random_bytes(r, n)
                fill(b, d)
                mine.append((b, d))
                if i % 3 == 0:
                    mine[int(r.integers(0, len(mine)))][0].evict()
                b2, d2 = mine[int(r.integers(0, len(mine)))]
                np.testing.assert_array_equal(b2.to_host(), d2)
                np.testing.assert_array_equal(shared.to_host(), shared_data)
            for b, d in mine:
                np.testing.assert_array_equal(b.to_host(), d)
                b.free()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert not errors, errors[0]
    assert mgr.device_bytes <= mgr.device_limit


def test_evict_inside_access_is_refused(mgr):
    buf = mgr.alloc(PS)
    with buf.access():
        with pytest.raises(gb.BufferBusyError, match="inside access"):
            buf.evict()
        assert mgr.shrink(PS) == 0
        with pytest.raises(gb.BufferBusyError):
            buf.free()
    assert buf.evict() == PS


def test_use_after_free(mgr):
    buf = mgr.alloc(3 * PS)
    buf.free()
    buf.free()
    assert buf.freed and mgr.device_bytes == 0
    with pytest.raises(gb.BufferFreedError, match="was freed"):
        with buf.access():
            pass
    with pytest.raises(gb.BufferFreedError):
        buf.evict()


def test_freeing_an_evicted_buffer_drops_its_pages(mgr, rng):
    buf = mgr.alloc(10 * PS)
    fill(buf, random_bytes(rng, buf.nbytes))
    buf.evict()
    assert mgr.store.bytes_used == 10 * PS
    del buf
    import gc
    gc.collect()            # queues the release; the manager's next call performs it
    assert mgr.buffers() == []
    assert mgr.store.bytes_used == 0 and mgr.device_bytes == 0


def test_bad_arguments(mgr):
    with pytest.raises(ValueError, match="nbytes=-1 must be >= 0"):
        mgr.alloc(-1)
    with pytest.raises(TypeError, match="nbytes must be an int"):
        mgr.alloc(1.5)
    buf = mgr.alloc(PS)
    with pytest.raises(ValueError, match="mode='x' must be one of"):
        with buf.access("x"):
            pass
    assert not buf.pinned


def test_close_releases_everything(make_mgr, rng):
    mgr = make_mgr()
    bufs = [mgr.alloc(50_000) for _ in range(4)]
    for b in bufs:
        fill(b, random_bytes(rng, b.nbytes))
    bufs[0].evict()
    store = mgr.store
    mgr.close()
    mgr.close()
    assert store.closed and mgr.device_bytes == 0
    assert all(b.freed for b in bufs)
    with pytest.raises(gb.ClosedError):
        mgr.alloc(1)


def test_stats_count_and_time(mgr, rng):
    buf = mgr.alloc(1 << 20)
    fill(buf, random_bytes(rng, buf.nbytes))
    buf.evict()
    buf.to_host()
    s = mgr.stats()
    assert s["evictions"] == 1 and s["bytes_copied_out"] == 1 << 20
    assert s["restores"] == 1 and s["bytes_copied_in"] == 1 << 20
    assert s["evict_seconds"] > 0 and s["evict_gbps"] > 0 and s["restore_gbps"] > 0
    assert s["backend"] == mgr.backend.name

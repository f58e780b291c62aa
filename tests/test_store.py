"""The page-store contract, run against both ShmemStore and FileStore."""

from __future__ import annotations

import errno
import gc
import os
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpu_backup as gb
from gpu_backup import _os
from gpu_backup.store import _base
from conftest import pages, readback

PS = gb.PAGE_SIZE


# ---------------------------------------------------------------- round trips
def test_round_trip_and_handles_positive(make_store, rng):
    s = make_store()
    assert isinstance(s, gb.PageStore)
    data = pages(rng, 100)
    h = s.backup(data)
    assert h.dtype == np.int64 and h.shape == (100,)
    assert (h > 0).all()
    np.testing.assert_array_equal(readback(s, h), data)
    assert s.bytes_used == 100 * PS


def test_one_backup_is_contiguous(make_store, rng):
    s = make_store()
    h = s.backup(pages(rng, 64))
    np.testing.assert_array_equal(np.diff(h), 1)


def test_read_follows_handle_order(make_store, rng):
    s = make_store()
    data = pages(rng, 50)
    h = s.backup(data)
    perm = rng.permutation(50)
    out = readback(s, h[perm])
    np.testing.assert_array_equal(out.reshape(50, PS), data.reshape(50, PS)[perm])


def test_accepts_bytes_like(make_store):
    s = make_store()
    h = s.backup(bytes(range(256)) * (PS // 256))
    out = bytearray(PS)
    s.read(h, out)
    assert bytes(out) == bytes(range(256)) * (PS // 256)


def test_zero_pages(make_store):
    s = make_store()
    h = s.backup(np.empty(0, np.uint8))
    assert h.shape == (0,) and h.dtype == np.int64
    s.read(h, np.empty(0, np.uint8))
    s.drop(h)
    assert s.bytes_used == 0


@pytest.mark.parametrize("page_size", [PS, 4 * PS, 2 << 20])
def test_page_sizes(make_store, rng, page_size):
    s = make_store(16 << 20, page_size=page_size)
    data = pages(rng, 3, page_size)
    h = s.backup(data)
    assert h.shape == (3,)
    np.testing.assert_array_equal(readback(s, h), data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["backup", "drop", "read", "reclaim", "pressure",
                                               "trim", "prefault", "alloc"]),
                              st.integers(0, 40), st.integers(0, 2**32 - 1)), max_size=30),
       slack=st.sampled_from([0, 32 * PS, None]))
def test_random_sequences_match_a_model(make_store, ops, slack):
    """Random backup/drop/read sequences, with the pool growing, decaying, shrinking under
    pressure and trimmed, against a plain dict model of the bytes; after every step each
    slot is in exactly one state (no page lost or owned twice)."""
    clock = [0.0]
    kw = {} if slack is None else {"warm_slack": slack}
    s = make_store(256 * PS, background=False, clock=lambda: clock[0], warm_decay=5.0, **kw)
    model: dict[int, bytes] = {}
    for op, n, seed in ops:
        clock[0] += n / 10
        if op == "reclaim":
            s.reclaim()
        elif op == "pressure":
            s.watermark, old = 1 << 62, s.watermark
            s.reclaim()
            s.watermark = old
            if make_store.kind == "shmem":
                assert s.bytes_warm == 0
        elif op == "trim":
            s.trim()
            assert s.bytes_warm == 0
        elif op == "prefault":
            s.prefault(n * PS)
        elif op == "alloc" and n <= s.npages - len(model):
            h = s.alloc(n, populate=bool(seed & 1))
            data = pages(np.random.default_rng(seed), n)
            s.write(h, data)
            for i, x in enumerate(h.tolist()):
                assert x not in model
                model[x] = data[i * PS:(i + 1) * PS].tobytes()
        r = np.random.default_rng(seed)
        if op == "backup":
            data = pages(r, n)
            if n > s.npages - len(model):
                with pytest.raises(gb.StoreFullError):
                    s.backup(data)
                continue
            h = s.backup(data)
            for i, x in enumerate(h.tolist()):
                assert x not in model
                model[x] = data[i * PS:(i + 1) * PS].tobytes()
        elif op in ("drop", "read") and model:
            keys = np.array(sorted(model), np.int64)
            pick = r.choice(keys, size=min(n, keys.size), replace=False)
            if op == "drop":
                s.drop(pick)
                for x in pick.tolist():
                    del model[x]
            else:
                out = readback(s, pick)
                assert out.tobytes() == b"".join(model[x] for x in pick.tolist())
        assert s.bytes_used == len(model) * PS
        audit = s._audit()
        assert audit["used"] == len(model) and audit["busy"] == 0
        assert audit["warm"] * PS == s.bytes_warm <= max(s.warm_slack, s._prefault_target * PS)
    keys = np.array(sorted(model), np.int64)
    assert readback(s, keys).tobytes() == b"".join(model[x] for x in keys.tolist())


# ------------------------------------------------------------ memory accounting
def test_drop_returns_memory_to_the_os(make_store, rng):
    s = make_store(warm_slack=0)
    base = s.bytes_resident
    h = s.backup(pages(rng, 256))
    assert s.bytes_resident - base >= 256 * PS
    s.drop(h)
    assert s.bytes_resident == base
    assert s.bytes_used == 0 and s.bytes_warm == 0


def test_warm_slots_are_reused_first(make_store, rng):
    s = make_store(warm_slack=64 * PS)
    h1 = s.backup(pages(rng, 64))
    resident = s.bytes_resident
    s.drop(h1)
    assert s.bytes_warm == 64 * PS
    assert s.bytes_resident == resident          # kept faulted in
    before = s.stats()
    h2 = s.backup(pages(rng, 64))
    after = s.stats()
    assert after["warm_hits"] - before["warm_hits"] == 64
    assert after["cold_allocs"] == before["cold_allocs"]
    assert sorted(h2.tolist()) == sorted(h1.tolist())
    assert s.bytes_resident == resident and s.bytes_warm == 0


def test_warm_slack_is_bounded(make_store, rng):
    s = make_store(warm_slack=16 * PS)
    base = s.bytes_resident
    s.drop(s.backup(pages(rng, 100)))
    assert s.bytes_warm == 16 * PS
    assert s.bytes_resident - base == 16 * PS


def test_trim_releases_the_warm_list(make_store, rng):
    s = make_store(warm_slack=1 << 20)
    base = s.bytes_resident
    s.drop(s.backup(pages(rng, 64)))
    assert s.trim() == 64 * PS
    assert s.bytes_warm == 0 and s.bytes_resident == base
    assert s.trim() == 0


def test_prefault_makes_warm_slots(make_store, rng):
    s = make_store(warm_slack=0)
    assert s.prefault(32 * PS) == 32 * PS
    assert s.bytes_warm == 32 * PS and s.bytes_resident >= 32 * PS
    assert s.prefault(32 * PS) == 0            # already there
    before = s.stats()["warm_hits"]
    s.backup(pages(rng, 32))
    assert s.stats()["warm_hits"] - before == 32


def test_memory_pressure_releases_slack(rng, monkeypatch):
    with gb.ShmemStore(64 << 20, warm_slack=1 << 20, host_reserve=0) as s:
        s.drop(s.backup(pages(rng, 64)))
        assert s.bytes_warm == 64 * PS
        h = s.backup(pages(rng, 8))
        monkeypatch.setattr(type(s), "_under_pressure", lambda self: True)
        s.drop(h)
        assert s.bytes_warm == 0 and s.bytes_resident == 0


def test_bytes_avail_is_bounded_by_capacity_and_host(rng):
    with gb.ShmemStore(64 * PS, host_reserve=0) as s:
        assert s.bytes_avail() == 64 * PS
        s.backup(pages(rng, 10))
        assert s.bytes_avail() == 54 * PS
    mem = _os.host_memory.read(fresh=True)
    with gb.ShmemStore(mem["total"] * 4, host_reserve=0) as big:
        assert big.bytes_avail() <= mem["total"] + mem["swap_total"]
        assert big.bytes_avail() > 0


def test_writeback_keeps_bytes(make_store, rng):
    s = make_store()
    data = pages(rng, 32)
    h = s.backup(data, writeback=True)
    np.testing.assert_array_equal(readback(s, h), data)
    assert isinstance(s.writeback(h), bool)


# -------------------------------------------------------------------- limits
def test_store_full_before_anything_is_written(make_store, rng):
    s = make_store(32 * PS)
    keep = s.backup(pages(rng, 20))
    used, resident = s.bytes_used, s.bytes_resident
    with pytest.raises(gb.StoreFullError, match=r"cannot store 53,248 B: 49,152 B of the store's 131,072 B"):
        s.backup(pages(rng, 13))
    assert s.bytes_used == used and s.bytes_resident == resident
    assert isinstance(gb.StoreFullError("x"), MemoryError)
    rest = s.backup(pages(rng, 12))
    assert s.bytes_used == s.capacity
    s.drop(keep)
    s.drop(rest)
    assert s.bytes_used == 0


def test_host_memory_limit_refuses(rng):
    mem = _os.host_memory.read(fresh=True)
    with gb.ShmemStore(64 << 20, host_reserve=mem["total"] * 2) as s:
        with pytest.raises(gb.StoreFullError, match="host memory and swap"):
            s.backup(pages(rng, 1))
        assert s.bytes_used == 0 and s.bytes_resident == 0


def fail_populate(monkeypatch) -> None:
    """Make every MADV_POPULATE_WRITE fail with ENOMEM, as when host memory runs out."""
    real = _os.Mapping.madvise

    def failing(self, advice, offset, length):
        if advice == _os.MADV_POPULATE_WRITE:
            raise OSError(errno.ENOMEM, "injected")
        return real(self, advice, offset, length)

    monkeypatch.setattr(_os.Mapping, "madvise", failing)


def test_failed_prefault_stores_nothing(make_store, rng, monkeypatch):
    s = make_store(warm_slack=0)
    keep = s.backup(pages(rng, 4))
    fail_populate(monkeypatch)
    with pytest.raises(gb.StoreFullError, match="faulting in") as ei:
        s.backup(pages(rng, 8))
    assert isinstance(ei.value.__cause__, OSError)
    monkeypatch.undo()
    assert s.bytes_used == 4 * PS
    assert s.stats()["pages_used"] == 4
    h = s.backup(pages(rng, s.npages - 4))   # every slot is still usable
    s.drop(h)
    s.drop(keep)


def test_interrupted_write_stores_nothing(make_store, rng, monkeypatch):
    s = make_store()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(s, "_copy", boom)
    with pytest.raises(KeyboardInterrupt):
        s.backup(pages(rng, 8))
    assert s.bytes_used == 0


# ----------------------------------------------------------------- bad input
def test_bad_handles(make_store, rng):
    s = make_store(64 * PS)
    h = s.backup(pages(rng, 4))
    out = np.empty(PS, np.uint8)
    with pytest.raises(gb.InvalidHandleError, match=r"handle 0 is out of range 1\.\.64"):
        s.read([0], out)
    with pytest.raises(gb.InvalidHandleError, match="handle 65 is out of range"):
        s.read([65], out)
    with pytest.raises(gb.InvalidHandleError, match="handle 9 is not live"):
        s.read([9], out)
    s.drop(h[:1])
    with pytest.raises(gb.InvalidHandleError, match=f"handle {h[0]} is not live"):
        s.drop(h[:1])
    with pytest.raises(gb.InvalidHandleError, match="appears more than once"):
        s.drop(np.array([h[1], h[1]]))
    with pytest.raises(gb.InvalidHandleError, match="not live"):
        s.drop(np.array([h[1], h[0]]))      # one live, one dead: nothing dropped
    assert s.bytes_used == 3 * PS
    np.testing.assert_array_equal(readback(s, h[1:]).size, 3 * PS)
    with pytest.raises(ValueError, match="integers"):
        s.read(np.array([1.0]), out)
    with pytest.raises(ValueError, match="1-D"):
        s.read(np.array([[1]]), out)
    assert isinstance(gb.InvalidHandleError("x"), gb.GpuBackupError)


def test_bad_buffers(make_store):
    s = make_store()
    with pytest.raises(ValueError, match=r"data is 100 B, not a multiple of page_size=4,096"):
        s.backup(np.zeros(100, np.uint8))
    with pytest.raises(ValueError, match="dtype uint8, got float32"):
        s.backup(np.zeros(PS, np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        s.backup(np.zeros((2, PS), np.uint8)[:, ::2])
    with pytest.raises(TypeError, match="host buffer"):
        s.backup(object())
    h = s.backup(np.zeros(2 * PS, np.uint8))
    with pytest.raises(ValueError, match=r"out is 4,096 B but 2 handles of 4,096 B need 8,192 B"):
        s.read(h, np.empty(PS, np.uint8))
    ro = np.empty(2 * PS, np.uint8)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        s.read(h, ro)
    with pytest.raises(ValueError, match="read-only"):
        s.read(h, bytes(2 * PS))
    assert s.bytes_used == 2 * PS


def test_bad_construction(tmp_path):
    with pytest.raises(ValueError, match=r"page_size=3000 must be a power of two >= 4096"):
        gb.ShmemStore(1 << 20, page_size=3000)
    with pytest.raises(ValueError, match="holds no page"):
        gb.ShmemStore(100)
    with pytest.raises(ValueError, match="must be > 0"):
        gb.ShmemStore(0)
    with pytest.raises(TypeError, match="path or an int fd"):
        gb.FileStore(1.5)
    with pytest.raises(ValueError, match="regular file"):
        gb.FileStore(os.open("/dev/null", os.O_RDONLY))


# ------------------------------------------------------------- concurrency
def test_concurrent_backup_read_drop(make_store):
    s = make_store(64 << 20, warm_slack=2 << 20)
    errors: list[BaseException] = []

    def worker(seed):
        r = np.random.default_rng(seed)
        try:
            live = []
            for _ in range(60):
                n = int(r.integers(1, 48))
                data = pages(r, n)
                live.append((s.backup(data), data))
                if len(live) > 4:
                    h, d = live.pop(int(r.integers(0, len(live))))
                    np.testing.assert_array_equal(readback(s, h), d)
                    s.drop(h)
            for h, d in live:
                np.testing.assert_array_equal(readback(s, h), d)
                s.drop(h)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]
    assert s.bytes_used == 0


def test_parallel_copy_of_a_large_batch(make_store, rng, monkeypatch):
    monkeypatch.setattr(_base, "_PARALLEL_MIN", 1 << 20)
    s = make_store(32 << 20, threads=3)
    data = pages(rng, (8 << 20) // PS)
    h = s.backup(data)
    np.testing.assert_array_equal(readback(s, h), data)
    scattered = h[rng.permutation(h.size)]
    np.testing.assert_array_equal(readback(s, scattered).reshape(-1, PS), data.reshape(-1, PS)[scattered - h[0]])


def test_split_cuts_even_page_aligned_parts():
    segs = [(0, 0, 10 * PS), (100 * PS, 10 * PS, 6 * PS)]
    parts = _base._split(segs, 16 * PS, 3)
    assert len(parts) == 3
    sizes = [sum(ln for _, _, ln in p) for p in parts]
    assert sum(sizes) == 16 * PS and max(sizes) - min(sizes) <= PS
    assert all(ln % PS == 0 for p in parts for _, _, ln in p)


# ------------------------------------------------------------------- lifetime
def _maps_of(fd_target: str) -> int:
    with open("/proc/self/maps") as f:
        return sum(fd_target in line for line in f)


@pytest.mark.parametrize("how", ["close", "with", "gc"])
def test_no_fd_or_mapping_left(make_store, rng, resources, tmp_path, how):
    fds = resources()
    # Made here, not through the fixture, which would keep a reference.
    if make_store.kind == "shmem":
        s = gb.ShmemStore(1 << 20, warm_slack=1 << 20)
    else:
        s = gb.FileStore(tmp_path, 1 << 20, warm_slack=1 << 20)
    s.backup(pages(rng, 8))
    target = os.readlink(f"/proc/self/fd/{s.fd}").replace(" (deleted)", "")
    assert _maps_of(target) == 1
    if how == "close":
        s.close()
        s.close()  # idempotent
    elif how == "with":
        with s:
            pass
    else:
        import weakref
        ref = weakref.ref(s)
        del s
        gc.collect()
        assert ref() is None
    assert resources() == fds
    assert _maps_of(target) == 0


def test_use_after_close(make_store, rng):
    s = make_store()
    h = s.backup(pages(rng, 2))
    s.close()
    assert s.closed and s.fd == -1
    for call in (lambda: s.backup(pages(rng, 1)), lambda: s.read(h, np.empty(2 * PS, np.uint8)),
                 lambda: s.drop(h), lambda: s.alloc(1), lambda: s.prefault(PS), s.trim,
                 s.bytes_avail, lambda: s.bytes_resident):
        with pytest.raises(gb.ClosedError, match="is closed"):
            call()


def test_close_waits_for_copies_in_flight(rng, monkeypatch):
    s = gb.ShmemStore(64 << 20)
    data = pages(rng, 1024)
    h = s.backup(data)
    started, release = threading.Event(), threading.Event()
    real = s._copy

    def slow(*a, **k):
        started.set()
        release.wait(10)
        return real(*a, **k)

    monkeypatch.setattr(s, "_copy", slow)
    out = np.empty_like(data)
    reader = threading.Thread(target=s.read, args=(h, out))
    reader.start()
    started.wait(10)
    closer = threading.Thread(target=s.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()          # waiting for the read
    release.set()
    reader.join(10)
    closer.join(10)
    assert not closer.is_alive() and s.closed
    np.testing.assert_array_equal(out, data)


def test_filestore_fd_is_duplicated_and_path_kept(tmp_path, rng):
    path = tmp_path / "swap.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        with gb.FileStore(fd, 1 << 20) as s:
            assert s.fd != fd
            h = s.backup(pages(rng, 2))
            assert s.bytes_used == 2 * PS and h.size == 2
        os.fstat(fd)                       # ours is still open
    finally:
        os.close(fd)
    with gb.FileStore(path, 1 << 20) as s:
        s.backup(pages(rng, 1))
    assert path.exists()


def test_repr_states_usage(rng):
    with gb.ShmemStore(1 << 20, warm_slack=0) as s:
        s.backup(pages(rng, 1))
        assert "4,096 B used of 1,048,576 B" in repr(s)
    assert "closed" in repr(s)


# ------------------------------------------------- reserve now, fault in on write
def test_alloc_without_populate_faults_in_on_write(make_store, rng):
    s = make_store(warm_slack=1 << 20)
    base = s.bytes_resident
    h = s.alloc(32, populate=False)
    assert s.bytes_resident == base and s.bytes_used == 32 * PS
    data = pages(rng, 32)
    s.write(h[:16], data[:16 * PS])
    assert s.bytes_resident - base >= 16 * PS
    s.write(h[16:], data[16 * PS:])
    np.testing.assert_array_equal(readback(s, h), data)
    s.drop(h)
    assert s.bytes_warm == 32 * PS               # faulted by the writes: warm now


def test_never_written_slots_are_not_kept_warm(make_store):
    s = make_store(warm_slack=1 << 20)
    h = s.alloc(8, populate=False)
    s.drop(h)
    assert s.bytes_warm == 0 and s.bytes_used == 0


def test_failed_fault_in_on_write_keeps_handles_droppable(make_store, rng, monkeypatch):
    s = make_store(warm_slack=0)
    h = s.alloc(8, populate=False)
    fail_populate(monkeypatch)
    with pytest.raises(gb.StoreFullError, match="faulting in"):
        s.write(h, pages(rng, 8))
    monkeypatch.undo()
    s.drop(h)
    assert s.bytes_used == 0

"""Bad input gets a clear error, with the value, before anything changes."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import gpu_backup as gb
from gpu_backup.testing import check_invariants, inject_fault

PS = gb.PAGE_SIZE
STAGING = gb.Staging(slots=2, slot_bytes=4 * PS, threads=2)


@pytest.mark.parametrize("kw, err, match", [
    ({"slot_bytes": 1.5e6}, TypeError, r"Staging.slot_bytes must be an int, got float 1500000.0"),
    ({"slot_bytes": 2.0 ** 20}, TypeError, r"Staging.slot_bytes must be an int, got float"),
    ({"slots": 2.0}, TypeError, r"Staging.slots must be an int, got float 2.0"),
    ({"threads": 1.5}, TypeError, r"Staging.threads must be an int, got float 1.5"),
    ({"threads": True}, TypeError, r"Staging.threads must be an int, got bool"),
    ({"slots": 0}, ValueError, r"Staging.slots=0 must be >= 1"),
    ({"slot_bytes": -4096}, ValueError, r"Staging.slot_bytes=-4,096 must be >= 1"),
])
def test_staging_takes_ints_only(kw, err, match):
    with pytest.raises(err, match=match):
        gb.Staging(**kw)
    assert gb.Staging(slots=np.int64(3)).slots == 3 and type(gb.Staging(slots=np.int64(3)).slots) is int


@pytest.mark.parametrize("cap, err, match", [
    (-1, ValueError, "host_capacity=-1 must be >= 1"),
    (0, ValueError, "host_capacity=0 must be >= 1"),
    (1.5e6, TypeError, "host_capacity must be an int, got float 1500000.0"),
    ("1M", TypeError, "host_capacity must be an int, got str"),
])
def test_host_capacity_is_checked_first(cap, err, match, resources):
    before = resources()
    with pytest.raises(err, match=match):
        gb.BufferManager("host", host_capacity=cap)
    assert resources() == before


def test_a_closed_or_foreign_store_is_refused():
    s = gb.ShmemStore(1 << 20)
    s.close()
    with pytest.raises(gb.ClosedError, match="the store handed to BufferManager is closed"):
        gb.BufferManager("host", store=s)
    with pytest.raises(TypeError, match="store must be a PageStore .* got dict"):
        gb.BufferManager("host", store={})
    with pytest.raises(TypeError, match="staging must be a Staging, got tuple"):
        gb.BufferManager("host", staging=(2, 4096, 1))


def test_a_bad_stream_fails_before_restoring_anything():
    with gb.BufferManager("host", staging=STAGING) as mgr:
        b = mgr.alloc(8 * PS)
        with b.access("w") as a:
            a[:] = 3
        del a
        b.evict()
        copied, table = mgr.stats()["bytes_copied_in"], b.page_table()
        with pytest.raises(TypeError, match="stream must be a host stream .* got int 5"):
            with b.access("r", stream=5):
                pass
        assert b.state is gb.Residency.EVICTED and not b.pinned
        assert mgr.stats()["bytes_copied_in"] == copied and mgr.device_bytes == 0
        np.testing.assert_array_equal(b.page_table(), table)
        assert np.unique(b.to_host()).tolist() == [3]


def test_an_allocation_larger_than_the_device_evicts_nothing():
    with gb.BufferManager("host", host_capacity=16 * PS, staging=STAGING) as mgr:
        b = mgr.alloc(16 * PS)
        with b.access("w") as a:
            a[:] = 1
        del a
        with pytest.raises(gb.OutOfDeviceMemory,
                           match=r"cannot allocate 69,632 B on host: larger than the whole device "
                                 r"\(65,536 B\); nothing was evicted"):
            mgr.alloc(17 * PS)
        assert b.state is gb.Residency.RESIDENT and mgr.stats()["evictions"] == 0
    with gb.BufferManager("host", device_limit=8 * PS, staging=STAGING) as mgr:
        b = mgr.alloc(8 * PS)
        with pytest.raises(gb.OutOfDeviceMemory, match="larger than device_limit=32,768 B; nothing"):
            mgr.alloc(9 * PS)
        assert b.state is gb.Residency.RESIDENT and mgr.stats()["evictions"] == 0


@pytest.mark.parametrize("n, err", [(1.5, TypeError), (np.float64(4096), TypeError),
                                    (True, TypeError), (-1, ValueError), ("8", TypeError)])
def test_alloc_and_shrink_take_ints(n, err):
    with gb.BufferManager("host", staging=STAGING) as mgr:
        with pytest.raises(err, match="nbytes"):
            mgr.alloc(n)
        with pytest.raises(err, match="nbytes"):
            mgr.shrink(n)
        assert mgr.device_bytes == 0 and mgr.buffers() == []


def test_empty_buffer_to_host():
    with gb.BufferManager("host", staging=STAGING) as mgr:
        b = mgr.alloc(0)
        out = b.to_host()
        assert isinstance(out, np.ndarray) and out.shape == (0,) and out.dtype == np.uint8
        b.free()
        with pytest.raises(gb.BufferFreedError, match="was freed"):
            b.to_host()


def test_closed_manager_says_closed_not_freed():
    mgr = gb.BufferManager("host", staging=STAGING)
    b = mgr.alloc(PS)
    mgr.close()
    for use in (lambda: b.access("r").__enter__(), b.to_host, b.evict, lambda: mgr.alloc(1),
                lambda: mgr.shrink(1), mgr.__enter__):
        with pytest.raises(gb.ClosedError, match="BufferManager is closed"):
            use()
    with pytest.raises(gb.ClosedError, match="BufferManager is closed"):
        with mgr:
            pass
    b.free()            # a no-op, as before
    mgr.close()         # idempotent


def test_device_bytes_is_current_after_garbage_collection():
    with gb.BufferManager("host", staging=STAGING) as mgr:
        b = mgr.alloc(8 * PS)
        cycle = [b]
        cycle.append(cycle)       # only the cyclic collector frees it
        del b, cycle
        assert mgr.device_bytes == 8 * PS
        gc.collect()
        assert len(mgr._graveyard) == 1          # the finalizer only queued it
        assert mgr.device_bytes == 0             # and the property released it
        assert mgr.backend.allocated_bytes == 0


def test_interrupted_alloc_gives_its_reservation_back():
    with gb.BufferManager("host", device_limit=8 * PS, staging=STAGING) as mgr:
        for point in ("alloc.reserved", "alloc.allocated", "alloc.device_allocated",
                      "alloc.buffer_made"):
            with inject_fault(point) as inj:
                with pytest.raises(KeyboardInterrupt):
                    mgr.alloc(8 * PS)
            assert inj.fired
            assert mgr.device_bytes == 0, point          # the limit is whole again
            check_invariants(mgr)
        b = mgr.alloc(8 * PS)                            # the full limit is usable
        assert b.device_bytes == 8 * PS

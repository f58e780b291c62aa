"""TieredStore: memfd first, disk behind it; handles stay valid while pages move."""

from __future__ import annotations

import numpy as np
import pytest

import gpu_backup as gb
from conftest import fill, random_bytes

PS = gb.PAGE_SIZE


@pytest.fixture
def tiered(tmp_path):
    with gb.TieredStore(gb.ShmemStore(8 * PS, warm_slack=0, host_reserve=0),
                        gb.FileStore(tmp_path, 64 * PS)) as t:
        yield t


def read(store, h):
    out = np.empty(len(h) * PS, np.uint8)
    store.read(h, out)
    return out


def test_is_a_page_store(tiered):
    assert isinstance(tiered, gb.PageStore)
    assert tiered.capacity == 72 * PS


def test_oldest_pages_move_to_disk_when_memory_is_full(tiered, rng):
    a, b = random_bytes(rng, 6 * PS), random_bytes(rng, 6 * PS)
    ha = tiered.backup(a)
    hb = tiered.backup(b)                     # fast holds 8: 4 of a's pages go to disk
    assert tiered.stats()["demoted_pages"] == 4
    assert tiered.fast.bytes_used == 8 * PS and tiered.slow.bytes_used == 4 * PS
    np.testing.assert_array_equal(read(tiered, ha), a)   # same handles, mixed tiers
    np.testing.assert_array_equal(read(tiered, hb), b)
    mixed = np.concatenate([hb[::-1], ha[::2]])
    expect = np.concatenate([b.reshape(-1, PS)[::-1], a.reshape(-1, PS)[::2]]).ravel()
    np.testing.assert_array_equal(read(tiered, mixed), expect)
    tiered.drop(ha)
    tiered.drop(hb)
    assert tiered.bytes_used == 0
    with pytest.raises(gb.InvalidHandleError, match="not live"):
        tiered.read(ha[:1], np.empty(PS, np.uint8))


def test_larger_than_memory_goes_straight_to_disk(tiered, rng):
    big = random_bytes(rng, 20 * PS)
    h = tiered.backup(big)
    np.testing.assert_array_equal(read(tiered, h), big)
    assert tiered.slow.bytes_used >= 12 * PS


def test_write_across_tiers_and_writeback(tiered, rng):
    h = tiered.alloc(4)
    tiered.writeback(h[:2])                   # to disk now
    assert tiered.slow.bytes_used == 2 * PS
    data = random_bytes(rng, 4 * PS)
    tiered.write(h, data)
    np.testing.assert_array_equal(read(tiered, h), data)


def test_low_watermark_keeps_memory_free(tmp_path, rng):
    with gb.TieredStore(gb.ShmemStore(16 * PS, warm_slack=0, host_reserve=0),
                        gb.FileStore(tmp_path, 64 * PS), low_watermark=8 * PS) as t:
        h = t.backup(random_bytes(rng, 12 * PS))
        assert t.fast.bytes_avail() >= 8 * PS
        assert t.slow.bytes_used == 4 * PS and read(t, h).size == 12 * PS


def test_full_in_both_tiers(tmp_path, rng):
    with gb.TieredStore(gb.ShmemStore(2 * PS, host_reserve=0), gb.FileStore(tmp_path, 2 * PS)) as t:
        t.backup(random_bytes(rng, 3 * PS))
        with pytest.raises(gb.StoreFullError, match="4,096 B free in both tiers"):
            t.backup(random_bytes(rng, 2 * PS))
        assert t.bytes_used == 3 * PS


def test_manager_evicts_past_host_memory_into_the_disk_tier(make_mgr, rng, tmp_path):
    store = gb.TieredStore(gb.ShmemStore(16 * PS, warm_slack=0, host_reserve=0),
                           gb.FileStore(tmp_path, 256 * PS))
    try:
        mgr = make_mgr(store=store, device_limit=24 * PS)
        bufs = [mgr.alloc(12 * PS - 7) for _ in range(8)]      # 4x the limit, 6x the memfd
        data = [random_bytes(rng, b.nbytes) for b in bufs]
        for b, d in zip(bufs, data):
            fill(b, d)
        for i in rng.integers(0, 8, 20):
            np.testing.assert_array_equal(bufs[i].to_host(), data[i])
        for b, d in zip(bufs, data):
            np.testing.assert_array_equal(b.to_host(), d)
        assert store.stats()["demoted_pages"] > 0
        mgr.close()
    finally:
        store.close()

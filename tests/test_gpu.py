"""Checks that only mean something on a real GPU (the shared behaviour suites also run
their cuda variants under the same marker).  Run with ``python -m pytest -m gpu``."""

from __future__ import annotations

import numpy as np
import pytest

import gpu_backup as gb
from conftest import cuda_unusable_reason, random_bytes

pytestmark = pytest.mark.gpu

_WHY = cuda_unusable_reason()
if _WHY:
    pytest.skip(f"no usable GPU: {_WHY}", allow_module_level=True)

cp = pytest.importorskip("cupy")
PS = gb.PAGE_SIZE


@pytest.fixture
def mgr():
    with gb.BufferManager("cuda") as m:
        yield m


def test_backend_is_the_real_gpu(mgr):
    assert mgr.backend.name == "cuda"
    free, total = mgr.backend.mem_info()
    assert 0 < free <= total
    assert mgr.backend.device_name
    props = cp.cuda.runtime.getDeviceProperties(mgr.backend.device_id)
    assert mgr.backend.device_name in str(props["name"])


def test_staging_is_pinned(mgr):
    slot = mgr._ring._slots[0]
    attrs = cp.cuda.runtime.pointerGetAttributes(slot.view.ctypes.data)
    assert attrs.type == cp.cuda.runtime.memoryTypeHost


def test_access_yields_device_memory_and_cupy_kernels_see_restored_bytes(mgr, rng):
    buf = mgr.alloc(8 << 20)
    data = random_bytes(rng, buf.nbytes)
    with buf.access("w") as arr:
        assert isinstance(arr, cp.ndarray)
        arr.set(data)
    buf.evict()
    assert mgr.device_bytes == 0
    with buf.access("r") as arr:
        total = int(arr.astype(cp.uint64).sum())   # a kernel on the restored bytes
    assert total == int(data.astype(np.uint64).sum())


def test_eviction_frees_device_memory_to_the_pool(mgr):
    pool = cp.get_default_memory_pool()
    buf = mgr.alloc(64 << 20)
    used = pool.used_bytes()
    buf.evict()
    assert pool.used_bytes() == used - (64 << 20)


def test_cupy_workload_past_a_capped_pool_completes(rng):
    """With the CuPy pool capped (never the whole card), a workload that allocates past the
    cap completes: idle buffers are evicted and keep their bytes."""
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    old_limit = pool.get_limit()
    cap = 256 << 20
    pool.set_limit(size=cap)
    try:
        with gb.BufferManager("cuda") as mgr:
            bufs = [mgr.alloc(32 << 20) for _ in range(6)]          # 192 MiB of buffers
            data = [random_bytes(rng, b.nbytes) for b in bufs]
            for b, d in zip(bufs, data):
                with b.access("w") as arr:
                    arr.set(d)
            with mgr.cupy_allocator():
                x = cp.ones(160 << 20, dtype=cp.uint8)               # past the cap
                assert int(x[:1024].sum()) == 1024
                del x
            assert mgr.stats()["evictions"] > 0
            assert cp.cuda.get_allocator() == pool.malloc
            for b, d in zip(bufs, data):
                np.testing.assert_array_equal(b.to_host(), d)
    finally:
        pool.free_all_blocks()
        pool.set_limit(size=old_limit)


def test_device_index_selects_that_gpu():
    n = cp.cuda.runtime.getDeviceCount()
    with gb.BufferManager(n - 1) as m:
        assert m.backend.device_id == n - 1
    with pytest.raises(gb.NoDeviceError, match=f"driver reports {n}"):
        gb.BufferManager(n)

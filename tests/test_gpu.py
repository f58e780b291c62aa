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


# ------------------------------------------------------------- fitting the CUDA ecosystem
def test_malloc_async_workload_recovers_from_oom(rng):
    """A raw allocator runs out as CUDARuntimeError(2), not CuPy's OutOfMemoryError: under
    cupy_allocator() idle buffers still give way and the CuPy workload completes."""
    from cupy_backends.cuda.api.runtime import CUDARuntimeError

    rt = cp.cuda.runtime
    if not rt.deviceGetAttribute(rt.cudaDevAttrMemoryPoolsSupported, 0):
        pytest.skip("GPU 0 has no stream-ordered memory pools (malloc_async)")
    original = cp.cuda.get_allocator()
    cp.get_default_memory_pool().free_all_blocks()
    chunk = 1 << 30
    cp.cuda.set_allocator(cp.cuda.malloc_async)
    try:
        with gb.BufferManager("cuda:0") as mgr:
            bufs = [mgr.alloc(chunk) for _ in range(2)]       # the least recently used
            data = [random_bytes(rng, 1 << 20) for _ in range(2)]
            for b, d in zip(bufs, data):
                with b.access("w") as arr:
                    arr[:d.size].set(d)
            while rt.memGetInfo()[0] > chunk * 3 // 2:         # fill the GPU with buffers
                bufs.append(mgr.alloc(chunk))
            assert len(bufs) >= 4, "needs a GPU with at least 6 GiB free"
            with pytest.raises(CUDARuntimeError) as ei:       # the raw form, hook-less
                cp.cuda.malloc_async(3 * chunk)
            assert ei.value.status == 2
            with mgr.cupy_allocator():
                x = cp.ones(3 * chunk, dtype=cp.uint8)        # past what is free
                assert int(x[-1024:].sum()) == 1024
                del x
            s = mgr.stats()
            assert s["cupy_oom_events"] >= 1 and s["cupy_oom_recovered"] >= 1
            assert s["evictions"] >= 2 and bufs[0].state is gb.Residency.EVICTED
            assert cp.cuda.get_allocator() is cp.cuda.malloc_async
            for b, d in zip(bufs[:2], data):
                with b.access("r") as arr:
                    np.testing.assert_array_equal(cp.asnumpy(arr[:d.size]), d)
    finally:
        cp.cuda.set_allocator(original)
        cp.cuda.runtime.deviceSynchronize()


def test_oom_under_the_hook_is_cupys_out_of_memory_error():
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    old_limit = pool.get_limit()
    pool.set_limit(size=64 << 20)
    try:
        with gb.BufferManager("cuda") as mgr, mgr.cupy_allocator():
            with pytest.raises(cp.cuda.memory.OutOfMemoryError) as ei:
                cp.empty(128 << 20, dtype=cp.uint8)            # nothing to reclaim
        assert isinstance(ei.value, gb.OutOfDeviceMemory)
        assert ei.value._size == 128 << 20 and ei.value._limit == 64 << 20
    finally:
        pool.free_all_blocks()
        pool.set_limit(size=old_limit)


def test_zero_scan_runs_in_a_fresh_manager(rng):
    """The zero-page kernel compiles here (CuPy finds the runtime headers) and is not turned
    off: a buffer's zero pages are recorded, not copied."""
    with gb.BufferManager("cuda") as mgr:
        assert mgr.zero_scan is True
        buf = mgr.alloc(16 * PS)
        data = random_bytes(rng, buf.nbytes)
        data[PS:3 * PS] = 0
        with buf.access("w") as arr:
            arr.set(data)
        buf.evict()
        assert mgr.zero_scan is True
        s = mgr.stats()
        assert s["zero_pages"] == 2 and s["bytes_copied_out"] == 14 * PS
        np.testing.assert_array_equal(buf.to_host(), data)


def test_two_managers_on_device_0_own_their_streams_rings_and_hooks(rng):
    original = cp.cuda.get_allocator()
    with gb.BufferManager("cuda:0") as a, gb.BufferManager("CUDA") as b:
        assert a.backend.device_id == b.backend.device_id == 0
        assert a.backend.copy_stream.ptr != b.backend.copy_stream.ptr
        pa = {s.view.ctypes.data for s in a._ring._slots}
        assert pa.isdisjoint({s.view.ctypes.data for s in b._ring._slots})
        bufs = [(m, m.alloc(4 << 20)) for m in (a, b)]
        datas = [random_bytes(rng, 4 << 20) for _ in bufs]
        for (m, buf), d in zip(bufs, datas):
            with buf.access("w") as arr:
                arr.set(d)
            buf.evict()
        with a.cupy_allocator(), b.cupy_allocator():
            assert int(cp.ones(1 << 20, dtype=cp.uint8).sum()) == 1 << 20
            for (m, buf), d in zip(bufs, datas):
                with buf.access("r", stream=cp.cuda.Stream(non_blocking=True)) as arr:
                    assert int(arr[:16].astype(cp.uint64).sum()) == int(d[:16].sum())
                np.testing.assert_array_equal(buf.to_host(), d)
        assert cp.cuda.get_allocator() == original

"""Fitting the CUDA ecosystem without a GPU: every form of device out-of-memory, the CuPy
allocator hook's chain, device strings, two emulated devices, and CuPy's header lookup.

The CuPy parts use CuPy's real classes and entry points (``OutOfMemoryError``,
``CUDARuntimeError``, ``get_allocator``/``set_allocator``, ``cupy.cuda.alloc``) with
injected allocators; they skip where CuPy is not installed.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import pickle
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import gpu_backup as gb
from conftest import cuda_unusable_reason, fill, random_bytes
from gpu_backup import cli
from gpu_backup.device import parse_device
from gpu_backup.device.cuda import check_stream_device
from gpu_backup.device.oom import CUDA_ERROR_MEMORY_ALLOCATION, is_device_oom
from gpu_backup.device.protocol import DeviceOOM

PS = gb.PAGE_SIZE
R = gb.Residency
ROOT = Path(__file__).resolve().parent.parent
STAGING = gb.Staging(slots=2, slot_bytes=16 * PS, threads=1)


def _cupy():
    return pytest.importorskip("cupy", reason="CuPy is not installed")


def _runtime_error(status: int) -> BaseException:
    _cupy()
    from cupy_backends.cuda.api.runtime import CUDARuntimeError

    return CUDARuntimeError(status)


# The three forms an allocator's out-of-memory takes (the list)
OOM_FORMS = {
    "cupy_pool": lambda n: _cupy().cuda.memory.OutOfMemoryError(n, 0),
    "cuda_runtime_2": lambda n: _runtime_error(CUDA_ERROR_MEMORY_ALLOCATION),
    "rmm_memoryerror": lambda n: MemoryError(f"std::bad_alloc: out_of_memory: {n} B"),
}


def host_mgr(device: str = "host", **kw) -> gb.BufferManager:
    kw.setdefault("staging", STAGING)
    return gb.BufferManager(device, **kw)


# ------------------------------------------------------------- the classifier
@pytest.mark.parametrize("form", sorted(OOM_FORMS))
def test_every_oom_form_is_device_oom(form):
    assert is_device_oom(OOM_FORMS[form](4096))


def test_what_is_not_device_oom():
    assert not is_device_oom(gb.StoreFullError("host store full"))   # a MemoryError, host side
    assert not is_device_oom(RuntimeError("out of memory"))          # words do not count
    assert not is_device_oom(ValueError("x"))
    assert is_device_oom(DeviceOOM("backend")) and is_device_oom(gb.OutOfDeviceMemory("x"))
    illegal_address = _runtime_error(700)
    assert "cudaErrorIllegalAddress" in str(illegal_address)
    assert not is_device_oom(illegal_address)


# ------------------------------------------------- manager paths: alloc, restore, scan
class CountingShrinker:
    """An application's cache on the device, outside the manager: ``blocks`` allocations of
    ``per_scan`` bytes from the manager's backend; each scan frees one (reclaim measures
    that as a rise in the device's free memory)."""

    def __init__(self, mgr: gb.BufferManager, per_scan: int = 1 << 20, blocks: int = 4) -> None:
        self.per_scan = per_scan
        self.blocks = [mgr.backend.alloc(per_scan) for _ in range(blocks)]
        self.calls: list[int] = []

    def count(self) -> int:
        return self.per_scan * len(self.blocks) or gb.SHRINK_EMPTY

    def scan(self, n: int) -> int:
        self.calls.append(n)
        if not self.blocks:
            return gb.SHRINK_STOP
        del self.blocks[-1]
        return self.per_scan


def _fail_first_allocs(monkeypatch, mgr, errors: list[BaseException]) -> list[int]:
    """The backend's next allocations raise ``errors`` in turn, as a real allocator would."""
    real = mgr.backend.alloc
    seen: list[int] = []

    def alloc(nbytes):
        seen.append(nbytes)
        if errors:
            raise errors.pop(0)
        return real(nbytes)

    monkeypatch.setattr(mgr.backend, "alloc", alloc)
    return seen


@pytest.mark.parametrize("form", sorted(OOM_FORMS))
def test_alloc_reclaims_and_retries_on_every_oom_form(form, monkeypatch):
    with host_mgr() as mgr:
        cache = CountingShrinker(mgr)
        mgr.register_shrinker(cache)
        seen = _fail_first_allocs(monkeypatch, mgr, [OOM_FORMS[form](8 * PS)])
        buf = mgr.alloc(8 * PS)
        assert buf.state is R.RESIDENT and mgr.device_bytes == 8 * PS
        assert seen == [8 * PS, 8 * PS]                      # failed, reclaimed, retried
        assert cache.calls and mgr.stats()["reclaim_calls"] == 1


@pytest.mark.parametrize("form", sorted(OOM_FORMS))
def test_restore_reclaims_and_retries_on_every_oom_form(form, monkeypatch, rng):
    with host_mgr() as mgr:
        cache = CountingShrinker(mgr)
        mgr.register_shrinker(cache)
        buf = mgr.alloc(8 * PS)
        data = random_bytes(rng, buf.nbytes)
        fill(buf, data)
        buf.evict()
        seen = _fail_first_allocs(monkeypatch, mgr, [OOM_FORMS[form](8 * PS)])
        np.testing.assert_array_equal(buf.to_host(), data)
        assert seen == [8 * PS, 8 * PS] and cache.calls


def test_oom_after_reclaim_is_out_of_device_memory_with_the_numbers(monkeypatch):
    with host_mgr() as mgr:
        _fail_first_allocs(monkeypatch, mgr, [_runtime_error(2)])
        with pytest.raises(gb.OutOfDeviceMemory, match=r"cannot allocate 32,768 B on host: "
                                                      r"cudaErrorMemoryAllocation") as ei:
            mgr.alloc(8 * PS)
        assert type(ei.value.__cause__).__name__ == "CUDARuntimeError"
        assert mgr.device_bytes == 0                         # the reservation is given back


@pytest.mark.parametrize("error", [lambda: _runtime_error(700), lambda: gb.StoreFullError("x")],
                         ids=["illegal_address", "store_full"])
def test_other_errors_are_not_reclaimed(error, monkeypatch):
    with host_mgr() as mgr:
        cache = CountingShrinker(mgr)
        mgr.register_shrinker(cache)
        e = error()
        _fail_first_allocs(monkeypatch, mgr, [e])
        with pytest.raises(type(e)):
            mgr.alloc(8 * PS)
        assert cache.calls == [] and mgr.device_bytes == 0


def _buffer_with_zero_pages(mgr, rng, zero=(1, 3)):
    buf = mgr.alloc(6 * PS)
    data = random_bytes(rng, buf.nbytes)
    for z in zero:
        data[z * PS:(z + 1) * PS] = 0
    fill(buf, data)
    return buf, data


@pytest.mark.parametrize("form", sorted(OOM_FORMS))
def test_zero_scan_oom_skips_one_scan_not_all(form, monkeypatch, rng):
    # one-page zero runs are skipped (by default a short interior run travels with its
    # neighbours: one copy costs less than two)
    with host_mgr(zero_scan=True, staging=dataclasses.replace(STAGING, zero_run_bytes=PS)) as mgr:
        a, da = _buffer_with_zero_pages(mgr, rng)
        b, db = _buffer_with_zero_pages(mgr, rng)
        real = mgr._scanner.zero_pages
        calls = []

        def scan(*args, **kw):
            calls.append(1)
            if len(calls) == 1:
                raise OOM_FORMS[form](64)             # the scan's scratch did not fit
            return real(*args, **kw)

        monkeypatch.setattr(mgr._scanner, "zero_pages", scan)
        a.evict()
        s = mgr.stats()
        assert mgr.zero_scan is True                         # still on
        assert s["zero_pages"] == 0 and s["bytes_copied_out"] == 6 * PS   # copied instead
        b.evict()
        s = mgr.stats()
        assert len(calls) == 2 and s["zero_pages"] == 2      # the next eviction scans
        assert s["bytes_copied_out"] == 6 * PS + 4 * PS
        np.testing.assert_array_equal(a.to_host(), da)
        np.testing.assert_array_equal(b.to_host(), db)


def test_zero_scan_failure_that_is_not_oom_turns_it_off(monkeypatch, rng):
    with host_mgr(zero_scan=True) as mgr:
        a, da = _buffer_with_zero_pages(mgr, rng)

        def broken(*args, **kw):
            raise RuntimeError("Failed to find CUDA headers")

        monkeypatch.setattr(mgr._scanner, "zero_pages", broken)
        a.evict()
        assert mgr.zero_scan is False
        np.testing.assert_array_equal(a.to_host(), da)


# ------------------------------------------------------------- the CuPy hook
class FakeDevice:
    """An allocator over a fixed budget that runs out in a chosen form."""

    def __init__(self, capacity: int, form: str = "cupy_pool") -> None:
        self.capacity = capacity
        self.used = 0
        self.form = form
        self.calls = 0

    def malloc(self, nbytes: int):
        self.calls += 1
        if self.used + nbytes > self.capacity:
            raise OOM_FORMS[self.form](nbytes)
        self.used += nbytes
        return ("block", nbytes)


class Frees:
    """A shrinker that frees a fake device's memory (buffers giving way)."""

    def __init__(self, dev: FakeDevice) -> None:
        self.dev = dev
        self.calls: list[int] = []

    def count(self) -> int:
        return self.dev.used or gb.SHRINK_EMPTY

    def scan(self, n: int) -> int:
        self.calls.append(n)
        got = min(n, self.dev.used)
        self.dev.used -= got
        return got


@pytest.fixture
def cupy_allocator_guard():
    """CuPy's global allocator, and the hook module's state, as they were."""
    cupy = _cupy()
    from gpu_backup.device import cupy_hook

    saved = cupy.cuda.get_allocator()
    yield cupy
    cupy.cuda.set_allocator(saved)
    cupy_hook._state["active"] = None


@pytest.mark.parametrize("form", sorted(OOM_FORMS))
def test_hook_reclaims_and_retries_on_every_oom_form(form, cupy_allocator_guard):
    cupy = cupy_allocator_guard
    dev = FakeDevice(1000, form)
    cupy.cuda.set_allocator(dev.malloc)
    with host_mgr() as mgr:
        frees = Frees(dev)
        mgr.register_shrinker(frees)
        with mgr.cupy_allocator():
            hooked = cupy.cuda.get_allocator()
            assert hooked(600) == ("block", 600)
            assert hooked(600) == ("block", 600)             # OOM -> reclaim -> retry
        assert frees.calls and dev.calls == 3                # no retry before the shrink
        s = mgr.stats()
        assert s["cupy_oom_events"] == 1 and s["cupy_oom_recovered"] == 1
        assert s["cupy_bytes_reclaimed"] == 600
        assert cupy.cuda.get_allocator() == dev.malloc


def test_hook_does_not_repeat_the_pools_retry(cupy_allocator_guard, monkeypatch):
    """The pool has run free_all_blocks() and gc.collect() before its error arrives: the
    hook goes straight to the shrinkers, and leaves that pool's cache to its own retry."""
    cupy = cupy_allocator_guard
    import gc

    dev = FakeDevice(1000)

    class Pool:
        def __init__(self):
            self.flushes = 0

        def malloc(self, nbytes):
            return dev.malloc(nbytes)

        def free_all_blocks(self, stream=None):
            self.flushes += 1

    pool = Pool()
    collections = []
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(a) or 0)
    cupy.cuda.set_allocator(pool.malloc)
    with host_mgr() as mgr:
        frees = Frees(dev)
        mgr.register_shrinker(frees)
        with mgr.cupy_allocator():
            hooked = cupy.cuda.get_allocator()
            hooked(900)
            assert hooked(500) == ("block", 500)
    assert dev.calls == 3 and len(frees.calls) == 1
    assert pool.flushes == 0 and collections == []


def test_oom_inside_cupy_allocator_is_cupys_out_of_memory_error(cupy_allocator_guard):
    cupy = cupy_allocator_guard
    dev = FakeDevice(1000, "cuda_runtime_2")
    cupy.cuda.set_allocator(dev.malloc)
    with host_mgr() as mgr, mgr.cupy_allocator():
        try:
            cupy.cuda.alloc(5000)        # CuPy's own entry point: get_allocator()(size)
        except cupy.cuda.memory.OutOfMemoryError as e:   # what CuPy's fallbacks catch
            err = e
        else:
            pytest.fail("no out-of-memory error")
    assert isinstance(err, gb.OutOfDeviceMemory) and isinstance(err, MemoryError)
    assert err._size == 5000 and err._total == -1 and err._limit == 0
    assert str(err).startswith("Out of memory allocating 5,000 bytes: gpu_backup reclaimed 0 B")
    assert "CUDARuntimeError: cudaErrorMemoryAllocation" in str(err)
    assert type(err.__cause__).__name__ == "CUDARuntimeError"
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is type(err) and str(again) == str(err)


def test_hook_keeps_cupys_numbers_from_the_pool(cupy_allocator_guard):
    cupy = cupy_allocator_guard

    def capped(nbytes):
        raise cupy.cuda.memory.OutOfMemoryError(nbytes, 3000, 4096)

    cupy.cuda.set_allocator(capped)
    with host_mgr() as mgr, mgr.cupy_allocator():
        with pytest.raises(cupy.cuda.memory.OutOfMemoryError) as ei:
            cupy.cuda.get_allocator()(2048)
    e = ei.value
    assert (e._size, e._total, e._limit) == (2048, 3000, 4096)
    assert str(e).startswith("Out of memory allocating 2,048 bytes (allocated so far: 3,000 "
                             "bytes, limit set to: 4,096 bytes): gpu_backup reclaimed 0 B")


def test_hook_reclaims_only_for_the_gpu_that_ran_out(cupy_allocator_guard, monkeypatch, rng):
    cupy = cupy_allocator_guard
    devs = [FakeDevice(1000), FakeDevice(1000)]
    current = {"gpu": 1}

    def malloc(nbytes):                  # CuPy allocates on the current device
        return devs[current["gpu"]].malloc(nbytes)

    cupy.cuda.set_allocator(malloc)
    with host_mgr("host:0") as m0, host_mgr("host:1") as m1:
        frees = [Frees(devs[0]), Frees(devs[1])]
        for m, f in zip((m0, m1), frees):
            m.register_shrinker(f)
            monkeypatch.setattr(m._cupy_hook, "_allocating_device", lambda: current["gpu"])
        b0, d0 = m0.alloc(4 * PS), random_bytes(rng, 4 * PS)
        fill(b0, d0)
        with m0.cupy_allocator(), m1.cupy_allocator():
            hooked = cupy.cuda.get_allocator()
            devs[0].used = devs[1].used = 900
            assert hooked(500) == ("block", 500)             # GPU 1 ran out
            assert frees[1].calls and not frees[0].calls
            assert b0.state is R.RESIDENT                    # GPU 0's buffers untouched
            current["gpu"] = 0
            assert hooked(500) == ("block", 500)             # now GPU 0 ran out
            assert frees[0].calls
        s0, s1 = m0.stats(), m1.stats()
        assert s0["cupy_oom_events"] == 1 and s1["cupy_oom_events"] == 1
        assert s0["cupy_oom_other_device"] == 1              # it saw GPU 1's and passed it on
        assert s1["cupy_oom_other_device"] == 0              # GPU 0's was over before it
        np.testing.assert_array_equal(b0.to_host(), d0)


@pytest.mark.parametrize("first_out", [0, 1], ids=["first_in_first_out", "last_in_first_out"])
@pytest.mark.parametrize("how", ["exit", "close"])
def test_two_hooks_uninstalled_in_either_order_restore_the_original(first_out, how,
                                                                    cupy_allocator_guard):
    cupy = cupy_allocator_guard
    dev = FakeDevice(1000)
    cupy.cuda.set_allocator(dev.malloc)
    mgrs = [host_mgr(), host_mgr()]
    frees = [Frees(dev), Frees(dev)]
    try:
        for m, f in zip(mgrs, frees):
            m.register_shrinker(f)
        cms = [m.cupy_allocator() for m in mgrs]
        for cm in cms:
            cm.__enter__()
        out, stays = first_out, 1 - first_out
        if how == "exit":
            cms[out].__exit__(None, None, None)
        else:
            mgrs[out].close()
        hooked = cupy.cuda.get_allocator()
        assert hooked != dev.malloc                          # the other hook is still there
        dev.used = 900
        assert hooked(500) == ("block", 500)
        assert frees[stays].calls and not frees[out].calls   # no stale hook reclaims
        if how == "exit":
            cms[stays].__exit__(None, None, None)
        else:
            mgrs[stays].close()
        assert cupy.cuda.get_allocator() == dev.malloc       # the original, nothing stale
        dev.used = 900
        with pytest.raises(cupy.cuda.memory.OutOfMemoryError) as ei:
            cupy.cuda.get_allocator()(500)
        assert not isinstance(ei.value, gb.OutOfDeviceMemory)   # raw: no hook ran
    finally:
        for m in mgrs:
            m.close()


def test_replacement_made_inside_the_hook_is_left_in_place(cupy_allocator_guard):
    cupy = cupy_allocator_guard
    dev = FakeDevice(1000)
    cupy.cuda.set_allocator(dev.malloc)
    with host_mgr() as mgr:
        with mgr.cupy_allocator():
            dispatcher = cupy.cuda.get_allocator()

            def wrapper(n):                  # another library wrapping what it found
                return dispatcher(n)

            cupy.cuda.set_allocator(wrapper)
            with host_mgr() as other, other.cupy_allocator():   # joins over the wrapper
                assert cupy.cuda.get_allocator() not in (wrapper, dispatcher)
            assert cupy.cuda.get_allocator() == wrapper
        assert cupy.cuda.get_allocator() == wrapper          # theirs stays
        assert wrapper(100) == ("block", 100)                # and passes straight through
        dev.used = 1000
        with pytest.raises(cupy.cuda.memory.OutOfMemoryError) as ei:
            wrapper(100)
        assert not isinstance(ei.value, gb.OutOfDeviceMemory)


@pytest.mark.timeout(20)
def test_an_abandoned_hook_block_is_not_undone_by_garbage_collection(cupy_allocator_guard):
    """A cupy_allocator() block entered and never exited (its manager closed instead) must
    not uninstall from a garbage collection: that can run on a thread holding the hook
    lock (inside another uninstall's logging, say) and would deadlock there."""
    import gc

    from gpu_backup.device import cupy_hook

    cupy = cupy_allocator_guard
    dev = FakeDevice(1000)
    cupy.cuda.set_allocator(dev.malloc)
    with host_mgr() as mgr:
        cm = mgr.cupy_allocator()
        cm.__enter__()
        hook = mgr._cupy_hook
        assert hook.installed
        del cm
        with cupy_hook._LOCK:      # a collection while this thread holds the lock
            gc.collect()
        assert hook.installed       # nothing ran: the block was abandoned, not exited
    assert not hook.installed       # close() uninstalled it
    assert cupy.cuda.get_allocator() == dev.malloc


def test_using_allocator_is_thread_local_and_bypasses_the_hook(cupy_allocator_guard):
    """Documented: a thread inside cupy.cuda.using_allocator(f) allocates with f, not with
    the global hook; entering cupy_allocator() there is refused; leaving works anywhere."""
    cupy = cupy_allocator_guard
    dev, own = FakeDevice(1000), FakeDevice(10)
    cupy.cuda.set_allocator(dev.malloc)
    with host_mgr() as mgr:
        with cupy.cuda.using_allocator(own.malloc):
            with pytest.raises(RuntimeError, match="inside cupy.cuda.using_allocator"):
                mgr.cupy_allocator().__enter__()
        cm = mgr.cupy_allocator()
        cm.__enter__()
        seen = {}

        def worker():
            with cupy.cuda.using_allocator(own.malloc):
                seen["allocator"] = cupy.cuda.get_allocator()

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert seen["allocator"] == own.malloc               # the hook is bypassed there
        assert cupy.cuda.get_allocator() != dev.malloc       # this thread: the hook
        with cupy.cuda.using_allocator(own.malloc):
            cm.__exit__(None, None, None)                    # CuPy refuses set_allocator here
        assert cupy.cuda.get_allocator() == dev.malloc


# ------------------------------------------------------------- device strings
class TorchLikeDevice:
    """What torch.device offers: .type and .index (torch itself is not needed)."""

    def __init__(self, type_: str, index: int | None = None) -> None:
        self.type, self.index = type_, index

    def __repr__(self) -> str:
        return f"device(type={self.type!r}, index={self.index})"


@pytest.mark.parametrize("device,expect", [
    ("auto", ("auto", None)), ("AUTO", ("auto", None)), ("host", ("host", None)),
    ("cuda", ("cuda", None)), ("CUDA", ("cuda", None)), ("cuda:0", ("cuda", 0)),
    ("Cuda:1", ("cuda", 1)), (" cuda:12 ", ("cuda", 12)), ("HOST:1", ("host", 1)),
    (0, ("cuda", 0)), (3, ("cuda", 3)), (np.int64(2), ("cuda", 2)),
    (TorchLikeDevice("cuda", 1), ("cuda", 1)), (TorchLikeDevice("cuda"), ("cuda", None)),
])
def test_device_strings_resolve(device, expect):
    assert parse_device(device) == expect


@pytest.mark.parametrize("device,error,match", [
    ("cuda:-1", ValueError, "cuda:N"), ("cuda:x", ValueError, "cuda:N"),
    ("gpu", ValueError, "cuda:N"), ("auto:0", ValueError, "takes no index"),
    ("cuda:", ValueError, "cuda:N"), (-1, ValueError, ">= 0"),
    (TorchLikeDevice("cpu"), ValueError, "device='host'"),
    (TorchLikeDevice("cuda", -2), ValueError, "not a GPU index"),
    (True, TypeError, "device must be"), (1.0, TypeError, "device must be"),
    (None, TypeError, "device must be"),
])
def test_bad_device_arguments_say_what_is_accepted(device, error, match):
    with pytest.raises(error, match=match):
        parse_device(device)


def test_a_real_torch_device_resolves():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    assert parse_device(torch.device("cuda:1")) == ("cuda", 1)
    assert parse_device(torch.device("cuda")) == ("cuda", None)


@pytest.mark.skipif(cuda_unusable_reason() is None, reason="a GPU is present")
@pytest.mark.parametrize("device", ["cuda:0", "CUDA", "Cuda:1", TorchLikeDevice("cuda", 0)])
def test_cuda_forms_open_the_cuda_backend(device):
    """Without a GPU every CUDA form reaches the CUDA backend, which says why it cannot."""
    with pytest.raises(gb.NoDeviceError, match="CUDA device|CuPy is not installed"):
        gb.BufferManager(device)


def test_cli_accepts_the_same_device_forms():
    assert cli._device("Cuda:1") == "cuda:1"
    assert cli._device("HOST") == "host" and cli._device("2") == 2
    args = cli.build_parser().parse_args(["info", "--device", "CUDA:0"])
    assert args.device == "cuda:0"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["info", "--device", "tpu"])


# ------------------------------------------------------------- two devices
def test_a_manager_per_device_owns_its_streams_ring_and_memory(rng):
    with host_mgr("host:0", host_capacity=16 * PS) as m0, \
            host_mgr("host:1", host_capacity=16 * PS) as m1:
        assert (m0.backend.device_id, m1.backend.device_id) == (0, 1)
        assert "host device 1" in m1.backend.device_name
        assert m0.backend.copy_stream is not m1.backend.copy_stream
        assert m0._ring is not m1._ring
        views0 = {s.view.ctypes.data for s in m0._ring._slots}
        views1 = {s.view.ctypes.data for s in m1._ring._slots}
        assert views0.isdisjoint(views1)                     # pinned staging is per device
        bufs = {m: [m.alloc(8 * PS) for _ in range(2)] for m in (m0, m1)}
        data = {}
        for m, bs in bufs.items():
            for b in bs:
                data[b.id, m.backend.device_id] = d = random_bytes(rng, b.nbytes)
                fill(b, d)
        assert m0.backend.mem_info()[0] == 0 and m1.backend.mem_info()[0] == 0
        extra = m1.alloc(8 * PS)             # device 1 is full: only device 1 gives way
        assert [b.state for b in bufs[m1]] == [R.EVICTED, R.RESIDENT]
        assert [b.state for b in bufs[m0]] == [R.RESIDENT, R.RESIDENT]
        assert m0.stats()["evictions"] == 0 and m1.stats()["evictions"] == 1
        assert extra.state is R.RESIDENT
        for m, bs in bufs.items():
            for b in bs:
                np.testing.assert_array_equal(b.to_host(), data[b.id, m.backend.device_id])


def test_a_stream_of_another_gpu_is_refused():
    class Stream:
        def __init__(self, device_id):
            self.device_id = device_id

    ok, null = Stream(0), Stream(-1)
    assert check_stream_device(ok, 0) is ok and check_stream_device(null, 1) is null
    with pytest.raises(ValueError, match="belongs to GPU 1; this manager's buffers live on GPU 0"):
        check_stream_device(Stream(1), 0)


def test_host_device_id_must_be_an_index():
    with pytest.raises(ValueError, match="device_id=-1"):
        gb.device.HostBackend(device_id=-1)


# ------------------------------------------------------------- kernels can compile here
def _header_package() -> importlib.metadata.Distribution | None:
    for name in ("nvidia-cuda-runtime", "nvidia-cuda-runtime-cu12"):
        try:
            return importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def test_cupy_finds_the_cuda_runtime_headers():
    """CuPy (>= 12.2) refuses to compile any kernel without the CUDA runtime headers: its
    own lookup must find them, and with them our kernel must compile (NVRTC, no GPU)."""
    cupy = _cupy()
    from cuda.pathfinder import locate_nvidia_header_directory

    from gpu_backup.kernels import NVRTC_OPTIONS, kernel_build_check

    found = locate_nvidia_header_directory("cudart")
    assert found is not None, ("CuPy cannot find the CUDA runtime headers: install "
                               "gpu-backup[cuda13] or [cuda12]")
    assert os.path.isfile(os.path.join(found.abs_path, "cuda_runtime.h"))
    options = cupy._core.core.assemble_cupy_compiler_options(NVRTC_OPTIONS)
    assert f"-I{found.abs_path}" in options
    pkg = _header_package()
    if pkg is not None:                  # the extra's package, searched before any system CTK
        assert found.found_via == "site-packages"
        assert Path(found.abs_path).resolve().is_relative_to(Path(pkg.locate_file("")).resolve())
    check = kernel_build_check()
    assert check.ok, check.why
    assert check.headers == found.abs_path and check.nvrtc


def test_both_cuda_extras_bring_headers_and_nvrtc_from_one_release():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for major in (12, 13):
        reqs = extras[f"cuda{major}"]
        assert f"cuda-toolkit[cudart,nvrtc]=={major}.*" in reqs, reqs
        assert any(r.startswith(f"cupy-cuda{major}x") for r in reqs), reqs


def test_info_says_whether_kernels_compile(monkeypatch):
    from gpu_backup import kernels

    info = cli.collect_info("host")
    assert set(info["kernels"]) == {"ok", "why", "nvrtc", "headers", "headers_from"}
    monkeypatch.setattr(kernels, "kernel_build_check", lambda: kernels.KernelBuild(
        False, "CuPy cannot find the CUDA runtime headers (Failed to find CUDA headers.)"))
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["info", "--device", "host"]) == 0
    text = " ".join(out.getvalue().split())
    assert "CUDA kernels" in text and "cannot compile here: CuPy cannot find the CUDA" in text


def test_kernel_build_check_without_cupy():
    import subprocess

    code = ("import builtins\n"
            "real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name == 'cupy' or name.startswith('cupy.'):\n"
            "        raise ImportError('hidden')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "from gpu_backup.kernels import kernel_build_check\n"
            "print(kernel_build_check())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    assert "ok=False" in out.stdout and "CuPy is not installed" in out.stdout


def test_kernel_build_check_says_why_without_the_headers():
    """A machine with only the driver: CuPy's own lookup (through cuda.pathfinder) finds no
    runtime headers, CuPy refuses to compile, and the check says so and what to install."""
    _cupy()
    import subprocess

    code = ("import cuda.pathfinder as pf\n"
            "pf.find_nvidia_header_directory = lambda name: None\n"
            "from gpu_backup.kernels import kernel_build_check\n"
            "c = kernel_build_check()\n"
            "print(c.ok)\n"
            "print(c.why)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    ok, why = out.stdout.split("\n", 1)
    assert ok == "False"
    assert "CuPy cannot find the CUDA runtime headers (Failed to find CUDA headers" in why
    assert "install gpu-backup[cuda13]" in why

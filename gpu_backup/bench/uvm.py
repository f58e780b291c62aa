"""The ``uvm`` scenario: the same buffer in CUDA managed memory, moved by prefetches.

``uvm_evict`` is ``cudaMemPrefetchAsync`` of the whole buffer to the CPU, ``uvm_restore``
the prefetch back to the GPU, each timed from enqueue to stream synchronise, like the
other scenarios.  This is what a user who reaches for unified memory first would get
when moving a buffer out of the way explicitly (demand paging is slower still).

CUDA 13 changed ``cudaMemPrefetchAsync`` to take a ``cudaMemLocation`` and flags.  CuPy
14's ``cupy.cuda.runtime.memPrefetchAsync(ptr, n, dstDevice, stream)`` keeps the old
signature and, in a CUDA 13 build, always fills in a *device* location, so it cannot
name the host there.  The prefetch to the CPU therefore goes through ``cuda.bindings``
(the runtime API of the installed bindings: the location form from 13 on, the device-id
form with ``cudaCpuDeviceId`` before), or through CuPy's own call when CuPy is a CUDA 12
build.  The prefetch to the GPU uses CuPy's call, which is right on both.

Managed memory is never allocated beyond the device's free memory less a margin
(:func:`uvm_unusable` checks ``memGetInfo`` first): oversubscribing managed memory can
stall every process on a shared GPU.  Nothing here imports cupy at import time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .env import dist_version
from .stats import Repeats, as_repeats

__all__ = ["UVM_MARGIN_MIN", "UVM_MARGIN_FRACTION", "uvm_margin", "uvm_unusable",
           "cpu_prefetcher", "uvm_times"]

UVM_MARGIN_MIN = 1 << 30
UVM_MARGIN_FRACTION = 0.10
"""Managed memory is kept below free device memory minus max(1 GiB, 10% of the device)."""


def uvm_margin(total: int) -> int:
    return max(UVM_MARGIN_MIN, int(total * UVM_MARGIN_FRACTION))


def _bindings_major() -> int | None:
    v = dist_version("cuda-bindings", "cuda-python")
    try:
        return int(v.split(".")[0]) if v else None
    except ValueError:
        return None


def cpu_prefetcher() -> Callable[[int, int, int], None] | str:
    """A function ``(ptr, nbytes, stream_ptr)`` that enqueues a prefetch to the CPU, or the
    reason there is none."""
    major = _bindings_major()
    if major is not None:
        try:
            from cuda.bindings import runtime as rt
        except ImportError:
            try:
                from cuda import cudart as rt  # cuda-python 12 before cuda.bindings
            except ImportError as e:
                return f"cuda-bindings {major} is installed but its runtime does not import: {e}"

        def check(res: tuple[Any, ...]) -> None:
            err = res[0]
            if int(err) != 0:
                raise RuntimeError(f"cudaMemPrefetchAsync to the CPU failed: {err!r}")

        if major >= 13:
            loc = rt.cudaMemLocation()
            loc.type = rt.cudaMemLocationType.cudaMemLocationTypeHost
            loc.id = 0
            return lambda ptr, n, s: check(rt.cudaMemPrefetchAsync(ptr, n, loc, 0, s))
        cpu = int(getattr(rt, "cudaCpuDeviceId", -1))
        return lambda ptr, n, s: check(rt.cudaMemPrefetchAsync(ptr, n, cpu, s))
    if dist_version("cupy-cuda12x", "cupy-cuda11x"):
        import cupy

        rt_cp = cupy.cuda.runtime
        cpu = int(getattr(rt_cp, "cudaCpuDeviceId", -1))
        return lambda ptr, n, s: rt_cp.memPrefetchAsync(ptr, n, cpu, s)
    return ("no way to prefetch to the CPU: cuda-bindings is not installed and CuPy is not "
            "a CUDA 12 build (CuPy's memPrefetchAsync names only devices under CUDA 13)")


def uvm_unusable(backend: Any, size: int) -> str | None:
    """None when ``size`` bytes of managed memory may be allocated and prefetched both ways
    on ``backend``'s device now, else why not (with the numbers)."""
    if backend.name != "cuda":
        return (f"the backend is {backend.name}: managed memory and its prefetches need a "
                "CUDA GPU")
    import cupy

    rt = cupy.cuda.runtime
    dev = backend.device_id
    try:
        with cupy.cuda.Device(dev):
            ok = rt.deviceGetAttribute(rt.cudaDevAttrConcurrentManagedAccess, dev)
            free, total = rt.memGetInfo()
    except Exception as e:  # noqa: BLE001 - a driver error is a reason to skip
        return f"querying the device failed: {e!r}"
    if not ok:
        return (f"{backend.device_name} has no concurrentManagedAccess: managed memory "
                "cannot be prefetched to it")
    margin = uvm_margin(int(total))
    if size > int(free) - margin:
        return (f"needs {size:,} B of managed memory; the device has {int(free):,} B free and "
                f"the bench keeps a margin of {margin:,} B (oversubscribed managed memory "
                "can stall a shared GPU)")
    fn = cpu_prefetcher()
    return fn if isinstance(fn, str) else None


def uvm_times(device_id: int, data: np.ndarray,
              repeats: int | Repeats) -> tuple[list[float], list[float]]:
    """(evict, restore) times of ``data.size`` B of managed memory: prefetch to the CPU,
    then back to the GPU, each followed by a synchronise of the stream.  One untimed
    cycle first; the bytes are checked at the end.  Call :func:`uvm_unusable` first."""
    import cupy

    from .scenarios import check_equal

    rt = cupy.cuda.runtime
    to_cpu = cpu_prefetcher()
    if isinstance(to_cpu, str):
        raise RuntimeError(to_cpu)
    size = data.size
    rep = as_repeats(repeats)
    evict: list[float] = []
    restore: list[float] = []
    with cupy.cuda.Device(device_id):
        mem = cupy.cuda.malloc_managed(size)
        try:
            arr = cupy.ndarray((size,), dtype=cupy.uint8, memptr=mem)
            arr.set(data)
            cupy.cuda.get_current_stream().synchronize()
            stream = cupy.cuda.Stream(non_blocking=True)
            ptr = int(mem.ptr)

            def out() -> None:
                to_cpu(ptr, size, stream.ptr)
                stream.synchronize()

            def back() -> None:
                rt.memPrefetchAsync(ptr, size, device_id, stream.ptr)
                stream.synchronize()

            back()
            out()
            back()
            for _ in rep.cycles(evict, restore):
                t0 = time.perf_counter()
                out()
                t1 = time.perf_counter()
                back()
                t2 = time.perf_counter()
                evict.append(t1 - t0)
                restore.append(t2 - t1)
            check_equal(arr.get(), data, "uvm")
        finally:
            arr = None
            del mem          # cudaFree of the managed block
    return evict, restore

"""The one place that decides what counts as device out-of-memory.

A device allocation can run out in several forms, depending on the allocator behind it:

- ``cupy.cuda.memory.OutOfMemoryError``: CuPy's pools (``MemoryPool``,
  ``MemoryAsyncPool``), after their own ``free_all_blocks()`` / ``gc.collect()`` retry;
- ``CUDARuntimeError`` with status ``cudaErrorMemoryAllocation`` (2): raw allocators,
  ``cupy.cuda.set_allocator(None)``, ``malloc_async``, ``malloc_managed``;
- a plain ``MemoryError``: an installed third-party allocator (RMM's, say);
- this library's own :class:`~gpu_backup.device.protocol.DeviceOOM` (a backend's) and
  :class:`~gpu_backup.OutOfDeviceMemory` (raised after reclaim, by the CuPy hook too).

What is *not* device out-of-memory: :class:`~gpu_backup.StoreFullError` (the host store is
full; it is a ``MemoryError`` too, and reclaiming device memory would only make it worse),
and ``CUDARuntimeError`` with any other status (an illegal address is not a full device).

Every allocation path calls :func:`is_device_oom`: the backends' ``alloc`` (used by
``alloc()`` and restore), the zero-page scan's scratch, and the CuPy allocator hook.

CuPy is never imported here: a ``CUDARuntimeError`` can only exist once CuPy's runtime
module is loaded, so it is looked up in ``sys.modules``.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from ..errors import OutOfDeviceMemory, StoreFullError
from .protocol import DeviceOOM

__all__ = ["CUDA_ERROR_MEMORY_ALLOCATION", "cupy_out_of_memory", "cupy_oom_class", "is_device_oom"]

CUDA_ERROR_MEMORY_ALLOCATION = 2
"""``cudaErrorMemoryAllocation`` (and the driver's ``CUDA_ERROR_OUT_OF_MEMORY``): the
same value in every CUDA release."""

_RUNTIME_MODULES = ("cupy_backends.cuda.api.runtime", "cupy.cuda.runtime")


def is_device_oom(exc: BaseException) -> bool:
    """True when ``exc``, raised by a device allocation, means the device is out of memory
    (reclaim and retry may help); False for everything else, the host store's
    :class:`~gpu_backup.StoreFullError` first of all."""
    if isinstance(exc, StoreFullError):
        return False
    if isinstance(exc, (DeviceOOM, OutOfDeviceMemory, MemoryError)):
        return True
    return _cuda_runtime_status(exc) == CUDA_ERROR_MEMORY_ALLOCATION


def _cuda_runtime_status(exc: BaseException) -> int | None:
    """The status of a CuPy ``CUDARuntimeError``, else None."""
    for name in _RUNTIME_MODULES:
        cls = getattr(sys.modules.get(name), "CUDARuntimeError", None)
        if isinstance(cls, type) and isinstance(exc, cls):
            status = getattr(exc, "status", None)
            return int(status) if isinstance(status, int) else None
    return None


@functools.cache
def cupy_oom_class() -> type:
    """``CupyOutOfDeviceMemory``: both :class:`~gpu_backup.OutOfDeviceMemory` and
    ``cupy.cuda.memory.OutOfMemoryError``, so code that catches either (CuPy's own
    fallbacks, a user's batch-size back-off) sees a device OOM.  Built on first use:
    CuPy is imported only then."""
    from cupy.cuda.memory import OutOfMemoryError

    class CupyOutOfDeviceMemory(OutOfDeviceMemory, OutOfMemoryError):
        """A CuPy allocation failed even after reclaim.  Constructed as CuPy's
        ``OutOfMemoryError(size, total, limit)``; ``why`` is appended to its message."""

        def __init__(self, size: int, total: int, limit: int = 0, why: str = "") -> None:
            OutOfMemoryError.__init__(self, size, total, limit)
            self.why = why
            if why:
                self.args = (f"{str(self.args[0]).rstrip('.')}: {why}",)

        def __reduce__(self) -> tuple[Any, ...]:
            return (type(self), (self._size, self._total, self._limit, self.why))

    CupyOutOfDeviceMemory.__module__ = __name__
    CupyOutOfDeviceMemory.__qualname__ = "CupyOutOfDeviceMemory"
    return CupyOutOfDeviceMemory


def cupy_out_of_memory(size: int, total: int, limit: int = 0, why: str = "") -> OutOfDeviceMemory:
    """A ``CupyOutOfDeviceMemory`` with CuPy's constructor arguments: ``size`` requested,
    ``total`` allocated so far (-1: unknown), ``limit`` (0: none)."""
    err: OutOfDeviceMemory = cupy_oom_class()(size, total, limit, why)
    return err


def __getattr__(name: str) -> Any:
    # Lets pickle find the class built on first use by its module and name.
    if name == "CupyOutOfDeviceMemory":
        return cupy_oom_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

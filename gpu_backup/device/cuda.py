"""The CUDA backend: CuPy device memory, two non-blocking copy streams (one per direction:
an H100 has a copy engine for each), blocking events, ``cudaMemcpyAsync`` and pinned host
memory.  Imported only when a CUDA device is asked for."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import NoDeviceError
from .oom import is_device_oom
from .protocol import DeviceOOM

__all__ = ["CudaBackend", "check_stream_device", "probe"]


def check_stream_device(stream: Any, device_id: int) -> Any:
    """``stream`` if it may order work on GPU ``device_id``: a CuPy stream made on another
    GPU cannot (its ``device_id``; -1 for the null and per-thread default streams, which
    belong to whichever device is current).  A buffer never crosses devices."""
    dev = getattr(stream, "device_id", -1)
    if isinstance(dev, int) and dev >= 0 and dev != device_id:
        raise ValueError(f"stream {stream!r} belongs to GPU {dev}; this manager's buffers live "
                         f"on GPU {device_id}: use a stream made on GPU {device_id}")
    return stream


def probe(device_id: int | None) -> tuple[Any, int, str]:
    """Import CuPy and check the device.  Returns ``(cupy, device_id, "")`` or raises
    :class:`NoDeviceError` with the driver's own message."""
    try:
        import cupy
    except ImportError as e:
        raise NoDeviceError(f"CuPy is not installed ({e}); install gpu-backup[cuda13] or [cuda12]") from e
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver, insufficient driver, ...
        raise NoDeviceError(f"no usable CUDA device: {e}") from e
    if count == 0:
        raise NoDeviceError("no usable CUDA device: the driver reports 0 devices")
    dev = 0 if device_id is None else device_id
    if not 0 <= dev < count:
        raise NoDeviceError(f"CUDA device {dev} requested, the driver reports {count} (0..{count - 1})")
    return cupy, dev, ""


class CudaBackend:
    name = "cuda"

    def __init__(self, device_id: int | None = None, reason: str = "requested") -> None:
        cp, dev, _ = probe(device_id)
        self._cp = cp
        self._rt = cp.cuda.runtime
        self.device_id = dev
        self.reason = reason
        props = self._rt.getDeviceProperties(dev)
        name = props["name"]
        self.device_name = name.decode() if isinstance(name, bytes) else str(name)
        with cp.cuda.Device(dev):
            self.d2h_stream = cp.cuda.Stream(non_blocking=True)
            self.h2d_stream = cp.cuda.Stream(non_blocking=True)
        self.copy_stream = self.d2h_stream      # the link-measuring benchmarks' stream
        self._tls = threading.local()           # allocating_for()'s stream, per thread
        nvtx = getattr(cp.cuda, "nvtx", None)   # a stand-in with available=False if absent
        self._nvtx = nvtx if getattr(nvtx, "available", False) else None

    def __repr__(self) -> str:
        return f"<CudaBackend {self.device_id}: {self.device_name}>"

    def activate(self) -> contextlib.AbstractContextManager[Any]:
        """Make this GPU current for the block.  A fresh ``Device`` each time: a Device's
        context stack is per object, and one object shared by threads would interleave."""
        return self._cp.cuda.Device(self.device_id)

    # memory
    def alloc(self, nbytes: int) -> Any:
        """Device memory from CuPy's pool.  The pool keeps a free list per stream (the
        current stream at allocation) and hands a block out again in that stream's order,
        so a block is taken from the pool of the stream that will use it first: the one
        set by :meth:`allocating_for`, else the current stream (then :meth:`mark_current`
        gives the guard for any other stream)."""
        target = getattr(self._tls, "stream", None)
        with self.activate():
            try:
                if target is None:
                    return self._cp.cuda.alloc(nbytes)
                with target:          # the pool reads the current stream
                    return self._cp.cuda.alloc(nbytes)
            except Exception as e:
                # Any allocator's form (CuPy's pool, a raw or async allocator's
                # CUDARuntimeError(2), RMM's MemoryError; OutOfDeviceMemory when the
                # cupy_allocator() hook already tried to reclaim)
                if is_device_oom(e):
                    raise DeviceOOM(f"GPU {self.device_id}: {type(e).__name__}: {e}") from e
                raise

    @contextlib.contextmanager
    def allocating_for(self, stream: Any) -> Iterator[None]:
        """Allocations by this thread inside the block are first used on ``stream``."""
        old = getattr(self._tls, "stream", None)
        self._tls.stream = stream
        try:
            yield
        finally:
            self._tls.stream = old

    def mark_current(self) -> Any:
        """The allocation guard of a block just taken from the current stream's pool: an
        event after the work queued there, for a first use on any other stream to wait on."""
        with self.activate():
            return self._event(self._cp.cuda.get_current_stream())

    def _event(self, stream: Any) -> Any:
        # block=True: a host wait sleeps in the driver instead of spinning a core
        ev = self._cp.cuda.Event(block=True, disable_timing=True)
        ev.record(stream)
        return ev

    def array(self, mem: Any, nbytes: int) -> Any:
        return self._cp.ndarray((nbytes,), dtype=self._cp.uint8, memptr=mem)

    def to_host(self, mem: Any, nbytes: int) -> np.ndarray:
        out = np.empty(nbytes, np.uint8)
        with self.activate():
            self._rt.memcpy(out.ctypes.data, int(mem.ptr), nbytes, self._rt.memcpyDeviceToHost)
        return out

    def pinned(self, nbytes: int) -> tuple[Any, np.ndarray]:
        """Page-locked host memory, allocated directly (not through the pinned pool, which
        would keep it cached): the returned owner frees it when dropped."""
        with self.activate():
            mem = self._cp.cuda.PinnedMemory(nbytes)
        view = np.frombuffer(self._cp.cuda.PinnedMemoryPointer(mem, 0), np.uint8, nbytes)
        return mem, view

    def mem_info(self) -> tuple[int, int]:
        with self.activate():
            free, total = self._rt.memGetInfo()
        return int(free), int(total)

    # copies
    def d2h(self, dst: np.ndarray, src: Any, offset: int, stream: Any) -> None:
        with self.activate():
            self._rt.memcpyAsync(int(dst.ctypes.data), int(src.ptr) + offset, dst.shape[0],
                                 self._rt.memcpyDeviceToHost, stream.ptr)

    def h2d(self, dst: Any, offset: int, src: np.ndarray, stream: Any) -> None:
        with self.activate():
            self._rt.memcpyAsync(int(dst.ptr) + offset, int(src.ctypes.data), src.shape[0],
                                 self._rt.memcpyHostToDevice, stream.ptr)

    def memset(self, dst: Any, offset: int, nbytes: int, value: int, stream: Any) -> None:
        with self.activate():
            self._rt.memsetAsync(int(dst.ptr) + offset, value, nbytes, stream.ptr)

    # streams
    def record(self, stream: Any) -> Any:
        """A blocking, sync-only event recorded on ``stream``, on this GPU."""
        with self.activate():
            return self._event(stream)

    def user_stream(self, stream: Any | None) -> Any:
        if stream is not None:
            return check_stream_device(stream, self.device_id)
        with self.activate():
            return self._cp.cuda.get_current_stream()

    def new_stream(self) -> Any:
        with self.activate():
            return self._cp.cuda.Stream(non_blocking=True)

    @contextlib.contextmanager
    def nvtx(self, name: str) -> Iterator[None]:
        if self._nvtx is None:
            yield
            return
        self._nvtx.RangePush(name)
        try:
            yield
        finally:
            self._nvtx.RangePop()

    def close(self) -> None:
        """Wait for both copy streams (the one stream-wide wait in the library)."""
        with self.activate():
            self.d2h_stream.synchronize()
            self.h2d_stream.synchronize()

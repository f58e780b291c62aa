"""Tensor views of buffers: a ``torch.Tensor`` over a buffer's own memory inside ``access()``."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..buffer import Buffer
    from ..manager import BufferManager

__all__ = ["tensor_access", "torch_device", "torch_stream"]


def torch_device(mgr: BufferManager) -> torch.device:
    """The torch device whose tensors live where ``mgr``'s buffers do: ``cuda:N`` on the
    cuda backend, ``cpu`` on the host backend (where device memory is emulated in RAM)."""
    if mgr.backend.name == "cuda":
        return torch.device("cuda", mgr.backend.device_id)
    return torch.device("cpu")


def torch_stream(mgr: BufferManager, stream: Any = None) -> tuple[Any, Any]:
    """``(torch_stream, backend_stream)`` for work on ``mgr``'s device.

    On cuda: ``stream`` is a ``torch.cuda.Stream`` on the manager's GPU, or None for torch's
    current stream there; the second item wraps the same CUDA stream for CuPy (it keeps the
    torch stream alive).  On host: ``(None, None)``; torch's CPU work runs on the calling
    thread, which is the host backend's immediate stream, so ``stream`` must be None.
    """
    backend = mgr.backend
    if backend.name != "cuda":
        if stream is not None:
            raise ValueError(f"stream={stream!r}: on the {backend.name} backend tensors are CPU "
                             f"tensors and torch's work runs on the calling thread; pass None")
        return None, None
    dev = backend.device_id
    ts = torch.cuda.current_stream(dev) if stream is None else stream
    if not isinstance(ts, torch.cuda.Stream):
        raise TypeError(f"stream must be a torch.cuda.Stream or None, got {type(stream).__name__}")
    if ts.device != torch.device("cuda", dev):
        raise ValueError(f"stream is on {ts.device}, the buffers on cuda:{dev}")
    import cupy

    with cupy.cuda.Device(dev):   # both constructors read the current device
        if hasattr(cupy.cuda.Stream, "from_external"):
            return ts, cupy.cuda.Stream.from_external(ts)
        with warnings.catch_warnings():   # CuPy 13: ExternalStream is the only way
            warnings.simplefilter("ignore", DeprecationWarning)
            return ts, cupy.cuda.ExternalStream(ts.cuda_stream, dev)


def _check_shape(buf: Buffer, dtype: Any, shape: int | Sequence[int], offset: int
                 ) -> tuple[tuple[int, ...], int]:
    """The shape as a tuple and its bytes; a clear error, with the numbers, if the view does
    not fit the buffer."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(f"shape={shape!r}: every dimension must be an int >= 0")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset={offset!r} must be an int >= 0 (bytes)")
    itemsize = dtype.itemsize
    if offset % itemsize:
        raise ValueError(f"offset={offset:,} B is not a multiple of {dtype}'s {itemsize} B items")
    need = math.prod(dims) * itemsize
    if offset + need > buf.nbytes:
        raise ValueError(f"a {dtype} tensor of shape {dims} needs {need:,} B at offset {offset:,}, "
                         f"{offset + need:,} B in all; buffer #{buf.id} holds {buf.nbytes:,} B")
    return dims, need


@contextlib.contextmanager
def tensor_access(buf: Buffer, dtype: torch.dtype, shape: int | Sequence[int], mode: str = "rw",
                  *, stream: Any = None, offset: int = 0) -> Iterator[torch.Tensor]:
    """``buf.access(mode)`` that yields a contiguous ``torch.Tensor`` of ``dtype`` and ``shape``
    over the buffer's own memory (through DLPack: no copy).

    The tensor is on :func:`torch_device` (``cuda:N`` on cuda, ``cpu`` on host) and covers
    bytes ``offset .. offset + prod(shape) * itemsize`` of the buffer, which must fit in
    ``buf.nbytes`` (``ValueError`` with the numbers, before anything is restored).

    Streams (cuda): torch's current stream *is* the stream passed to ``access()``.  With
    ``stream=None`` that is torch's current stream on the buffer's GPU; with a
    ``torch.cuda.Stream`` that stream, made current for torch (and for CuPy) inside the
    block.  The restore is ordered before it; on exit an event is recorded on it, and
    eviction waits for that event, so torch work queued in the block needs no
    synchronisation.  On host the stream is the calling thread (torch's CPU ops finish
    before they return); ``stream`` must be None.

    Ownership: the buffer owns the memory.  The tensor is valid only inside the block; on
    exit it is emptied (``set_()``: shape ``(0,)``), so a kept reference cannot read memory
    that eviction has released.  Views made from it inside the block are not emptied and
    must not outlive it either.
    """
    dims, need = _check_shape(buf, dtype, shape, offset)
    ts, stream_b = torch_stream(buf._mgr, stream)
    with contextlib.ExitStack() as stack:
        if ts is not None:
            import cupy

            stack.enter_context(cupy.cuda.Device(ts.device.index))
            stack.enter_context(stream_b)           # CuPy's side of the DLPack exchange
            stack.enter_context(torch.cuda.stream(ts))
        arr = stack.enter_context(buf.access(mode, stream=stream_b))
        raw = torch.from_dlpack(arr) if ts is not None else torch.from_numpy(arr)
        del arr
        view = raw[offset:offset + need].view(dtype).view(dims)
        del raw
        try:
            yield view
        finally:
            with torch.no_grad():
                view.set_()   # drop the only reference this block handed out

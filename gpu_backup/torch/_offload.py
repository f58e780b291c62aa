"""Activation offload: autograd's saved tensors kept in buffers of a manager.

``offload_saved_tensors(mgr)`` installs ``torch.autograd.graph.saved_tensors_hooks``.  Each
saved tensor worth it is copied (device to device) into a buffer; the buffer stays on the
device unless the manager runs short and evicts it, and it is restored only if it was.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from .._interrupts import take_lock
from ..buffer import Residency
from ..errors import BufferBusyError, BufferFreedError, GpuBackupError, OutOfDeviceMemory
from ._view import tensor_access, torch_device

if TYPE_CHECKING:
    from ..buffer import Buffer
    from ..manager import BufferManager

__all__ = ["SavedTensorOffload", "offload_saved_tensors", "saved_bytes"]

log = logging.getLogger("gpu_backup")

DEFAULT_MIN_BYTES = 1 << 20
"""Saved tensors smaller than this stay with PyTorch (a buffer is whole pages, and the
bookkeeping of a tiny tensor costs more than its memory)."""

LEFT_REASONS = ("small", "device", "param", "view", "layout", "oom")
"""Why a saved tensor was left to PyTorch: under ``min_bytes``; on another device than the
manager's; a parameter (frozen ones too) or another leaf that requires grad, or a view of
one (their owner keeps them alive: a copy would only add memory); a view that does not
cover its whole storage (copying it would not free that storage); a layout other than
plain strided (sparse, quantized, nested, conjugate or negative views, tensor
subclasses); the manager could not make room for it."""


def _release(buf: Buffer) -> None:
    """Free a saved tensor's buffer when autograd lets go of it.

    This runs from a finalizer: on any thread, possibly inside garbage collection while
    this very thread holds the buffer's lock in the manager.  So it never waits for that
    lock; if it is taken, dropping the last reference hands the buffer to the manager's
    collector, which releases it at its next safe point (alloc, shrink, stats, close).
    """
    taken: list = []
    try:
        if not take_lock(buf._lock, taken):
            return
    finally:
        if taken:
            taken[0].release()
    try:
        buf.free()
    except GpuBackupError as e:   # busy or closed: the manager's collector finishes the job
        log.debug("saved tensor buffer #%d released later: %s", buf.id, e)


class _Stored:
    """One storage's bytes in one buffer; owns the buffer, freed when the last packed
    reference (autograd's) is dropped."""

    __slots__ = ("buf", "nbytes", "storage", "version", "_finalizer", "__weakref__")

    def __init__(self, buf: Buffer, storage: Any, version: int) -> None:
        self.buf = buf
        self.nbytes = buf.nbytes
        self.storage = weakref.ref(storage)   # for sharing between saves, never to read it
        self.version = version
        self._finalizer = weakref.finalize(self, _release, buf)
        self._finalizer.atexit = False


class _Packed:
    """What autograd holds for an offloaded tensor: its bytes and how to view them."""

    __slots__ = ("stored", "dtype", "size", "stride")

    def __init__(self, stored: _Stored, dtype: torch.dtype, size: tuple[int, ...],
                 stride: tuple[int, ...]) -> None:
        self.stored = stored
        self.dtype = dtype
        self.size = size
        self.stride = stride


class _Kept:
    """What autograd holds for a tensor left to PyTorch: the tensor (detached, so that an
    output's grad_fn does not hold itself through its hooks) and its version when saved."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor.detach()
        self.version = tensor._version


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive slots in some order."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _bytes_of(storage: Any, device: torch.device) -> torch.Tensor:
    """A 1-D uint8 tensor over a whole storage (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


class SavedTensorOffload:
    """The pack and unpack hooks of :func:`offload_saved_tensors`, and their counters.

    Ownership: each offloaded storage's bytes live in one buffer of ``mgr``, owned by an
    object that autograd holds (through its saved variables).  When autograd drops the last
    of them (after the node that used it ran with ``retain_graph=False``, or when the graph
    is freed), the buffer is freed.  A tensor saved twice (by two ops, or as a view of the
    same storage) shares one buffer while its version is unchanged.

    Streams (cuda): packing copies on torch's current stream in the forward pass, unpacking
    on torch's current stream in the backward pass (the node's stream); each copy goes
    through :func:`tensor_access`, so restores are ordered before it and eviction after it.
    """

    def __init__(self, mgr: BufferManager, min_bytes: int = DEFAULT_MIN_BYTES) -> None:
        if isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 1:
            raise ValueError(f"min_bytes={min_bytes!r} must be an int >= 1")
        self.mgr = mgr
        self.min_bytes = min_bytes
        self.device = torch_device(mgr)
        self._shared: weakref.WeakValueDictionary[int, _Stored] = weakref.WeakValueDictionary()
        self._live: weakref.WeakSet[_Stored] = weakref.WeakSet()   # for release()
        self._lock = threading.Lock()   # counters only: unpack may run on autograd's threads
        self._counts = {"packed": 0, "packed_bytes": 0, "shared": 0, "unpacked": 0,
                        "restored": 0, "restored_bytes": 0,
                        **{f"left_{r}": 0 for r in LEFT_REASONS}}
        self._warned_oom = False

    def stats(self) -> dict[str, int]:
        """Counters: ``packed`` (tensors copied into buffers) and ``packed_bytes``,
        ``shared`` (saves that reused a buffer), ``unpacked``, ``restored`` (unpacks that
        found their buffer evicted) and ``restored_bytes``, and ``left_<reason>`` per
        :data:`LEFT_REASONS`."""
        with self._lock:
            return dict(self._counts)

    def release(self) -> int:
        """Free every buffer these hooks made that autograd still holds; returns how many.

        For a graph that will not be used again but is still referenced: PyTorch keeps the
        nodes that were ready to run when a backward pass failed until the next backward
        pass on that thread.  Unpacking a released tensor raises
        :class:`gpu_backup.BufferFreedError`.  :func:`offload_saved_tensors` calls this when
        an exception leaves its block.
        """
        freed = 0
        for stored in list(self._live):
            if stored._finalizer.detach() is None:
                continue
            try:
                stored.buf.free()
                freed += 1
            except BufferBusyError as e:   # another thread is unpacking it right now
                log.warning("offload_saved_tensors.release: %s", e)
        return freed

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._counts[k] += v

    # --------------------------------------------------------------- policy
    def _why_left(self, t: torch.Tensor) -> str | None:
        if (type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter)) \
                or t.layout != torch.strided or t.is_quantized or t.is_nested \
                or t.is_conj() or t.is_neg():
            return "layout"
        if t.device != self.device:
            return "device"
        nbytes = t.numel() * t.element_size()
        if nbytes < self.min_bytes:
            return "small"
        root = t if t._base is None else t._base
        if isinstance(root, torch.nn.Parameter) or (root.is_leaf and root.requires_grad):
            return "param"
        if t.storage_offset() != 0 or t.untyped_storage().nbytes() != nbytes or not _dense(t):
            return "view"
        return None

    # ---------------------------------------------------------------- hooks
    def pack(self, t: torch.Tensor) -> _Packed | _Kept:
        """The pack hook: copy ``t``'s storage into a buffer, or leave ``t`` to PyTorch."""
        why = self._why_left(t)
        if why is not None:
            self._count(**{f"left_{why}": 1})
            return _Kept(t)
        storage = t.untyped_storage()
        key = id(storage)
        stored = self._shared.get(key)
        if stored is not None and stored.storage() is storage and stored.version == t._version:
            self._count(shared=1)
        else:
            stored = self._store(storage, t._version)
            if stored is None:
                self._count(left_oom=1)
                return _Kept(t)
            self._shared[key] = stored
            self._live.add(stored)
            self._count(packed=1, packed_bytes=stored.nbytes)
        return _Packed(stored, t.dtype, tuple(t.shape), t.stride())

    def _store(self, storage: Any, version: int) -> _Stored | None:
        nbytes = storage.nbytes()
        try:
            buf = self.mgr.alloc(nbytes)
        except OutOfDeviceMemory as e:
            if not self._warned_oom:
                self._warned_oom = True
                log.warning("offload_saved_tensors: a %d B saved tensor stays with PyTorch: %s",
                            nbytes, e)
            return None
        try:
            with torch.no_grad(), tensor_access(buf, torch.uint8, nbytes, "w") as dst:
                dst.copy_(_bytes_of(storage, self.device))
        except BaseException:
            buf.free()
            raise
        return _Stored(buf, storage, version)

    def unpack(self, p: _Packed | _Kept) -> torch.Tensor:
        """The unpack hook: a tensor equal to the one packed, bit for bit, with its dtype,
        shape and strides (a fresh copy out of the buffer, restored first if evicted; the
        buffer stays with autograd's reference).  A tensor left to PyTorch comes back as it
        was, or raises as autograd does if it was modified in place since it was saved."""
        if isinstance(p, _Kept):
            t = p.tensor
            if t._version != p.version:
                raise RuntimeError(
                    f"one of the variables needed for gradient computation has been modified "
                    f"by an inplace operation: [{t.type()} {list(t.shape)}] is at version "
                    f"{t._version}; expected version {p.version} instead (a saved tensor that "
                    f"offload_saved_tensors left to PyTorch)")
            return t
        stored = p.stored
        if stored.buf.freed:
            raise BufferFreedError(
                f"a saved {p.dtype} tensor of shape {list(p.size)} was released by "
                f"offload_saved_tensors (release(), or an exception left its block): this "
                f"graph cannot run backward any more")
        evicted = stored.buf.state is not Residency.RESIDENT
        with torch.no_grad():
            out = torch.empty_strided(p.size, p.stride, dtype=p.dtype, device=self.device)
            with tensor_access(stored.buf, torch.uint8, stored.nbytes, "r") as src:
                _bytes_of(out.untyped_storage(), self.device).copy_(src)
        self._count(unpacked=1, restored=int(evicted), restored_bytes=stored.nbytes * evicted)
        return out


@contextlib.contextmanager
def offload_saved_tensors(mgr: BufferManager, *, min_bytes: int = DEFAULT_MIN_BYTES
                          ) -> Iterator[SavedTensorOffload]:
    """Keep the tensors autograd saves inside the block in buffers of ``mgr``.

    Each saved tensor of at least ``min_bytes`` on the manager's device (``cuda:N``, or CPU
    tensors on the host backend) is copied into a buffer, device to device on torch's
    current stream; PyTorch then frees the original as it would have without a saved
    reference.  The buffer stays on the device unless the manager needs room (its
    ``device_limit``, LRU: the oldest saved tensors, needed last in the backward pass, go
    first); unpacking restores it only if it was evicted, and hands back a copy with the
    same dtype, shape, strides and bytes.  Tensors left to PyTorch are listed in
    :data:`LEFT_REASONS`; a manager that cannot make room leaves the tensor to PyTorch too
    (logged once) rather than fail the forward pass.

    Lifetimes: a buffer is freed as soon as autograd drops its saved variable (after the
    node ran, unless ``retain_graph=True``; otherwise when the graph is freed).  A copy is taken when the tensor is
    saved, so an in-place change to an offloaded tensor afterwards does not reach its
    gradient (the contract of saved-tensor hooks); for a tensor left to PyTorch such a
    change raises as autograd does.

    An exception that leaves the block frees every buffer it made (the graph is being
    abandoned); put ``backward()`` inside the block to have that cover it too.  For a
    backward outside the block that fails, call ``release()`` on the yielded object: PyTorch
    itself keeps part of a failed graph (the nodes that were ready to run) until the next
    backward pass on that thread.

    Yields the :class:`SavedTensorOffload` whose hooks are installed (``stats()``,
    ``release()``).  The hooks apply to the forward pass run inside the block, on this
    thread; backward may run inside or after it.
    """
    hooks = SavedTensorOffload(mgr, min_bytes)
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        try:
            yield hooks
        except BaseException:
            hooks.release()
            raise


def saved_bytes(fn: Any, *args: Any, min_bytes: int = 0, **kwargs: Any) -> int:
    """Bytes of the tensors autograd saves while running ``fn(*args, **kwargs)`` (each of
    at least ``min_bytes``): what :func:`offload_saved_tensors` would take into buffers, to
    size a ``device_limit``.  Runs ``fn`` once; nothing is kept."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        n = t.numel() * t.element_size()
        total += n if n >= min_bytes else 0
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    return total

"""One exception hierarchy for the library.

Everything the library raises on purpose derives from :class:`GpuBackupError`.
Out-of-memory conditions also derive from :class:`MemoryError`, usage errors
from the matching builtin (``ValueError``, ``RuntimeError``), so callers can
catch them either way.  Messages carry the numbers involved.
"""

from __future__ import annotations

__all__ = [
    "GpuBackupError",
    "ClosedError",
    "InvalidHandleError",
    "StoreFullError",
    "NoDeviceError",
    "OutOfDeviceMemory",
    "BufferPurgedError",
    "BufferFreedError",
    "BufferBusyError",
    "CopyError",
    "ForkedError",
    "HostFallbackWarning",
]


class GpuBackupError(Exception):
    """Root of every error the library raises on purpose."""


class ClosedError(GpuBackupError, RuntimeError):
    """An object was used after ``close()`` (a usage error)."""


class InvalidHandleError(GpuBackupError, ValueError):
    """A store handle is out of range, was never handed out, or was already dropped."""


class StoreFullError(GpuBackupError, MemoryError):
    """The host store cannot take the pages: its cap, host memory or disk is exhausted.

    Raised before anything is written: no page of the request is stored.
    """


class NoDeviceError(GpuBackupError, RuntimeError):
    """No usable CUDA device or driver; carries the driver's own message."""


class OutOfDeviceMemory(GpuBackupError, MemoryError):
    """A device allocation failed even after reclaim."""


class BufferPurgedError(GpuBackupError):
    """A purgeable buffer was discarded under memory pressure; its contents are gone."""


class BufferFreedError(ClosedError):
    """A buffer was used after ``free()``."""


class BufferBusyError(GpuBackupError, RuntimeError):
    """The operation needs a buffer that is in use (inside ``access()`` or locked)."""


class CopyError(GpuBackupError):
    """A copy between device, staging and store failed or was interrupted.

    The state it leaves is consistent: every page is on the device or complete in the store.
    """


class ForkedError(GpuBackupError, RuntimeError):
    """An object made before ``fork()`` was used in the child.  The child must make its own:
    an inherited store shares its memory with the parent, and an inherited manager has no
    copy threads."""


class HostFallbackWarning(UserWarning):
    """``device="auto"`` found no usable GPU and chose the host backend, which emulates
    device memory in host RAM: its figures are not GPU figures.  Issued once per process,
    with the reason; ``device="host"`` asks for the emulator without it."""

"""gpu_backup: hold more GPU buffers than the GPU has.

Buffer objects live in device memory; under pressure a shrinker evicts idle ones
page by page through a pinned staging ring into a swappable host store (a memfd),
and they are restored, bit-exact, when accessed again.
"""

from __future__ import annotations

from .errors import (
    BufferBusyError,
    BufferFreedError,
    BufferPurgedError,
    ClosedError,
    CopyError,
    ForkedError,
    GpuBackupError,
    HostFallbackWarning,
    InvalidHandleError,
    NoDeviceError,
    OutOfDeviceMemory,
    StoreFullError,
)
from .buffer import Buffer, Residency
from .manager import BufferManager
from .shrinker import SHRINK_EMPTY, SHRINK_STOP, Shrinker
from .staging import Staging
from .store import PAGE_SIZE, FileStore, PageStore, ShmemStore, TieredStore

__version__ = "0.1.0"

__all__ = [
    "PAGE_SIZE",
    "SHRINK_EMPTY",
    "SHRINK_STOP",
    "Buffer",
    "BufferBusyError",
    "BufferFreedError",
    "BufferManager",
    "BufferPurgedError",
    "ClosedError",
    "CopyError",
    "FileStore",
    "ForkedError",
    "GpuBackupError",
    "HostFallbackWarning",
    "InvalidHandleError",
    "NoDeviceError",
    "OutOfDeviceMemory",
    "PageStore",
    "Residency",
    "ShmemStore",
    "Shrinker",
    "Staging",
    "StoreFullError",
    "TieredStore",
    "__version__",
]

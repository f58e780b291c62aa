"""Host page stores: where evicted device pages live."""

from __future__ import annotations

from ._base import PAGE_SIZE
from ._checks import StoreSetupError
from .file import FileStore
from .protocol import PageStore
from .shmem import ShmemStore
from .tiered import TieredStore

__all__ = ["PAGE_SIZE", "FileStore", "PageStore", "ShmemStore", "StoreSetupError", "TieredStore"]

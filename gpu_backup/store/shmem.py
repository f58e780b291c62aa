"""``ShmemStore``: pages in a memfd, the user-space counterpart of the kernel's ``ttm_backup``."""

from __future__ import annotations

import os

from .._os import host_memory
from ._base import PAGE_SIZE, MappedStore

__all__ = ["ShmemStore"]

_DEFAULT_SLACK = 64 << 20


class ShmemStore(MappedStore):
    """A swappable host page store: a memfd mapped shared, never pinned or mlocked.

    Parameters
    ----------
    capacity
        Most bytes the store may hold.  ``None``: host RAM plus swap.  The memfd is
        sized sparsely, so capacity costs address space, not memory.
    page_size
        Bytes per page; a power of two, at least the OS page.
    warm_slack
        Bytes of dropped pages kept faulted in for reuse (default 64 MiB).  First
        touch of fresh memfd pages costs 10-50x a warm copy; the slack avoids it for
        steady eviction traffic.  Released by ``trim()`` and when host memory runs low.
    host_reserve
        Bytes of host memory (RAM + swap) the store leaves to everything else: a
        ``backup`` that would need more raises ``StoreFullError``.  Default: 5% of
        RAM, at most 1 GiB.
    threads
        Copy threads for batches of 32 MiB or more.
    name
        Name of the memfd as ``/proc/<pid>/fd`` shows it.

    The store owns its memfd and mapping; ``close()`` (or the context manager, or
    garbage collection as a safety net) releases them once.
    """

    kind = "shmem"

    def __init__(self, capacity: int | None = None, *, page_size: int = PAGE_SIZE,
                 warm_slack: int = _DEFAULT_SLACK, host_reserve: int | None = None,
                 threads: int | None = None, name: str = "gpu_backup") -> None:
        mem = host_memory.read(fresh=True)
        if capacity is None:
            capacity = mem["total"] + mem["swap_total"]
        elif capacity <= 0:
            raise ValueError(f"capacity={capacity:,} must be > 0 bytes")
        if host_reserve is None:
            host_reserve = min(1 << 30, mem["total"] // 20)
        if host_reserve < 0:
            raise ValueError(f"{host_reserve=} must be >= 0")
        self.host_reserve = int(host_reserve)
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        super().__init__(fd, capacity, page_size=page_size, warm_slack=warm_slack, threads=threads)

    def _backing_name(self) -> str:
        return "host memory and swap"

    def _backing_avail(self) -> int:
        mem = host_memory.read()
        return max(0, mem["available"] + mem["swap_free"] - self.host_reserve)

    def _under_pressure(self) -> bool:
        mem = host_memory.read()
        return mem["available"] + mem["swap_free"] < 2 * self.host_reserve

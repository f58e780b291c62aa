"""``ShmemStore``: pages in a memfd, the user-space counterpart of the kernel's ``ttm_backup``."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .. import _os
from ._base import DEFAULT_DECAY, PAGE_SIZE, MappedStore
from ._checks import StoreSetupError, check_count, check_store_args

__all__ = ["ShmemStore"]


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
        Most bytes of dropped pages the free-page pool keeps faulted in for reuse.
        ``None`` (default): half of the host memory this process may use (the cgroup's
        limit where there is one), like the kernel's TTM page pool.  First touch of
        fresh memfd pages costs several times a warm copy; the pool avoids it for
        steady eviction traffic.  The pool gives its pages back when host memory runs
        low (``watermark``), when they sat unused for ``warm_decay`` seconds, and on
        ``trim()``.
    warm_floor
        Pool bytes kept through idle decay and memory pressure (default 0).
    warm_decay
        Seconds a pool page may sit unused before a background pass releases it.
    watermark
        Bytes of available host RAM below which the pool shrinks to its floor and
        dropped pages go straight back to the OS.  Default: twice ``host_reserve``, at
        least 5% of RAM, at most 2 GiB.
    host_reserve
        Bytes of host memory (RAM + swap) the store leaves to everything else: a
        ``backup`` that would need more raises ``StoreFullError``.  Default: 5% of
        RAM, at most 1 GiB.
    threads
        Copy threads for batches of 32 MiB or more.
    prefault
        Bytes to fault in ahead of need, in the background (the constructor does not
        wait): for a store the caller knows it will fill.  They become the pool's floor.
        Backups made meanwhile are correct; they wait only for a step in flight when
        they need its pages.
    name
        Name of the memfd as ``/proc/<pid>/fd`` shows it.
    host_memory, clock
        The host-memory reader and monotonic clock the pool consults (tests inject
        their own to simulate pressure and time).
    background
        Run the pool maintainer thread (default True).  With False the pool changes
        only in the caller's calls (``reclaim()`` runs a pass; ``prefault`` then runs
        in the constructor).

    The store owns its memfd, mapping, copy threads and pool maintainer thread;
    ``close()`` (or the context manager, or garbage collection as a safety net)
    releases them once.
    """

    kind = "shmem"

    def __init__(self, capacity: int | None = None, *, page_size: int = PAGE_SIZE,
                 warm_slack: int | None = None, warm_floor: int = 0,
                 warm_decay: float = DEFAULT_DECAY, watermark: int | None = None,
                 host_reserve: int | None = None, threads: int | None = None,
                 prefault: int = 0, name: str = "gpu_backup", host_memory: Any = None,
                 clock: Callable[[], float] | None = None, background: bool = True) -> None:
        check_store_args(page_size=page_size, warm_slack=warm_slack, warm_floor=warm_floor,
                         warm_decay=warm_decay, threads=threads, watermark=watermark)
        mem_reader = _os.host_memory if host_memory is None else host_memory
        mem = mem_reader.read(fresh=True)
        if capacity is None:
            capacity = mem["total"] + mem["swap_total"]
        elif check_count("capacity", capacity) <= 0:
            raise ValueError(f"capacity={capacity:,} must be > 0 bytes")
        if host_reserve is None:
            host_reserve = min(1 << 30, mem["total"] // 20)
        self.host_reserve = check_count("host_reserve", host_reserve)
        if watermark is None:
            watermark = max(2 * self.host_reserve, min(2 << 30, mem["total"] // 20))
        if warm_slack is None:
            warm_slack = mem["total"] // 2
        prefault = check_count("prefault", prefault)
        warm_floor = max(check_count("warm_floor", warm_floor), prefault)
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        try:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
        except OSError as e:
            raise StoreSetupError(e.errno, f"cannot create memfd {name!r} for a store of "
                                           f"{capacity:,} B: {e.strerror}") from e
        super().__init__(fd, capacity, page_size=page_size, warm_slack=warm_slack,
                         threads=threads, warm_floor=warm_floor, warm_decay=warm_decay,
                         watermark=watermark, host_memory=mem_reader, clock=clock,
                         background=background, what=f"memfd {name!r}")
        if prefault and not background:
            self.prefault(prefault)
        elif prefault:
            with self._lock:
                self._prefault_left = -(-min(prefault, self.capacity) // self.page_size)
                self._start_maintainer()
                self._holder.maintainer.wake()  # type: ignore[union-attr]

    def _backing_name(self) -> str:
        return "host memory and swap"

    def _backing_avail(self) -> int:
        mem = self._mem.read()
        return max(0, mem["available"] + mem["swap_free"] - self.host_reserve)

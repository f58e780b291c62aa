"""The host side's own limits on this machine, measured: how fast bytes go between a
staging-like buffer and a memfd, with one thread and with several.

Eviction copies each piece twice: device -> pinned slot (the link) and slot -> memfd store
(a host copy on the staging threads).  Restore does the reverse.  Whichever is slower
bounds the pipeline, so a user who sees evict at half the link is told whether the link
or the host copies are the cause.  Measured here:

``write_1``, ``write_n``
    Copy from a touched buffer into *warm* (already faulted) memfd pages, on one thread
    and split over N threads (N = the staging threads default, and ``os.cpu_count()``).
``read_1``, ``read_n``
    The reverse: warm memfd pages into a touched buffer (restore's host side).
``first_touch``
    Copy into *fresh* memfd pages on one thread: the kernel allocates and zeroes each page
    on first write.  A store that is not warm evicts at most this fast.

The source buffer is anonymous memory touched beforehand; pinned memory (page-locked)
copies at the same speed on the CPU side.  numpy releases the GIL while it copies, so
threads run in parallel.  Each figure is the best of a few repeats (GB/s = 1e9 B/s).
Nothing here needs a GPU.
"""

from __future__ import annotations

import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

__all__ = ["QUICK_BYTES", "BENCH_BYTES", "measure", "bounds"]

QUICK_BYTES = 32 << 20
"""Per measurement in ``gpu-backup info``: the whole probe stays well under a second."""
BENCH_BYTES = 256 << 20
"""Most per measurement in ``gpu-backup bench`` (it uses 4x its largest size, from 32 MiB):
larger than CPU caches, so the copies run at memory speed as the pipeline's do."""


def _memfd(nbytes: int) -> tuple[int, mmap.mmap, np.ndarray]:
    fd = os.memfd_create("gpu_backup-hostlimits", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd, mm, np.frombuffer(mm, np.uint8)


def _close(fd: int, mm: mmap.mmap) -> None:
    mm.close()
    os.close(fd)


def _split_copy(pool: ThreadPoolExecutor | None, dst: np.ndarray, src: np.ndarray,
                n: int) -> None:
    if pool is None or n == 1:
        np.copyto(dst, src)
        return
    edges = np.linspace(0, src.size, n + 1).astype(np.int64) // 4096 * 4096
    edges[-1] = src.size
    futs = [pool.submit(np.copyto, dst[a:b], src[a:b]) for a, b in zip(edges[:-1], edges[1:])]
    for f in futs:
        f.result()


def _best_gbps(fn: Any, nbytes: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def measure(nbytes: int = QUICK_BYTES, threads: int | None = None,
            repeats: int = 3) -> dict[str, Any]:
    """The host-side limits (GB/s) with ``nbytes`` per copy.  ``threads``: the N of
    ``write_n``/``read_n`` (default: the staging threads default); ``write_cpus`` and
    ``read_cpus`` use ``os.cpu_count()`` threads."""
    from ..staging import Staging

    nbytes = max(4096, nbytes // 4096 * 4096)
    n_staging = threads or Staging().threads
    n_cpus = os.cpu_count() or 1
    src = np.empty(nbytes, np.uint8)
    src.fill(7)                                       # touched, as a staging slot is
    buf = np.empty(nbytes, np.uint8)
    buf.fill(3)
    out: dict[str, Any] = {"bytes": nbytes, "threads": n_staging, "cpus": n_cpus,
                           "repeats": repeats, "gbps": "1e9 bytes per second, best of repeats"}
    fd, mm, warm = _memfd(nbytes)
    try:
        warm.fill(0)                                  # fault every page in: warm
        with ThreadPoolExecutor(max(n_staging, n_cpus)) as pool:
            for key, n in (("1", 1), ("n", n_staging), ("cpus", n_cpus)):
                out[f"write_{key}"] = _best_gbps(lambda n=n: _split_copy(pool, warm, src, n),
                                                 nbytes, repeats)
                out[f"read_{key}"] = _best_gbps(lambda n=n: _split_copy(pool, buf, warm, n),
                                                nbytes, repeats)
    finally:
        del warm
        _close(fd, mm)
    times = []
    for _ in range(repeats):
        fd, mm, fresh = _memfd(nbytes)
        try:
            t0 = time.perf_counter()
            np.copyto(fresh, src)
            times.append(time.perf_counter() - t0)
        finally:
            del fresh
            _close(fd, mm)
    out["first_touch"] = nbytes / min(times) / 1e9
    return out


def bounds(limits: dict[str, Any], link_d2h: float | None,
           link_h2d: float | None) -> dict[str, dict[str, Any]]:
    """What bounds each gpu_backup operation: the slower of the link and the host copy.

    ``evict`` (warm store): link d2h vs ``write_n``; ``evict_first`` (fresh store): link
    d2h vs ``first_touch``; ``restore``: link h2d vs ``read_n``.  Each entry gives
    ``bound_gbps``, ``bound_by`` (``"link"`` or ``"host"``), and both figures."""
    out = {}
    for op, link, key, what in (
            ("evict", link_d2h, "write_n", f"host copy into warm memfd pages, "
                                           f"{limits['threads']} threads"),
            ("evict_first", link_d2h, "first_touch", "first touch of fresh memfd pages"),
            ("restore", link_h2d, "read_n", f"host copy out of memfd pages, "
                                            f"{limits['threads']} threads")):
        host = float(limits[key])
        if link is None:
            out[op] = {"bound_gbps": host, "bound_by": "host", "host_gbps": host,
                       "link_gbps": None, "host_limit": key, "what": what}
            continue
        by = "host" if host < link else "link"
        out[op] = {"bound_gbps": min(host, link), "bound_by": by, "host_gbps": host,
                   "link_gbps": link, "host_limit": key,
                   "what": what if by == "host" else "the link"}
    return out

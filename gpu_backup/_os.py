"""Thin, checked wrappers over the Linux calls the stores need.

Mappings are made with libc's ``mmap`` through ctypes rather than Python's
``mmap`` module: a Python mmap cannot be closed while any buffer export (a numpy
view, or a stale traceback holding one) is alive, which would make release
non-deterministic.  Here the owner decides when ``munmap`` happens; it must
make sure no copy is in flight first (the stores wait for in-flight operations).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import threading
import time

import numpy as np

from ._interrupts import deferred_interrupt

__all__ = [
    "OS_PAGE_SIZE",
    "MADV_REMOVE",
    "MADV_PAGEOUT",
    "MADV_POPULATE_WRITE",
    "Mapping",
    "HostMemory",
    "host_memory",
]

OS_PAGE_SIZE = mmap.PAGESIZE
MADV_REMOVE = 9
MADV_PAGEOUT = 21
MADV_POPULATE_WRITE = 23

_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_SHARED = mmap.MAP_SHARED
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.msync.restype = ctypes.c_int
_libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MS_SYNC = 4


class Mapping:
    """A shared read/write mapping of ``length`` bytes of ``fd``; owner of the mapping only.

    ``view`` is a uint8 numpy array over the mapping.  It does not keep the
    mapping alive: after :meth:`unmap` it must not be touched, which the store
    guarantees by waiting for in-flight copies before unmapping.
    """

    __slots__ = ("addr", "length", "view")

    def __init__(self, fd: int, length: int) -> None:
        addr = _libc.mmap(None, length, _PROT_RW, _MAP_SHARED, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of {length:,} B failed: {os.strerror(err)}")
        self.addr: int = addr
        self.length = length
        self.view = np.ctypeslib.as_array((ctypes.c_uint8 * length).from_address(addr))

    def madvise(self, advice: int, offset: int, length: int) -> None:
        """``madvise`` on ``[offset, offset+length)``; raises ``OSError`` with errno."""
        if length <= 0:
            return
        self._check(offset, length)
        if _libc.madvise(self.addr + offset, length, advice) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"madvise({advice}) of {length:,} B at +{offset:,}: {os.strerror(err)}")

    def sync(self, offset: int, length: int) -> None:
        """``msync(MS_SYNC)``: write ``[offset, offset+length)`` back to the file now."""
        self._check(offset, length)
        if _libc.msync(self.addr + offset, length, _MS_SYNC) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"msync of {length:,} B at +{offset:,}: {os.strerror(err)}")

    def _check(self, offset: int, length: int) -> None:
        if not self.addr:
            raise ValueError("mapping is unmapped")
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(f"range {offset:,}+{length:,} outside a {self.length:,} B mapping")

    def unmap(self) -> None:
        """Unmap once; later calls do nothing."""
        addr, self.addr = self.addr, 0
        self.view = None
        if addr:
            _libc.munmap(addr, self.length)


def advice_supported(err: OSError) -> bool:
    """False when an ``madvise`` error means the kernel lacks that advice."""
    return err.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def _read_kib(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    with deferred_interrupt(), open(path, "rb") as f:
        for line in f:
            name, _, rest = line.partition(b":")
            key = name.decode()
            if key in keys:
                out[key] = int(rest.split()[0]) * 1024
    return out


def _cgroup_dir() -> str | None:
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    path = "/sys/fs/cgroup" + line[3:].strip()
                    return path if os.path.exists(os.path.join(path, "memory.max")) else None
    except OSError:
        return None
    return None


def _read_int(path: str) -> int | None:
    try:
        with deferred_interrupt(), open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


class HostMemory:
    """Host memory and swap, as the kernel and this process's cgroup (v2) report them.

    Readings are cached for ``ttl`` seconds so hot paths may ask often.  Anything with
    the same ``read(fresh=False) -> dict`` method can stand in for it (the stores take
    a reader as a parameter).
    """

    __slots__ = ("ttl", "_lock", "_at", "_value", "_cgroup")

    def __init__(self, ttl: float = 0.05) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._at = -1.0
        self._value: dict[str, int] = {}
        self._cgroup = _cgroup_dir()

    def read(self, *, fresh: bool = False) -> dict[str, int]:
        """``total``, ``available`` (RAM the process may still take), ``swap_free``, ``swap_total``."""
        now = time.monotonic()
        with self._lock:
            if fresh or now - self._at > self.ttl:
                m = _read_kib("/proc/meminfo", ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree"))
                avail = m.get("MemAvailable", 0)
                total = m.get("MemTotal", 0)
                if self._cgroup is not None:
                    limit = _read_int(os.path.join(self._cgroup, "memory.max"))
                    used = _read_int(os.path.join(self._cgroup, "memory.current"))
                    if limit is not None and used is not None:
                        avail = min(avail, max(0, limit - used))
                        total = min(total, limit)
                self._value = {
                    "total": total,
                    "available": avail,
                    "swap_total": m.get("SwapTotal", 0),
                    "swap_free": m.get("SwapFree", 0),
                }
                self._at = now
            return dict(self._value)


    def _after_fork_in_child(self) -> None:
        # A thread of the parent may have held the lock at fork(): the child starts afresh.
        self._lock = threading.Lock()
        self._at = -1.0


host_memory = HostMemory()
"""The process's reader.  Stores take a reader as a parameter, so tests can pass their own."""

os.register_at_fork(after_in_child=host_memory._after_fork_in_child)

"""``FileStore``: pages in a file on disk, the "swap out to a user-provided fd" tier."""

from __future__ import annotations

import os
import stat
from typing import Union

from collections.abc import Callable

from .._os import MADV_PAGEOUT
from ._base import DEFAULT_DECAY, PAGE_SIZE, MappedStore
from ._checks import StoreSetupError, check_count, check_store_args

__all__ = ["FileStore"]

PathOrFd = Union[str, "os.PathLike[str]", int]


class FileStore(MappedStore):
    """A page store over a file on disk, with the same interface as :class:`ShmemStore`.

    Parameters
    ----------
    path_or_fd
        A directory: the store makes an anonymous (already unlinked) file in it.
        A file path: opened (created if missing) and truncated; the file is left in
        place on close.  An int: a file descriptor, which the store duplicates, so
        the caller keeps (and closes) their own; its contents are discarded.
    capacity
        Most bytes the store may hold.  ``None``: the file system's free space now.
    page_size, threads, warm_decay, clock, background
        As for :class:`ShmemStore`.
    warm_slack, warm_floor
        As for :class:`ShmemStore`, for disk blocks kept allocated for reuse (default
        64 MiB).  There is no memory-pressure signal for a file on disk: pool blocks go
        back when idle for ``warm_decay`` seconds or on ``trim()``.

    ``writeback=True`` flushes the pages to disk (``msync``) and asks the kernel to
    drop them from the page cache.
    """

    kind = "file"

    def __init__(self, path_or_fd: PathOrFd, capacity: int | None = None, *,
                 page_size: int = PAGE_SIZE, warm_slack: int = 64 << 20, warm_floor: int = 0,
                 warm_decay: float = DEFAULT_DECAY, threads: int | None = None,
                 clock: Callable[[], float] | None = None, background: bool = True) -> None:
        if isinstance(path_or_fd, bool) or not isinstance(path_or_fd, (int, str, os.PathLike)):
            raise TypeError(f"path_or_fd must be a path or an int fd, got {type(path_or_fd).__name__}")
        check_store_args(page_size=page_size, warm_slack=warm_slack, warm_floor=warm_floor,
                         warm_decay=warm_decay, threads=threads)
        if capacity is not None and check_count("capacity", capacity) <= 0:
            raise ValueError(f"capacity={capacity:,} must be > 0 bytes")
        what = f"fd {path_or_fd}" if isinstance(path_or_fd, int) else repr(os.fspath(path_or_fd))
        try:
            if isinstance(path_or_fd, int):
                fd = os.dup(path_or_fd)
                self.path = None
            else:
                path = os.fspath(path_or_fd)
                if os.path.isdir(path):
                    fd = os.open(path, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
                    self.path = None
                else:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                    self.path = path
        except OSError as e:
            raise StoreSetupError(e.errno, f"FileStore cannot open {what}: {e.strerror}") from e
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError(f"FileStore needs a regular file, got {path_or_fd!r}")
            os.ftruncate(fd, 0)
            if capacity is None:
                capacity = _fs_free(fd)
        except OSError as e:
            os.close(fd)
            raise StoreSetupError(e.errno, f"FileStore cannot truncate or size {what}: "
                                           f"{e.strerror}") from e
        except BaseException:
            os.close(fd)
            raise
        super().__init__(fd, capacity, page_size=page_size, warm_slack=warm_slack,
                         threads=threads, warm_floor=warm_floor, warm_decay=warm_decay,
                         clock=clock, background=background, what=f"file {what}")

    def _backing_name(self) -> str:
        return "disk space"

    def _backing_avail(self) -> int:
        return _fs_free(self._holder.fd)

    def _writeback(self, offset: int, length: int) -> None:
        mapping = self._holder.mapping
        assert mapping is not None
        mapping.sync(offset, length)
        mapping.madvise(MADV_PAGEOUT, offset, length)


def _fs_free(fd: int) -> int:
    st = os.fstatvfs(fd)
    return st.f_bavail * st.f_frsize


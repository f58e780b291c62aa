"""The host backend: device memory emulated in host RAM, with the CUDA backend's
asynchronous contract (streams are worker threads that run their work in order,
events are real locks that the stream releases).

It lets the whole library run, and be tested, on machines without a GPU.  Its
numbers are host numbers and are always labelled ``host``.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .._interrupts import deferred_interrupt
from .._os import host_memory
from ..errors import ClosedError
from .protocol import DeviceOOM

__all__ = ["HostBackend", "HostEvent", "HostStream", "ImmediateStream"]


class HostEvent:
    """Completes when the stream reaches the point where it was recorded.

    A plain lock, held until the event completes, rather than a ``threading.Event``: a
    waiter passes through it with the lock's own C-level ``with``, which a Ctrl-C cannot
    leave holding anything (an ``Event``'s Python-level condition can keep its lock for
    good when the interrupt lands right after taking it, and every later wait hangs)."""

    __slots__ = ("_gate", "_done", "error")

    def __init__(self, done: bool = False) -> None:
        self._gate = threading.Lock()
        self._done = done
        self.error: BaseException | None = None
        if not done:
            self._gate.acquire()     # released once, by the stream, when it gets here

    @property
    def done(self) -> bool:
        return self._done

    def synchronize(self) -> None:
        """Wait; raise what failed on the stream before this point, as CUDA would."""
        if not self._done:
            with self._gate:
                pass
        if self.error is not None:
            raise RuntimeError(f"work on a host stream failed: {self.error!r}") from self.error

    def _set(self) -> None:
        self._done = True
        self._gate.release()


class HostStream:
    """An in-order work queue run by one thread: the host analogue of a CUDA stream.

    Work that raises is recorded on the next event (``event.error``) and the stream
    goes on, as a CUDA stream reports an error at the next synchronisation point.
    """

    def __init__(self, name: str = "gpu_backup-host-stream") -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._failed: list[BaseException] = []  # errors since the last event
        # The thread holds the queue, not the stream: a dropped stream is finalized and
        # its thread told to stop.
        self._thread = threading.Thread(target=_serve, args=(self._queue, self._failed),
                                        name=name, daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, self._queue.put, None)

    def launch(self, fn: Callable[[], None]) -> None:
        """Enqueue ``fn`` (a "kernel": it runs after everything enqueued before it)."""
        self._put(fn)

    def _put(self, fn: Callable[[], None]) -> None:
        if not self._finalizer.alive:   # its thread is gone: the work would never run
            raise ClosedError("host stream is closed")
        self._queue.put(fn)

    def record(self) -> HostEvent:
        ev = HostEvent()

        failed = self._failed

        def mark() -> None:
            if failed:
                ev.error = failed[0]
                failed.clear()
            ev._set()

        self._put(mark)
        return ev

    def wait_event(self, event: Any) -> None:
        if not event.done:
            self._put(event.synchronize)

    def synchronize(self) -> None:
        self.record().synchronize()

    def close(self) -> None:
        """Finish queued work and stop the thread.  Idempotent."""
        if self._finalizer.alive:
            self._finalizer()
            if self._thread is not threading.current_thread():
                self._thread.join()


def _serve(work_queue: queue.SimpleQueue[Callable[[], None] | None],
           failed: list[BaseException]) -> None:
    while True:
        work = work_queue.get()
        if work is None:
            return
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - surfaced through the next event
            failed.append(e)


class ImmediateStream:
    """The caller's own thread as a stream: work is already done when it is enqueued."""

    def launch(self, fn: Callable[[], None]) -> None:
        fn()

    def record(self) -> HostEvent:
        return HostEvent(done=True)

    def wait_event(self, event: Any) -> None:
        event.synchronize()

    def synchronize(self) -> None:
        pass


class HostBackend:
    """Device memory in host RAM.  ``capacity`` emulates the device's size (default: a
    quarter of host RAM); allocations past it fail as a device OOM would.  ``device_id``
    is the GPU number it stands for: managers on 0 and 1 emulate two devices, each with
    its own memory, streams and staging.

    Freed blocks are kept for reuse, as CuPy's pool keeps device blocks (size-bucketed,
    at most ``cache_limit`` bytes, dropped first when an allocation would not fit and on
    ``close()``), so that host figures measure the pipeline, not the first touch of
    fresh anonymous memory on every restore.  Two copy streams, one per direction.
    """

    name = "host"

    def __init__(self, reason: str = "requested", capacity: int | None = None,
                 device_id: int = 0, cache_limit: int | None = None) -> None:
        if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
            raise ValueError(f"{device_id=} must be an int >= 0")
        self.reason = reason
        self.device_id = device_id
        total = host_memory.read()["total"]
        self.capacity = int(capacity) if capacity is not None else total // 4
        self.cache_limit = self.capacity // 2 if cache_limit is None else int(cache_limit)
        self.device_name = "host (device memory emulated in RAM)"
        if device_id:
            self.device_name = f"host device {device_id} (device memory emulated in RAM)"
        # Live blocks: id(weak reference) -> (the reference, bucket size, raw block).  A
        # block's release is queued by its weak reference's callback, ``deque.append`` (C
        # code: no KeyboardInterrupt can cut it short, as it could a Python finalizer), and
        # accounted under the lock by the next allocation or reading.
        self._live: dict[int, tuple[weakref.ref[np.ndarray], int, np.ndarray]] = {}
        self._dead: deque[weakref.ref[np.ndarray]] = deque()
        self._used = 0
        self._cache: dict[int, list[np.ndarray]] = {}   # block size -> free raw blocks
        self._cached = 0
        self._lock = threading.RLock()
        self._open = True
        self.d2h_stream = HostStream("gpu_backup-host-d2h")
        self.h2d_stream = HostStream("gpu_backup-host-h2d")
        self.copy_stream = self.d2h_stream    # the link-measuring benchmarks' stream
        self._immediate = ImmediateStream()

    def __repr__(self) -> str:
        return f"<HostBackend: {self.reason}>"

    # memory
    def alloc(self, nbytes: int) -> np.ndarray:
        """A block of ``nbytes``: a cached one of the same bucket, or fresh.  The returned
        array (and every view of it) keeps the block; when the last is gone, the block goes
        back to the cache."""
        size = _bucket(nbytes)
        with self._lock:
            self._collect_locked()
            if self._used + size > self.capacity:
                raise DeviceOOM(
                    f"host device emulation: {nbytes:,} B requested, "
                    f"{self.capacity - self._used:,} B of {self.capacity:,} B free")
            blocks = self._cache.get(size)
            if blocks:
                raw = blocks.pop()
                self._cached -= size
            else:
                self._trim_locked(self.capacity - self._used - size - self._cached)
                raw = np.empty(size, np.uint8)
            with deferred_interrupt():      # the block and its accounting in one step
                mem = np.frombuffer(memoryview(raw)[:nbytes], np.uint8)  # views' base: mem
                ref = weakref.ref(mem, self._dead.append)
                self._live[id(ref)] = (ref, size, raw)
                self._used += size
        return mem

    def _collect_locked(self) -> None:
        """Account the blocks whose arrays are gone: back to the cache (up to
        ``cache_limit``), or to the system.  Caller holds the lock."""
        with deferred_interrupt():
            while self._dead:
                ref = self._dead.popleft()
                entry = self._live.pop(id(ref), None)
                if entry is None:
                    continue
                _, size, raw = entry
                self._used -= size
                if self._open and self._cached + size <= self.cache_limit:
                    self._cache.setdefault(size, []).append(raw)
                    self._cached += size

    def _trim_locked(self, room: int) -> None:
        """Drop cached blocks until they fit in ``room`` bytes (largest first)."""
        for size in sorted(self._cache, reverse=True):
            blocks = self._cache[size]
            while blocks and self._cached > max(room, 0):
                blocks.pop()
                self._cached -= size
            if not blocks:
                del self._cache[size]

    @property
    def allocated_bytes(self) -> int:
        """Bytes of emulated device memory held by live allocations now."""
        with self._lock:
            self._collect_locked()
            return self._used

    @property
    def cached_bytes(self) -> int:
        """Bytes of freed blocks kept for reuse."""
        with self._lock:
            self._collect_locked()
            return self._cached

    def array(self, mem: np.ndarray, nbytes: int) -> np.ndarray:
        return mem[:nbytes]

    def to_host(self, mem: np.ndarray, nbytes: int) -> np.ndarray:
        return mem[:nbytes].copy()

    def pinned(self, nbytes: int) -> tuple[Any, np.ndarray]:
        view = np.empty(nbytes, np.uint8)
        view[:] = 0  # touch now, as pinning would
        return view, view

    def mem_info(self) -> tuple[int, int]:
        with self._lock:
            self._collect_locked()
            return self.capacity - self._used, self.capacity

    def mark_current(self) -> None:
        """The allocation guard: none is needed, the host's current stream is the caller."""
        return None

    def allocating_for(self, stream: Any) -> contextlib.AbstractContextManager[None]:
        """Allocations inside are first used on ``stream`` (nothing to do on the host: a
        block is reused only once no array and no queued work refers to it)."""
        return contextlib.nullcontext()

    # copies
    def d2h(self, dst: np.ndarray, src: np.ndarray, offset: int, stream: Any) -> None:
        n = dst.shape[0]
        stream.launch(lambda: np.copyto(dst, src[offset:offset + n]))

    def h2d(self, dst: np.ndarray, offset: int, src: np.ndarray, stream: Any) -> None:
        n = src.shape[0]
        stream.launch(lambda: np.copyto(dst[offset:offset + n], src))

    def memset(self, dst: np.ndarray, offset: int, nbytes: int, value: int, stream: Any) -> None:
        stream.launch(lambda: dst[offset:offset + nbytes].fill(value))

    # streams
    def record(self, stream: Any) -> HostEvent:
        return stream.record()

    def user_stream(self, stream: Any | None) -> Any:
        return self._immediate if stream is None else stream

    def new_stream(self) -> HostStream:
        return HostStream()

    @contextlib.contextmanager
    def nvtx(self, name: str) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        yield

    def close(self) -> None:
        """Finish the copy streams' work, stop them, drop the cached blocks.  Idempotent."""
        self.d2h_stream.close()
        self.h2d_stream.close()
        with self._lock:
            self._open = False
            self._cache.clear()
            self._cached = 0


def _bucket(nbytes: int) -> int:
    """Cache bucket of an allocation: its exact size (buffers are whole pages, and a
    workload that swaps buffers of a few sizes reuses them; CuPy's pool also splits)."""
    return int(nbytes)

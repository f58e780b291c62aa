"""The host backend: device memory emulated in host RAM, with the CUDA backend's
asynchronous contract (streams are worker threads that run their work in order,
events are real ``threading.Event``s).

It lets the whole library run, and be tested, on machines without a GPU.  Its
numbers are host numbers and are always labelled ``host``.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .._os import host_memory
from .protocol import DeviceOOM

__all__ = ["HostBackend", "HostEvent", "HostStream", "ImmediateStream"]


class HostEvent:
    """Completes when the stream reaches the point where it was recorded."""

    __slots__ = ("_flag", "error")

    def __init__(self, done: bool = False) -> None:
        self._flag = threading.Event()
        self.error: BaseException | None = None
        if done:
            self._flag.set()

    @property
    def done(self) -> bool:
        return self._flag.is_set()

    def synchronize(self) -> None:
        """Wait; raise what failed on the stream before this point, as CUDA would."""
        self._flag.wait()
        if self.error is not None:
            raise RuntimeError(f"work on a host stream failed: {self.error!r}") from self.error

    def _set(self) -> None:
        self._flag.set()


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
        self._queue.put(fn)

    def record(self) -> HostEvent:
        ev = HostEvent()

        failed = self._failed

        def mark() -> None:
            if failed:
                ev.error = failed[0]
                failed.clear()
            ev._set()

        self._queue.put(mark)
        return ev

    def wait_event(self, event: Any) -> None:
        if not event.done:
            self._queue.put(event.synchronize)

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
    quarter of host RAM); allocations past it fail as a device OOM would."""

    name = "host"
    device_id = 0

    def __init__(self, reason: str = "requested", capacity: int | None = None) -> None:
        self.reason = reason
        total = host_memory.read()["total"]
        self.capacity = int(capacity) if capacity is not None else total // 4
        self.device_name = "host (device memory emulated in RAM)"
        # Live allocations: (weak reference, bytes).  The bytes in use are summed over the
        # ones still alive, rather than counted down by a finalizer: a finalizer is Python
        # code that a KeyboardInterrupt can cut short, leaving its bytes counted for good.
        self._live: dict[int, tuple[weakref.ref[np.ndarray], int]] = {}
        self._lock = threading.RLock()
        self.copy_stream = HostStream("gpu_backup-host-copy")
        self._immediate = ImmediateStream()

    def __repr__(self) -> str:
        return f"<HostBackend: {self.reason}>"

    # memory
    def alloc(self, nbytes: int) -> np.ndarray:
        with self._lock:
            used = self._used
            if used + nbytes > self.capacity:
                raise DeviceOOM(
                    f"host device emulation: {nbytes:,} B requested, "
                    f"{self.capacity - used:,} B of {self.capacity:,} B free")
            mem = np.empty(nbytes, np.uint8)
            ref = weakref.ref(mem)
            self._live[id(ref)] = (ref, nbytes)
        return mem

    @property
    def _used(self) -> int:
        """Bytes allocated now (those of allocations still alive)."""
        with self._lock:
            dead = [k for k, (ref, _) in self._live.items() if ref() is None]
            for k in dead:
                del self._live[k]
            return sum(n for _, n in self._live.values())

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
            return self.capacity - self._used, self.capacity

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
        self.copy_stream.close()

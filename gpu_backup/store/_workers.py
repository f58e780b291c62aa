"""Copy and fault-in workers for a store, and the interrupt discipline around them.

A large copy (or fault-in) is cut into jobs that form one :class:`Batch`.  The calling
thread runs jobs of its own batch too, and helper threads take jobs from the same batch,
so a batch completes even if no helper ever sees it (an interrupt while it is handed
out loses nothing).  The caller returns only once every job that any thread started has
finished: a ``KeyboardInterrupt`` on the caller stops it from starting new jobs, waits for
the jobs in flight, and is re-raised after, so no thread still copies into slots that
the caller's failure handling is about to drop and reuse.

:class:`Workers` owns its threads; ``close()`` stops and joins them once.  They are
daemons, and a store's finalizer closes them, so a process never hangs at exit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from queue import SimpleQueue

from .._fork import ForkGuard
from .._interrupts import deferred_interrupt

__all__ = ["Batch", "Workers", "deferred_interrupt"]


class Batch:
    """Jobs (callables) run by whichever threads take them; each job runs exactly once."""

    __slots__ = ("_jobs", "_next", "_done", "_cond", "errors")

    def __init__(self, jobs: list[Callable[[], None]]) -> None:
        self._jobs = jobs
        self._next = 0          # jobs handed out
        self._done = 0          # jobs finished
        self._cond = threading.Condition(threading.Lock())
        self.errors: list[BaseException] = []

    def _claim(self) -> int:
        with self._cond:
            i = self._next
            if i >= len(self._jobs):
                return -1
            self._next = i + 1
            return i

    def _finish(self, err: BaseException | None) -> None:
        with self._cond:
            if err is not None:
                self.errors.append(err)
                self._done += len(self._jobs) - self._next  # start nothing more
                self._next = len(self._jobs)
            self._done += 1
            if self._done == self._next:
                self._cond.notify_all()

    def work(self) -> None:
        """Run jobs until none is left (helper threads call this)."""
        while True:
            i = self._claim()
            if i < 0:
                return
            err = None
            try:
                self._jobs[i]()
            except BaseException as e:  # noqa: BLE001 - handed to the caller by run()
                err = e
            self._finish(err)

    def run(self, workers: Workers | None, helpers: int) -> None:
        """Run the batch with up to ``helpers`` helper threads plus the caller, wait for
        every job started, then raise the first error (a caller's ``KeyboardInterrupt``
        first)."""
        interrupt: BaseException | None = None
        # SIGINT waits until every job started has finished (one piece per thread at
        # most); an interrupt raised by a job stops new jobs from starting.
        with deferred_interrupt():
            try:
                if workers is not None:
                    workers.offer(self, helpers)
                self.work()
            except KeyboardInterrupt as e:
                interrupt = e
            with self._cond:                # jobs nobody started never will
                self._done += len(self._jobs) - self._next
                self._next = len(self._jobs)
                while self._done < self._next:
                    self._cond.wait()
                self._jobs = []             # a helper may still hold the batch: it must
                self._next = self._done = 0  # not hold the store through the jobs
                errors, self.errors = self.errors, []
        if interrupt is not None:
            raise interrupt
        for e in errors:
            if isinstance(e, KeyboardInterrupt):
                raise e
        if errors:
            raise errors[0]


class Workers:
    """``n`` daemon helper threads for batches.  Owned by one store; ``close()`` joins them."""

    def __init__(self, n: int, name: str) -> None:
        self._queue: SimpleQueue[Batch | None] = SimpleQueue()
        self._guard = ForkGuard()
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
                         for i in range(n)]
        for t in self._threads:
            t.start()

    @property
    def size(self) -> int:
        return len(self._threads)

    def _loop(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            batch.work()
            del batch                   # hold nothing of the store while idle

    def offer(self, batch: Batch, helpers: int) -> None:
        for _ in range(min(helpers, len(self._threads))):
            self._queue.put(batch)

    def close(self) -> None:
        """Stop and join the threads (in a forked child there are none to join)."""
        threads, self._threads = self._threads, []
        if self._guard.inherited:
            return
        for _ in threads:
            self._queue.put(None)
        me = threading.current_thread()
        for t in threads:
            if t is not me:
                t.join()

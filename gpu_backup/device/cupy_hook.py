"""The CuPy allocator hook: CuPy allocations that run out of device memory reclaim a
manager's buffers and retry.

CuPy has one process-global allocator (``cupy.cuda.set_allocator``).  Hooks of several
managers share it through one *dispatcher* installed there: the dispatcher calls the
installed hooks, the most recently installed outermost, around the allocator that was
current when the dispatcher was installed (its ``base``).  A hook leaves the chain when
its manager's ``cupy_allocator()`` block ends or the manager closes, in whatever order;
when the last one leaves, ``base`` is put back, unless someone replaced the dispatcher
meanwhile: then their allocator stays, and the dispatcher it may still call passes
straight through to ``base``.  All of this happens under one lock.

On out-of-memory (any form :func:`~gpu_backup.device.oom.is_device_oom` accepts) a hook
reclaims only when the allocation was for its manager's GPU (CuPy's current device): an
out-of-memory on GPU 1 never evicts GPU 0's buffers.  It does not repeat the pool's own
``free_all_blocks()`` + ``gc.collect()`` retry, which has already run when the error
arrives: it runs the manager's shrinkers at once, then retries.  What it finally raises is
both :class:`~gpu_backup.OutOfDeviceMemory` and ``cupy.cuda.memory.OutOfMemoryError``.

``cupy.cuda.using_allocator(f)`` sets a *thread-local* allocator: a thread inside it
allocates with ``f`` and bypasses the global dispatcher, so its out-of-memory errors are
not reclaimed.  Entering ``cupy_allocator()`` inside ``using_allocator`` is refused
(CuPy itself refuses to change the global allocator there).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ClosedError
from .oom import cupy_out_of_memory, is_device_oom

if TYPE_CHECKING:
    from ..manager import BufferManager

__all__ = ["CupyAllocatorHook"]

log = logging.getLogger("gpu_backup")

_LOCK = threading.Lock()
"""Guards every dispatcher's ``hooks`` and CuPy's global allocator while hooks change."""

_MAX_ROUNDS = 16
"""Shrink-and-retry rounds per out-of-memory (each must free something)."""


class _Dispatcher:
    """The allocator installed in CuPy: ``base``, with ``hooks`` (last outermost) taking
    its errors.  With no hooks left it is a plain pass-through to ``base``.  The fast path
    is one call to ``base``: the hooks only act on an error."""

    def __init__(self, base: Callable[[int], Any]) -> None:
        self.base = base
        self.hooks: tuple[CupyAllocatorHook, ...] = ()

    def __call__(self, nbytes: int) -> Any:
        base = self.base
        try:
            return base(nbytes)
        except Exception as e:
            hooks = self.hooks   # one snapshot: a hook leaving meanwhile finishes this call
            if not hooks:
                raise
            return _handle(hooks, len(hooks) - 1, base, nbytes, e)

    def __repr__(self) -> str:
        return f"<gpu_backup allocator dispatcher: {len(self.hooks)} hook(s) around {self.base!r}>"


_state: dict[str, _Dispatcher | None] = {"active": None}
"""The dispatcher that new hooks join (CuPy's allocator state is process-global too)."""


def _call(hooks: tuple[CupyAllocatorHook, ...], top: int, base: Callable[[int], Any],
          nbytes: int) -> Any:
    """``base`` as ``hooks[0..top]`` make it: what hook ``top + 1`` retries through."""
    try:
        return base(nbytes)
    except Exception as e:
        if top < 0:
            raise
        return _handle(hooks, top, base, nbytes, e)


def _handle(hooks: tuple[CupyAllocatorHook, ...], top: int, base: Callable[[int], Any],
            nbytes: int, error: Exception) -> Any:
    """``error`` came out of ``base``: ``hooks[0..top]`` take it in turn, innermost first,
    as nested wrappers would; each recovers (retrying through the hooks inside it) or
    passes an error outwards."""
    for j in range(top):
        try:
            return hooks[j]._on_error(nbytes, error, hooks, j, base)
        except Exception as e:
            error = e
    return hooks[top]._on_error(nbytes, error, hooks, top, base)


class CupyAllocatorHook:
    """One manager's place in CuPy's allocator chain.

    Owned by a :class:`~gpu_backup.BufferManager` (weakly referenced: the hook never keeps
    it alive); ``install``/``uninstall`` are idempotent in pairs, and ``uninstall`` is
    called by the manager's ``close()``.  ``stats``: ``oom_events`` (out-of-memory on this
    manager's GPU), ``oom_recovered`` (of those, satisfied after reclaim),
    ``bytes_reclaimed``, ``oom_other_device`` (left to the hooks of other GPUs).
    """

    def __init__(self, mgr: BufferManager) -> None:
        self._mgr = weakref.ref(mgr)
        self._cp: Any = None
        self._dispatcher: _Dispatcher | None = None
        self._stats_lock = threading.Lock()
        self.stats = {"oom_events": 0, "oom_recovered": 0, "bytes_reclaimed": 0,
                      "oom_other_device": 0}

    @property
    def installed(self) -> bool:
        return self._dispatcher is not None

    # ------------------------------------------------------------ life cycle
    def install(self) -> None:
        """Join the dispatcher in CuPy's global allocator (installing one over the current
        allocator if none is there)."""
        try:
            import cupy
        except ImportError as e:
            raise RuntimeError(f"cupy_allocator() needs CuPy: {e}") from e
        replaced = None
        with _LOCK:
            if self._dispatcher is not None:
                raise RuntimeError("the CuPy allocator hook is already installed")
            local = getattr(cupy.cuda.memory, "_get_thread_local_allocator", lambda: None)()
            if local is not None:
                raise RuntimeError(
                    "cupy_allocator() inside cupy.cuda.using_allocator(): this thread allocates "
                    f"with its thread-local allocator {local!r}, which bypasses any global hook "
                    "(and CuPy refuses to change the global allocator here); enter "
                    "cupy_allocator() outside using_allocator()")
            self._cp = cupy
            current = cupy.cuda.get_allocator()
            d = _state["active"]
            if d is None or current is not d:
                if d is not None and d.hooks:
                    replaced = current
                d = _Dispatcher(current)
                cupy.cuda.set_allocator(d)
                _state["active"] = d
            d.hooks = (*d.hooks, self)
            self._dispatcher = d
        if replaced is not None:
            log.warning("the CuPy allocator was replaced while gpu_backup's hook was "
                        "installed; the new hook wraps the replacement %r", replaced)

    def uninstall(self) -> None:
        """Leave the chain; the last hook to leave puts back the allocator the dispatcher
        replaced.  Idempotent; works from any thread, inside ``using_allocator`` too.

        Nothing under the lock can reach another ``uninstall`` (the lock is not reentrant):
        the warning is logged after it is released, and :meth:`active` is a plain context
        manager, so garbage collection never runs an ``uninstall`` of its own."""
        replaced = None
        with _LOCK:
            d = self._dispatcher
            if d is None:
                return
            self._dispatcher = None
            d.hooks = tuple(h for h in d.hooks if h is not self)
            if d.hooks:
                return
            if _state["active"] is d:
                _state["active"] = None
            cp = self._cp
            if _off_using_allocator(cp, cp.cuda.get_allocator) is d:
                _off_using_allocator(cp, lambda: cp.cuda.set_allocator(d.base))
            else:
                replaced = d.base
        if replaced is not None:
            log.warning("the CuPy allocator was replaced while gpu_backup's hook was "
                        "installed; the replacement stays (gpu_backup's dispatcher, if it "
                        "still reaches it, passes straight through to %r)", replaced)

    def active(self) -> _Active:
        """A context manager: :meth:`install` on entry, :meth:`uninstall` on exit.  Not a
        generator: one dropped without being exited leaves the hook installed until the
        manager closes, instead of uninstalling from inside a garbage collection (which
        can run while this thread holds the lock)."""
        return _Active(self)

    # ------------------------------------------------------------ allocation
    def _on_error(self, nbytes: int, error: Exception, hooks: tuple[CupyAllocatorHook, ...],
                  j: int, base: Callable[[int], Any]) -> Any:
        """An allocation of ``nbytes`` failed with ``error``: recover or raise."""
        if not is_device_oom(error):
            raise error
        mgr = self._mgr()
        if mgr is None or mgr.closed:
            raise error
        if not self._is_my_device(mgr):
            self._count("oom_other_device", 1)
            raise error
        return self._recover(mgr, nbytes, error, lambda: _call(hooks, j - 1, base, nbytes), base)

    def _recover(self, mgr: BufferManager, nbytes: int, first: BaseException,
                 retry: Callable[[], Any], base: Callable[[int], Any]) -> Any:
        """Shrink, hand the freed blocks back where the allocator can use them, retry; as
        long as a round frees something.  Raises ``CupyOutOfDeviceMemory`` at the end."""
        self._count("oom_events", 1)
        last = first
        total = 0
        synced = False
        retries = 0
        for _ in range(_MAX_ROUNDS):
            freed = _shrink(mgr, nbytes)
            if freed > 0:
                total += freed
                self._count("bytes_reclaimed", freed)
                self._flush_default_pool(base)
            elif total == 0 or synced:
                break
            else:
                # Freed bytes that an allocator cannot reuse yet (stream-ordered frees of
                # malloc_async): once, let the device finish them.
                self._synchronize()
                synced = True
            retries += 1
            try:
                mem = retry()
            except Exception as e:
                if not is_device_oom(e):
                    raise
                last = e
                continue
            self._count("oom_recovered", 1)
            return mem
        size, used, limit = (getattr(last, "_size", nbytes), getattr(last, "_total", -1),
                             getattr(last, "_limit", 0))
        raise cupy_out_of_memory(
            int(size), int(used), int(limit),
            why=(f"gpu_backup reclaimed {total:,} B of buffers on {mgr.backend.name} device "
                 f"{mgr.backend.device_id} and retried {retries} time(s); the last error: "
                 f"{type(last).__name__}: {last}")) from first

    def _is_my_device(self, mgr: BufferManager) -> bool:
        """The allocation is for this manager's GPU (CuPy's current device).  True when the
        current device cannot be told (no driver: an injected allocator in a test)."""
        dev = self._allocating_device()
        return dev is None or dev == mgr.backend.device_id

    def _allocating_device(self) -> int | None:
        try:
            return int(self._cp.cuda.runtime.getDevice())
        except Exception:  # noqa: BLE001 - no usable driver: the device cannot be told
            return None

    def _flush_default_pool(self, base: Callable[[int], Any]) -> None:
        """Evicted buffers return their blocks to the pool they came from.  When the
        allocator that ran out is CuPy's default pool, its own retry releases them to the
        driver; any other allocator (raw, async, RMM) cannot use the default pool's cached
        blocks, so they are released here, on the current device only."""
        try:
            pool = self._cp.get_default_memory_pool()
            if getattr(base, "__self__", None) is not pool:
                pool.free_all_blocks()
        except Exception as e:  # noqa: BLE001 - best effort: the retry decides
            log.debug("releasing the default pool's cached blocks failed: %r", e)

    def _synchronize(self) -> None:
        try:
            self._cp.cuda.runtime.deviceSynchronize()
        except Exception as e:  # noqa: BLE001 - best effort: the retry decides
            log.debug("device synchronize before the last retry failed: %r", e)

    def _count(self, key: str, n: int) -> None:
        with self._stats_lock:
            self.stats[key] += n


class _Active:
    """``with hook.active():`` -- installs on entry, uninstalls on exit, nothing else."""

    __slots__ = ("_hook",)

    def __init__(self, hook: CupyAllocatorHook) -> None:
        self._hook = hook

    def __enter__(self) -> None:
        self._hook.install()

    def __exit__(self, *exc: object) -> None:
        self._hook.uninstall()


def _shrink(mgr: BufferManager, nbytes: int) -> int:
    try:
        return mgr.shrink(nbytes)
    except ClosedError:
        return 0


def _off_using_allocator(cp: Any, fn: Callable[[], Any]) -> Any:
    """``fn()`` where CuPy's *global* allocator is what ``get_allocator`` sees and
    ``set_allocator`` may change: this thread, or, when this thread is inside
    ``using_allocator`` (which hides the global one and refuses to change it), a
    short-lived thread."""
    local = getattr(cp.cuda.memory, "_get_thread_local_allocator", lambda: None)()
    if local is None:
        return fn()
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            errors.append(e)

    t = threading.Thread(target=run, name="gpu_backup-global-allocator")
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return result[0]

"""A manager inherited through fork(): the child cannot use it, and freeing or closing it
there never touches the store's pages (the memfd is shared with the parent) nor waits for
copy threads (the child has none)."""

from __future__ import annotations

import gc
import os
import select
import signal
import time

import numpy as np
import pytest

import gpu_backup as gb
from gpu_backup.testing import check_invariants

PS = gb.PAGE_SIZE


def _in_child(fn) -> str:
    """Run ``fn`` in a forked child; return what it reports (or fail if it hangs)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            try:
                out = fn()
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                out = f"child raised {type(e).__name__}: {e}"
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 30)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the child hangs")
        chunks = []
        while chunk := os.read(r, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(r)
        deadline = time.monotonic() + 30
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the child does not exit")
            select.select([], [], [], 0.01)
    return b"".join(chunks).decode()


# Python 3.12+ warns about fork() in a process with threads; the child here touches only
# the objects under test and leaves with os._exit.
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_child_refuses_use_and_its_close_leaves_the_parent_intact():
    rng = np.random.default_rng(3)
    with gb.BufferManager("host", staging=gb.Staging(slots=2, slot_bytes=4 * PS)) as mgr:
        a, b = mgr.alloc(10 * PS), mgr.alloc(6 * PS)
        da = rng.integers(0, 256, a.nbytes, dtype=np.uint8)
        db = rng.integers(0, 256, b.nbytes, dtype=np.uint8)
        for buf, d in ((a, da), (b, db)):
            with buf.access("w") as arr:
                arr[:] = d
        del arr
        a.evict()                                   # a's bytes live in the shared memfd
        used = mgr.store.bytes_used
        c = mgr.alloc(2 * PS)
        c.evict()                                   # collected in the child below

        def child() -> str:
            out = []
            for name, use in (("access", lambda: a.access("r").__enter__()),
                              ("evict", b.evict), ("alloc", lambda: mgr.alloc(PS)),
                              ("shrink", lambda: mgr.shrink(PS)), ("to_host", a.to_host)):
                try:
                    use()
                    out.append(f"{name}: allowed")
                except gb.ForkedError as e:
                    out.append(f"{name}: ForkedError {'inherited through fork' in str(e)}")
            nonlocal c
            del c
            gc.collect()
            a.free()
            b.free()
            mgr.close()
            mgr.close()
            out.append(f"closed {mgr.closed} freed {a.freed and b.freed}")
            return "|".join(out)

        got = _in_child(child)
        assert got.split("|") == [
            "access: ForkedError True", "evict: ForkedError True", "alloc: ForkedError True",
            "shrink: ForkedError True", "to_host: ForkedError True", "closed True freed True"]
        # The parent's data and accounting are untouched.
        assert mgr.store.bytes_used == used + 2 * PS
        check_invariants(mgr, {a: da, b: db})
        np.testing.assert_array_equal(a.to_host(), da)
        np.testing.assert_array_equal(b.to_host(), db)
        c.free()
        assert mgr.store.bytes_used == used


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_child_can_make_its_own_manager():
    with gb.BufferManager("host") as mgr:
        a = mgr.alloc(4 * PS)
        with a.access("w") as arr:
            arr[:] = 9
        del arr
        a.evict()

        def child() -> str:
            with gb.BufferManager("host") as own:
                x = own.alloc(4 * PS)
                with x.access("w") as arr:
                    arr[:] = 4
                del arr
                x.evict()
                ok = np.unique(x.to_host()).tolist() == [4]
            mgr.close()
            return f"own manager works: {ok}"

        assert _in_child(child) == "own manager works: True"
        assert np.unique(a.to_host()).tolist() == [9]

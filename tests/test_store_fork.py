"""Stores inherited through fork(): the child may not use them, and closing or freeing them
there releases only the child's references, never the pages the parent still reads."""

from __future__ import annotations

import os

import numpy as np
import pytest

import gpu_backup as gb

PS = gb.PAGE_SIZE

# Python 3.12+ warns about fork() in a process with threads; the children here touch no
# lock a parent thread could hold (they report through a pipe and _exit).
pytestmark = pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")


def in_child(fn) -> str:
    """Run ``fn()`` in a forked child; returns what it reported (or the error's name)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            try:
                msg = fn()
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                msg = f"{type(e).__name__}: {e}"
            os.write(w, str(msg).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    return out


def _make(kind, tmp_path):
    if kind == "shmem":
        return gb.ShmemStore(16 << 20, host_reserve=0)
    if kind == "file":
        return gb.FileStore(tmp_path, 16 << 20)
    return gb.TieredStore(gb.ShmemStore(16 << 20, host_reserve=0), gb.FileStore(tmp_path, 16 << 20))


@pytest.mark.parametrize("kind", ["shmem", "file", "tiered"])
def test_child_refuses_use_and_its_close_keeps_the_parents_bytes(kind, tmp_path, rng):
    s = _make(kind, tmp_path)
    data = rng.integers(0, 256, 64 * PS, dtype=np.uint8)
    h = s.backup(data)
    s.drop(s.backup(data))                    # a pool, which a child must not punch either
    resident = s.fast.bytes_resident if kind == "tiered" else s.bytes_resident

    def child():
        refused = []
        for call in (lambda: s.read(h, np.empty(64 * PS, np.uint8)), lambda: s.drop(h),
                     s.trim, lambda: s.backup(data), lambda: s.alloc(1)):
            try:
                call()
            except gb.ForkedError:
                refused.append(True)
        s.close()
        s.close()
        if kind != "tiered":
            s._finalizer()                    # what garbage collection would run
        return f"{len(refused)} {s.closed}"

    assert in_child(child) == "5 True"
    out = np.empty_like(data)
    s.read(h, out)
    np.testing.assert_array_equal(out, data)
    assert (s.fast.bytes_resident if kind == "tiered" else s.bytes_resident) == resident
    s.drop(h)
    s.close()


def test_a_store_made_in_the_child_works(rng):
    s = gb.ShmemStore(1 << 20, host_reserve=0)
    s.drop(s.backup(np.zeros(8 * PS, np.uint8)))   # starts the parent's maintainer

    def child():
        with gb.ShmemStore(1 << 20, host_reserve=0) as c:
            d = np.arange(4 * PS, dtype=np.uint8)
            out = np.empty_like(d)
            c.read(c.backup(d), out)
            return str(bool((out == d).all()))

    assert in_child(child) == "True"
    s.close()

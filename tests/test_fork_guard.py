"""The fork guard: objects know when they were inherited through fork()."""

from __future__ import annotations

import os

import pytest

import gpu_backup as gb
from gpu_backup import _faults
from gpu_backup._fork import ForkGuard, generation


def test_guard_passes_in_its_own_process():
    g = ForkGuard()
    assert not g.inherited
    g.check("thing")  # no error


# Python 3.12+ warns about fork() in a process with threads; the child here only writes a
# pipe and leaves, touching no lock.
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_guard_refuses_in_a_forked_child():
    g = ForkGuard()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report (inherited, generation, error type) and leave at once
        try:
            try:
                g.check("thing")
                msg = "no error"
            except gb.ForkedError as e:
                msg = "ForkedError:" + str(e)
            os.write(w, f"{int(g.inherited)}|{generation()}|{msg}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    inherited, gen, msg = out.split("|", 2)
    assert inherited == "1"
    assert int(gen) == generation() + 1
    assert msg.startswith("ForkedError:thing was created in process generation")
    assert not g.inherited  # the parent is unaffected


def test_fault_points_are_inert_until_an_injector_is_set():
    _faults.point("x")  # nothing installed: no effect
    seen: list[str] = []
    old = _faults.set_injector(seen.append)
    try:
        _faults.point("a")
        _faults.point("b")
    finally:
        assert _faults.set_injector(old) is not None
    assert seen == ["a", "b"]
    with pytest.raises(KeyboardInterrupt):
        old = _faults.set_injector(lambda name: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            _faults.point("c")
        finally:
            _faults.set_injector(old)

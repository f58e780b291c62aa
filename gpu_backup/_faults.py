"""Named fault points in the pipeline, for the library's own reliability tests.

The copy pipeline, the manager and the stores call ``point("evict.piece.launched")`` (say)
at every step between two state changes.  It does nothing unless a test has installed an
injector through :mod:`gpu_backup.testing`, which may then raise there (an error, a
``KeyboardInterrupt``) to prove that every interruption point leaves a consistent,
retryable state.  The seed's ``backup_fault_inject``, grown up.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["point", "set_injector"]

_injector: Callable[[str], None] | None = None


def point(name: str) -> None:
    """A step boundary named ``name``: the installed injector (if any) may raise here."""
    inj = _injector
    if inj is not None:
        inj(name)


def set_injector(injector: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """Install ``injector`` (None removes it); returns the one it replaced.  Used only by
    :mod:`gpu_backup.testing`, which restores the previous one on exit."""
    global _injector
    old, _injector = _injector, injector
    return old

"""Fork detection: objects that own OS or CUDA state remember the process generation they
were made in, and refuse use in a forked child.

A memfd mapped shared is the same memory in parent and child: a child that punched holes
in it (freeing a buffer, closing a store) would wipe the parent's data; a child has no copy
threads either.  So a child never uses, and never releases, what it inherited; closing an
inherited object only forgets the child's references.
"""

from __future__ import annotations

import os

from .errors import ForkedError

__all__ = ["ForkGuard", "generation"]

_generation = 0


def _after_fork_in_child() -> None:
    global _generation
    _generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def generation() -> int:
    """How many forks this process is below the one that imported the library (0 there)."""
    return _generation


class ForkGuard:
    """Remembers the generation it was made in.  ``inherited`` is True in a forked child;
    ``check(what)`` raises :class:`ForkedError` there."""

    __slots__ = ("_gen",)

    def __init__(self) -> None:
        self._gen = _generation

    @property
    def inherited(self) -> bool:
        return self._gen != _generation

    def check(self, what: str) -> None:
        if self._gen != _generation:
            raise ForkedError(
                f"{what} was created in process generation {self._gen} and inherited through "
                f"fork() (this is generation {_generation}, pid {os.getpid()}): it cannot be used "
                f"here; create a new one in this process")

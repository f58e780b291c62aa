"""Free-extent sets for the store's slot allocator.

An :class:`ExtentSet` holds disjoint runs of free slots and coalesces neighbours.
Allocation is best fit (the smallest extent that holds the whole request, lowest
address on ties), falling back to the largest extents first, so a request is
split into as few runs as the free space allows.  Cost is per extent, never per
slot.  Not thread-safe: the store's lock guards it.
"""

from __future__ import annotations

from bisect import bisect_left, insort

__all__ = ["ExtentSet"]


class ExtentSet:
    __slots__ = ("_len", "_end", "_by_size", "total")

    def __init__(self) -> None:
        self._len: dict[int, int] = {}        # start -> length
        self._end: dict[int, int] = {}        # end (exclusive) -> start
        self._by_size: list[tuple[int, int]] = []  # sorted (length, start)
        self.total = 0

    def __len__(self) -> int:
        return len(self._len)

    def extents(self) -> list[tuple[int, int]]:
        """``(start, length)`` of every extent, by address."""
        return sorted(self._len.items())

    def _insert(self, start: int, length: int) -> None:
        self._len[start] = length
        self._end[start + length] = start
        insort(self._by_size, (length, start))
        self.total += length

    def _remove(self, start: int) -> int:
        length = self._len.pop(start)
        del self._end[start + length]
        i = bisect_left(self._by_size, (length, start))
        del self._by_size[i]
        self.total -= length
        return length

    def add(self, start: int, length: int) -> None:
        """Return ``[start, start+length)`` to the set, merging with adjacent extents.

        The caller guarantees the range is not already in the set.
        """
        if length <= 0:
            return
        before = self._end.get(start)
        if before is not None:
            length += self._remove(before)
            start = before
        after = start + length
        if after in self._len:
            length += self._remove(after)
        self._insert(start, length)

    def take(self, n: int) -> list[tuple[int, int]]:
        """Remove up to ``n`` slots; returns their runs ``(start, length)``, fewest runs first."""
        runs: list[tuple[int, int]] = []
        while n > 0 and self._by_size:
            i = bisect_left(self._by_size, (n, -1))
            if i < len(self._by_size):
                length, start = self._by_size[i]
                self._remove(start)
                if length > n:
                    self._insert(start + n, length - n)
                runs.append((start, n))
                return runs
            length, start = self._by_size[-1]
            self._remove(start)
            runs.append((start, length))
            n -= length
        return runs

    def take_all(self) -> list[tuple[int, int]]:
        """Empty the set; returns every extent."""
        runs = self.extents()
        self._len.clear()
        self._end.clear()
        self._by_size.clear()
        self.total = 0
        return runs

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_backup.store._extents import ExtentSet


def test_add_coalesces_neighbours():
    e = ExtentSet()
    e.add(10, 5)
    e.add(20, 5)
    e.add(15, 5)
    assert e.extents() == [(10, 15)]
    assert e.total == 15 and len(e) == 1


def test_take_prefers_best_fit_then_largest():
    e = ExtentSet()
    e.add(0, 10)
    e.add(100, 4)
    e.add(200, 6)
    assert e.take(5) == [(200, 5)]          # smallest extent that holds 5
    assert e.take(12) == [(0, 10), (100, 2)]  # largest first, then best fit for the rest
    assert e.extents() == [(102, 2), (205, 1)]
    assert e.take(10) == [(102, 2), (205, 1)]  # takes what there is
    assert e.total == 0


@settings(max_examples=200)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 40)), max_size=60))
def test_matches_a_set_model(ops):
    n = 400
    e = ExtentSet()
    e.add(0, n)
    free = set(range(n))
    held: list[tuple[int, int]] = []
    for is_take, k in ops:
        if is_take or not held:
            runs = e.take(k)
            got = [s + i for s, ln in runs for i in range(ln)]
            assert len(got) == min(k, len(free))
            assert set(got) <= free and len(set(got)) == len(got)
            free -= set(got)
            held.extend(runs)
        else:
            s, ln = held.pop(k % len(held))
            e.add(s, ln)
            free |= set(range(s, s + ln))
        assert e.total == len(free)
        exts = e.extents()
        assert {s + i for s, ln in exts for i in range(ln)} == free
        # fully coalesced: no two extents touch
        assert all(a + la < b for (a, la), (b, _) in zip(exts, exts[1:]))

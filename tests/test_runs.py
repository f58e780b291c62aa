from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from gpu_backup._runs import expand_runs, runs_of


def test_runs_of_splits_at_gaps_and_reversals():
    v = np.array([5, 6, 7, 10, 11, 3, 4, 4], np.int64)
    starts, lengths, offsets = runs_of(v)
    assert starts.tolist() == [5, 10, 3, 4]
    assert lengths.tolist() == [3, 2, 2, 1]
    assert offsets.tolist() == [0, 3, 5, 7]


def test_empty():
    s, l, o = runs_of(np.empty(0, np.int64))
    assert s.size == l.size == o.size == 0
    assert expand_runs(s, l).size == 0


@given(st.lists(st.integers(-50, 50), max_size=200))
def test_expand_inverts_runs(values):
    v = np.array(values, np.int64)
    s, l, o = runs_of(v)
    assert l.sum() == v.size
    np.testing.assert_array_equal(expand_runs(s, l), v)

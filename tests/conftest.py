from __future__ import annotations

import os

import numpy as np
import pytest

import gpu_backup as gb


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _store_mappings() -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if "gpu_backup" in line or "#" in line and "(deleted)" in line]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture(params=["shmem", "file"])
def make_store(request, tmp_path):
    """Factory for stores of either kind; every store made is closed at teardown."""
    made: list[gb.PageStore] = []

    def make(capacity=64 << 20, **kw):
        if request.param == "shmem":
            s = gb.ShmemStore(capacity, **kw)
        else:
            kw.pop("host_reserve", None)
            s = gb.FileStore(tmp_path, capacity, **kw)
        made.append(s)
        return s

    make.kind = request.param
    yield make
    for s in made:
        s.close()


@pytest.fixture
def resources():
    """Counts open fds before and after, to prove nothing leaks."""
    return _open_fds

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


# ----------------------------------------------------------------- backends
def cuda_unusable_reason() -> str | None:
    """None when a CUDA device is usable, else why not (the driver's words)."""
    from gpu_backup.device.cuda import probe

    try:
        probe(None)
    except gb.NoDeviceError as e:
        return str(e)
    return None


@pytest.fixture(params=["host", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> str:
    """Each behaviour test runs on every backend present: host always, cuda with a GPU."""
    if request.param == "cuda":
        why = cuda_unusable_reason()
        if why:
            pytest.skip(f"no usable GPU: {why}")
    return request.param


# Small slots so that even small buffers move in several pieces through the ring.
TEST_STAGING = gb.Staging(slots=3, slot_bytes=64 << 10, threads=2)


@pytest.fixture
def make_mgr(device):
    made = []

    def make(**kw):
        kw.setdefault("staging", TEST_STAGING)
        m = gb.BufferManager(device, **kw)
        made.append(m)
        return m

    make.device = device
    yield make
    for m in made:
        m.close()


@pytest.fixture
def mgr(make_mgr):
    return make_mgr()


def fill(buf, data: np.ndarray, *, stream=None) -> None:
    """Write host bytes into a buffer (mode 'w'), on either backend."""
    with buf.access("w", stream=stream) as arr:
        if isinstance(arr, np.ndarray):
            arr[:] = data
        else:
            arr.set(data)


def pages(rng: np.random.Generator, n: int, ps: int = gb.PAGE_SIZE) -> np.ndarray:
    """``n`` pages of random bytes."""
    return rng.integers(0, 256, n * ps, dtype=np.uint8)


def readback(store, handles) -> np.ndarray:
    """What ``store`` holds under ``handles``, read into a new array."""
    out = np.empty(len(handles) * store.page_size, np.uint8)
    store.read(handles, out)
    return out


def random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, n, dtype=np.uint8)


_SPIN_SRC = r"""
extern "C" __global__ void spin_then_fill(unsigned long long cycles, unsigned char* out,
                                          unsigned long long n) {
    long long start = clock64();
    while (clock64() - start < (long long)cycles) { }
    for (unsigned long long i = threadIdx.x; i < n; i += blockDim.x) out[i] = i % 251;
}
"""


def _spin_then_fill():
    import cupy as cp

    return cp.RawKernel(_SPIN_SRC, "spin_then_fill")


class _SlowWrite:
    """A slow 'kernel' on a user stream that writes a known pattern, per backend."""

    def stream(self, mgr):
        return mgr.backend.new_stream()

    def __call__(self, stream, arr) -> np.ndarray:
        n = arr.shape[0]
        expected = (np.arange(n) % 251).astype(np.uint8)
        if isinstance(arr, np.ndarray):
            import time

            def kernel():
                time.sleep(0.2)
                arr[:] = expected

            stream.launch(kernel)
        else:
            import cupy as cp

            with stream:   # spins ~0.1 s on the GPU, then writes: still running at evict time
                _spin_then_fill()((1,), (256,), (np.uint64(200_000_000), arr, np.uint64(n)))
        return expected

    def add_one(self, stream, arr, data) -> np.ndarray:
        if isinstance(arr, np.ndarray):
            stream.launch(lambda: np.add(arr, 1, out=arr))
        else:
            with stream:
                arr += 1
        stream.synchronize()
        return (data.astype(np.uint16) + 1).astype(np.uint8)


@pytest.fixture
def slow_write():
    return _SlowWrite()

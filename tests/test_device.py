"""Backend choice: 'auto' falls back to host with its reason; 'cuda' fails clearly without a GPU."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

import gpu_backup as gb
from conftest import cuda_unusable_reason

NO_GPU = cuda_unusable_reason()


def test_host_on_request():
    with gb.BufferManager("host") as m:
        assert m.backend.name == "host"
        assert "requested" in m.backend.reason


@pytest.fixture
def fresh_process_warnings(monkeypatch):
    """As in a fresh process: the once-per-process fallback warning has not been issued."""
    import gpu_backup.device as device

    monkeypatch.setattr(device, "_fallback_warned", set())


@pytest.mark.skipif(NO_GPU is None, reason="a GPU is present: fallback cannot be observed")
def test_auto_falls_back_to_host_with_the_reason(fresh_process_warnings):
    with pytest.warns(gb.HostFallbackWarning, match="found no usable GPU") as rec:
        m = gb.BufferManager("auto")
    with m:
        assert m.backend.name == "host"
        assert m.backend.reason.startswith("auto: ")
        assert NO_GPU in m.backend.reason
    assert len(rec) == 1 and NO_GPU in str(rec[0].message)
    assert "not GPU figures" in str(rec[0].message)
    assert rec[0].filename == __file__          # points at the caller, not the library
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        with gb.BufferManager("auto") as m2:     # once per process
            assert m2.backend.name == "host"
    assert not [w for w in again if issubclass(w.category, gb.HostFallbackWarning)]


@pytest.mark.skipif(NO_GPU is None, reason="a GPU is present")
@pytest.mark.parametrize("device", ["cuda", 0, 3])
def test_cuda_without_gpu_raises_with_the_drivers_message(device):
    with pytest.raises(gb.NoDeviceError) as ei:
        gb.BufferManager(device)
    assert str(ei.value) == NO_GPU or "CUDA device" in str(ei.value)
    assert isinstance(ei.value, gb.GpuBackupError)


def test_cupy_present_reason_names_the_driver_error():
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert NO_GPU is not None and "CuPy is not installed" in NO_GPU
        return
    if NO_GPU is not None:
        assert NO_GPU.startswith("no usable CUDA device: ")


@pytest.mark.parametrize("bad", ["tpu", -1, True, 1.0])
def test_bad_device_arguments(bad):
    with pytest.raises((ValueError, TypeError), match="device"):
        gb.BufferManager(bad)


def test_import_works_without_cupy():
    code = ("import builtins, sys\n"
            "real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name == 'cupy' or name.startswith(('cupy.', 'cupyx')):\n"
            "        raise ImportError('hidden')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "import gpu_backup as gb\n"
            "m = gb.BufferManager('auto')\n"
            "print(m.backend.name, m.backend.reason)\n"
            "m.close()\n"
            "assert 'cupy' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("host auto: CuPy is not installed")


def test_public_names_are_pinned():
    assert sorted(gb.__all__) == sorted([
        "PAGE_SIZE", "SHRINK_EMPTY", "SHRINK_STOP", "Buffer", "BufferBusyError",
        "BufferFreedError", "BufferManager", "BufferPurgedError", "ClosedError", "CopyError",
        "FileStore", "ForkedError", "GpuBackupError", "HostFallbackWarning", "InvalidHandleError", "NoDeviceError",
        "OutOfDeviceMemory", "PageStore", "Residency", "ShmemStore", "Shrinker", "Staging",
        "StoreFullError", "TieredStore", "__version__"])
    for name in gb.__all__:
        assert hasattr(gb, name)

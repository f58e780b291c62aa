"""What a result was measured on: versions, machine, CUDA driver and runtime.

Every probe is guarded: a missing or broken CuPy, driver or torch gives ``None``
(printed as ``n/a``), never an exception.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import socket
from datetime import datetime
from typing import Any

import numpy as np

from .. import __version__
from .._os import host_memory

__all__ = ["now_iso", "versions", "machine", "cuda_versions", "cuda_version_str",
           "dist_version"]


def now_iso() -> str:
    """The local time, ISO 8601 with its UTC offset (e.g. ``2026-05-01T12:00:00+00:00``)."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def dist_version(*names: str) -> str | None:
    """The installed version of the first distribution found among ``names`` (no import)."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def cuda_version_str(v: int | None) -> str | None:
    """CUDA's integer version (12040) as text (``"12.4"``)."""
    if not v:
        return None
    return f"{v // 1000}.{v % 1000 // 10}"


def cuda_versions() -> dict[str, str | None]:
    """``cupy``, ``cuda_driver`` and ``cuda_runtime`` versions, each None if unavailable."""
    out: dict[str, str | None] = {"cupy": None, "cuda_driver": None, "cuda_runtime": None}
    if importlib.util.find_spec("cupy") is None:
        return out
    try:
        import cupy
    except Exception:  # noqa: BLE001 - a broken install reads as "n/a"
        return out
    out["cupy"] = str(getattr(cupy, "__version__", None))
    # The runtime actually loaded (get_local_runtime_version), not the one CuPy was built
    # against (runtime.runtimeGetVersion), where this CuPy can tell.
    local = getattr(cupy.cuda, "get_local_runtime_version", None)
    probes = (("cuda_driver", cupy.cuda.runtime.driverGetVersion),
              ("cuda_runtime", local or cupy.cuda.runtime.runtimeGetVersion))
    for key, fn in probes:
        try:
            out[key] = cuda_version_str(int(fn()))
        except Exception:  # noqa: BLE001 - no driver, no device: "n/a"
            out[key] = None
    return out


def versions() -> dict[str, str | None]:
    """python, numpy, gpu_backup, cupy, CUDA driver/runtime, torch (None where absent).

    torch's version is read from its installed metadata, so torch is not imported."""
    out: dict[str, str | None] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "gpu_backup": __version__,
    }
    out.update(cuda_versions())
    out["torch"] = dist_version("torch")
    return out


def machine() -> dict[str, Any]:
    """hostname, CPU count, platform, host memory and swap (bytes)."""
    mem = host_memory.read(fresh=True)
    return {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "host_memory_total": mem["total"],
        "host_memory_available": mem["available"],
        "swap_total": mem["swap_total"],
        "swap_free": mem["swap_free"],
    }

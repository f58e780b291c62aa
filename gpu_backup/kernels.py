"""Page scans on the device: the one module that reads ``kernels/*.cu`` and uses
``cupy.RawModule``.  Each kernel has a numpy reference with the same results, which
the host backend uses and the GPU tests compare against.

``zero_pages``: which pages are all zero (eviction records them instead of copying).
``checksums``: a 64-bit order-sensitive checksum per page (verify without a copy).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["NVRTC_OPTIONS", "KernelBuild", "PageScanner", "kernel_build_check", "kernel_source",
           "checksums_reference", "zero_pages_reference"]

NVRTC_OPTIONS = ("-std=c++17",)
"""Compiler options for kernels/*.cu (CuPy adds the architecture and its own includes)."""

_MIX = np.uint64(0x9E3779B97F4A7C15)
_BLOCK = 256


def kernel_source(name: str) -> str:
    """Text of ``kernels/<name>``: inside the installed package, or the source tree's."""
    here = Path(__file__).resolve().parent
    for d in (here / "_kernels", here.parent / "kernels"):
        f = d / name
        if f.is_file():
            return f.read_text()
    raise FileNotFoundError(f"kernel source {name!r} not found in {here / '_kernels'} or "
                            f"{here.parent / 'kernels'}")


def _check(nbytes: int, page_size: int) -> int:
    if page_size % 16:
        raise ValueError(f"{page_size=} must be a multiple of 16 for the page scans")
    if nbytes % page_size:
        raise ValueError(f"{nbytes:,} B is not a whole number of {page_size:,} B pages")
    return nbytes // page_size


def zero_pages_reference(data: np.ndarray, page_size: int) -> np.ndarray:
    """Bool per page: every byte zero.  ``data`` is uint8, whole pages."""
    npages = _check(data.shape[0], page_size)
    words = data.view(np.uint64).reshape(npages, page_size // 8)
    return ~words.any(axis=1)


def checksums_reference(data: np.ndarray, page_size: int) -> np.ndarray:
    """uint64 per page, the same function as ``checksum_pages`` in kernels/page_scan.cu:
    ``sum(w) ^ (sum((i+1) * w) * 0x9E3779B97F4A7C15)`` over the page's 32-bit words, mod 2**64."""
    npages = _check(data.shape[0], page_size)
    wpp = page_size // 4
    words = data.view(np.uint32).reshape(npages, wpp).astype(np.uint64)
    a = words.sum(axis=1, dtype=np.uint64)
    b = (words * np.arange(1, wpp + 1, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return a ^ (b * _MIX)


class PageScanner:
    """Runs the page scans for one backend: CUDA kernels on a GPU, numpy on the host."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self._module: Any = None
        self._kernels: dict[str, Any] = {}
        self._scratch: list[tuple[Any, np.ndarray]] = []   # pinned result buffers, reused
        self._lock = threading.Lock()

    def _kernel(self, name: str) -> Any:
        """The compiled kernel, built and loaded once, on this backend's GPU."""
        with self._lock:
            if name not in self._kernels:
                import cupy

                with self.backend.activate():
                    if self._module is None:
                        self._module = cupy.RawModule(code=kernel_source("page_scan.cu"),
                                                      options=NVRTC_OPTIONS)
                    self._kernels[name] = self._module.get_function(name)
            return self._kernels[name]

    def zero_pages(self, mem: Any, nbytes: int, page_size: int, *, stream: Any) -> np.ndarray:
        """Bool per page of ``mem[:nbytes]``, scanned on ``stream``.  The caller has waited
        for every write to ``mem`` (on the host backend the scan runs right here)."""
        npages = _check(nbytes, page_size)
        if self.backend.name != "cuda":
            return zero_pages_reference(self.backend.array(mem, nbytes), page_size)
        return self._launch("classify_pages", mem, nbytes, page_size, 16, np.uint8, stream,
                            npages).astype(bool)

    def checksums(self, mem: Any, nbytes: int, page_size: int, *, stream: Any) -> np.ndarray:
        npages = _check(nbytes, page_size)
        if self.backend.name != "cuda":
            return checksums_reference(self.backend.array(mem, nbytes), page_size)
        return self._launch("checksum_pages", mem, nbytes, page_size, 4, np.uint64, stream, npages)

    def _launch(self, name: str, mem: Any, nbytes: int, page_size: int, word: int,
                dtype: Any, stream: Any, npages: int) -> np.ndarray:
        import cupy

        if npages == 0:
            return np.empty(0, dtype)
        fn = self._kernel(name)
        backend = self.backend
        host = np.empty(npages, dtype)
        scratch = self._take_scratch(host.nbytes)   # an async D2H needs page-locked memory
        try:
            pinned = scratch[1][:host.nbytes]
            with backend.activate(), stream:   # the device scratch comes from the stream's pool
                data = backend.array(mem, nbytes)
                out = cupy.empty(npages, dtype=dtype)
                fn((npages,), (_BLOCK,), (data, np.uint64(page_size // word), np.uint64(npages), out))
                backend.d2h(pinned, out.data, 0, stream)
                done = backend.record(stream)
            # A blocking event: the result decides what to copy; no stream-wide wait.
            done.synchronize()
            host.view(np.uint8)[:] = pinned
            del out
        except BaseException:
            # the copy into the scratch may still be in flight: never reuse it
            scratch = None
            raise
        finally:
            if scratch is not None:
                with self._lock:
                    self._scratch.append(scratch)
        return host

    def _take_scratch(self, nbytes: int) -> tuple[Any, np.ndarray]:
        """A pinned block of at least ``nbytes`` from this scanner's free list (allocated
        once, in powers of two: freeing pinned memory would synchronise the device)."""
        with self._lock:
            for i, (owner, view) in enumerate(self._scratch):
                if view.nbytes >= nbytes:
                    return self._scratch.pop(i)
        size = 1 << max(12, (nbytes - 1).bit_length())
        return self.backend.pinned(size)


def scan_default(backend_name: str) -> bool:
    """Zero-page scans pay off where a device pass is far cheaper than the copy: on a GPU."""
    env = os.environ.get("GPU_BACKUP_ZERO_SCAN")
    if env is not None:
        return env not in ("0", "", "false", "no")
    return backend_name == "cuda"


_EXTRA_HINT = "install gpu-backup[cuda13] (or [cuda12] for a CUDA 12 driver), which brings them"


@dataclass(frozen=True)
class KernelBuild:
    """Whether CuPy can compile kernels here (``ok``) and why not (``why``); where CuPy
    found the CUDA runtime headers (``headers``, ``headers_from``) and the NVRTC version."""

    ok: bool
    why: str
    nvrtc: str | None = None
    headers: str | None = None
    headers_from: str | None = None


def kernel_build_check(name: str = "page_scan.cu") -> KernelBuild:
    """Take the steps ``cupy.RawModule`` takes before it needs a GPU, without one: CuPy's
    own compiler options (its CUDA header lookup: CuPy 12.2 and later refuse to compile
    any kernel, even one without includes, when the runtime headers are missing), then
    NVRTC on ``kernels/<name>`` with those options.  A machine with only the driver
    fails the first step; then the zero-page scan turns itself off and CuPy's own
    elementwise kernels fail too."""
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        return KernelBuild(False, f"CuPy is not installed ({e}); {_EXTRA_HINT}")
    headers = headers_from = None
    try:
        from cuda.pathfinder import locate_nvidia_header_directory

        found = locate_nvidia_header_directory("cudart")
        if found is not None:
            headers, headers_from = found.abs_path, found.found_via
    except Exception:  # noqa: BLE001 - reporting only; CuPy's own lookup decides below
        pass
    try:
        from cupy._core.core import assemble_cupy_compiler_options
        from cupy.cuda import nvrtc

        options = tuple(assemble_cupy_compiler_options(NVRTC_OPTIONS))
    except RuntimeError as e:       # CuPy's "Failed to find CUDA headers"
        return KernelBuild(False, f"CuPy cannot find the CUDA runtime headers ({e}); "
                                  f"{_EXTRA_HINT}", headers=headers, headers_from=headers_from)
    except Exception as e:  # noqa: BLE001 - an unexpected CuPy layout: say what broke
        return KernelBuild(False, f"CuPy's compiler setup failed ({type(e).__name__}: {e})",
                           headers=headers, headers_from=headers_from)
    try:
        major, minor = nvrtc.getVersion()
        arch = min(int(a) for a in nvrtc.getSupportedArchs())
    except Exception as e:  # noqa: BLE001 - the library is missing or broken
        return KernelBuild(False, f"NVRTC cannot be loaded ({type(e).__name__}: {e}); "
                                  f"{_EXTRA_HINT}", headers=headers, headers_from=headers_from)
    version = f"{major}.{minor}"
    prog = nvrtc.createProgram(kernel_source(name), name, (), ())
    try:
        nvrtc.compileProgram(prog, (*options, "--device-as-default-execution-space",
                                    f"-arch=compute_{arch}"))
    except Exception as e:  # noqa: BLE001 - NVRTCError: the log says why
        log = nvrtc.getProgramLog(prog)
        return KernelBuild(False, f"NVRTC {version} cannot compile {name}: {e}\n{log}",
                           nvrtc=version, headers=headers, headers_from=headers_from)
    finally:
        nvrtc.destroyProgram(prog)
    return KernelBuild(True, f"{name} compiles with NVRTC {version} and CuPy's options",
                       nvrtc=version, headers=headers, headers_from=headers_from)

"""Device backends behind one protocol, and the choice between them."""

from __future__ import annotations

import numbers
import re
import threading
import warnings
from typing import Any

from ..errors import HostFallbackWarning, NoDeviceError
from .host import HostBackend, HostStream
from .protocol import Backend, DeviceOOM

__all__ = ["Backend", "DeviceOOM", "HostBackend", "HostStream", "open_backend", "parse_device"]

_ACCEPTED = ("'auto', 'cuda', 'cuda:N', 'host', 'host:N', an int GPU index, or a "
             "torch.device('cuda', N)")
_FORM = re.compile(r"(auto|host|cuda)(?::(\d+))?")

_fallback_lock = threading.Lock()
_fallback_warned: set[str] = set()   # "auto" once the warning was issued in this process


def parse_device(device: Any) -> tuple[str, int | None]:
    """``(kind, index)`` for a ``device=`` argument: kind ``"auto"``, ``"cuda"`` or
    ``"host"``; index the GPU (None: the default one) or, for ``"host:N"``, the device
    number the host backend emulates.

    Accepts, in any case and with surrounding blanks: ``"auto"``, ``"cuda"``,
    ``"cuda:N"``, ``"host"``, ``"host:N"``; an int ``N`` (numpy ints too); and any object
    with ``.type`` and ``.index`` as ``torch.device`` has (torch is never imported).
    """
    if isinstance(device, bool):
        raise TypeError(f"device must be {_ACCEPTED}, got {device!r}")
    if isinstance(device, numbers.Integral):
        n = int(device)
        if n < 0:
            raise ValueError(f"device={n} must be >= 0 (a GPU index)")
        return "cuda", n
    if isinstance(device, str):
        m = _FORM.fullmatch(device.strip().lower())
        if m is None:
            raise ValueError(f"device must be {_ACCEPTED}, got {device!r}")
        kind, index = m.group(1), m.group(2)
        if kind == "auto" and index is not None:
            raise ValueError(f"device={device!r}: 'auto' takes no index; use 'cuda:{index}'")
        return kind, None if index is None else int(index)
    dtype, index = getattr(device, "type", None), getattr(device, "index", None)
    if isinstance(dtype, str) and hasattr(device, "index"):
        if dtype.lower() != "cuda":
            raise ValueError(f"device={device!r}: only CUDA devices hold gpu_backup buffers; "
                             f"use device='host' for the host backend (an emulator)")
        if index is not None and (isinstance(index, bool) or not isinstance(index, int)
                                  or index < 0):
            raise ValueError(f"device={device!r}: index {index!r} is not a GPU index >= 0")
        return "cuda", index
    raise TypeError(f"device must be {_ACCEPTED}, got {device!r}")


def open_backend(device: Any = "auto", *, host_capacity: int | None = None) -> Backend:
    """The backend for a ``device=`` argument (see :func:`parse_device`).

    ``"auto"``: CUDA when a usable GPU and driver are present, else the host backend,
    with its ``reason`` and, once per process, a :class:`~gpu_backup.HostFallbackWarning`
    that says why (so an emulator run is never taken for a GPU run).  ``"cuda"``,
    ``"cuda:N"``, an int N or a ``torch.device``: that GPU, or :class:`NoDeviceError`
    with the driver's message.  ``"host"`` / ``"host:N"``: the host backend (emulating
    device N; two managers on ``"host:0"`` and ``"host:1"`` stand for two GPUs).
    """
    kind, index = parse_device(device)
    if kind == "host":
        return HostBackend(f"requested (device={device!r})", capacity=host_capacity,
                           device_id=index or 0)
    from .cuda import CudaBackend

    if kind == "auto":
        try:
            return CudaBackend(None, reason="auto: a usable CUDA device is present")
        except NoDeviceError as e:
            _warn_fallback(str(e))
            return HostBackend(f"auto: {e}", capacity=host_capacity)
    return CudaBackend(index, reason=f"requested (device={device!r})")


def _warn_fallback(why: str) -> None:
    with _fallback_lock:
        if "auto" in _fallback_warned:
            return
        _fallback_warned.add("auto")
    warnings.warn(f"device='auto' found no usable GPU ({why}); using the host backend, which "
                  f"emulates device memory in host RAM: its figures are not GPU figures. "
                  f"Pass device='host' to choose it explicitly.", HostFallbackWarning,
                  stacklevel=4)

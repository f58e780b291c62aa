"""Device backends behind one protocol, and the choice between them."""

from __future__ import annotations

from typing import Any

from ..errors import NoDeviceError
from .host import HostBackend, HostStream
from .protocol import Backend, DeviceOOM

__all__ = ["Backend", "DeviceOOM", "HostBackend", "HostStream", "open_backend"]


def open_backend(device: Any = "auto", *, host_capacity: int | None = None) -> Backend:
    """``"auto"``: CUDA when a usable GPU and driver are present, else host (the backend's
    ``reason`` says why).  ``"cuda"`` or an int N: that GPU, or :class:`NoDeviceError` with
    the driver's message.  ``"host"``: the host backend."""
    if isinstance(device, bool):
        raise TypeError(f"device must be 'auto', 'cuda', 'host' or an int, got {device!r}")
    if device == "host":
        return HostBackend("requested (device='host')", capacity=host_capacity)
    if device == "auto":
        try:
            from .cuda import CudaBackend
            return CudaBackend(None, reason="auto: a usable CUDA device is present")
        except NoDeviceError as e:
            return HostBackend(f"auto: {e}", capacity=host_capacity)
    if device == "cuda" or isinstance(device, int):
        if isinstance(device, int) and device < 0:
            raise ValueError(f"device={device} must be >= 0")
        from .cuda import CudaBackend
        return CudaBackend(None if device == "cuda" else device, reason=f"requested (device={device!r})")
    raise ValueError(f"device must be 'auto', 'cuda', 'host' or an int, got {device!r}")

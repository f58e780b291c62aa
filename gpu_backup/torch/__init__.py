"""PyTorch on gpu_backup buffers: tensor views of buffers, and activation offload.

Imported only on request (``import gpu_backup.torch``); ``import gpu_backup`` never imports
torch.  Needs PyTorch (``pip install gpu-backup[torch]``).

- :func:`tensor_access`: a ``torch.Tensor`` of a given dtype and shape over a buffer's
  memory inside ``access()``; torch's current stream is the stream passed to ``access()``.
- :func:`offload_saved_tensors`: autograd's saved tensors kept in buffers of a manager,
  evicted only when the manager runs short, restored only if evicted.
- :func:`saved_bytes`: what autograd saves in a step, to size a ``device_limit``.
"""

from __future__ import annotations

try:
    import torch as _torch
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(f"gpu_backup.torch needs PyTorch ({e}); install it, e.g. "
                      f"pip install 'gpu-backup[torch]'") from e

from ._offload import (
    DEFAULT_MIN_BYTES,
    LEFT_REASONS,
    SavedTensorOffload,
    offload_saved_tensors,
    saved_bytes,
)
from ._view import tensor_access, torch_device, torch_stream

del _torch

__all__ = [
    "DEFAULT_MIN_BYTES",
    "LEFT_REASONS",
    "SavedTensorOffload",
    "offload_saved_tensors",
    "saved_bytes",
    "tensor_access",
    "torch_device",
    "torch_stream",
]

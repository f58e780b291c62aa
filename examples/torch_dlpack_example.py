"""Use gpu_backup buffers from PyTorch, zero-copy, through DLPack.

Run from the repo root:  python3 examples/torch_dlpack_example.py

``torch.from_dlpack(arr)`` on the array that ``buf.access()`` yields gives a tensor over
the buffer's own memory (a CUDA tensor on the cuda backend; a CPU tensor on the host
backend, where device memory is emulated in RAM).  The tensor is valid only inside the
``access()`` block: after it the manager may evict the buffer and free that memory.

On the cuda backend, pass torch's current stream to ``access(stream=...)`` so that the
restore is ordered before torch's kernels and eviction waits for them.
Without torch installed, this example says so and exits with status 0.
"""

from __future__ import annotations

import os
import sys
from typing import Any

try:
    import gpu_backup as gb
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gpu_backup as gb

N_BUFFERS = 6
BUFFER_BYTES = 4 << 20
BUDGET = 12 << 20


def torch_stream(mgr: gb.BufferManager, torch: Any) -> Any:
    """The stream torch's work runs on, as the manager's backend understands it."""
    if mgr.backend.name != "cuda":
        return None   # host backend: work runs on the calling thread
    import cupy

    dev = mgr.backend.device_id
    s = torch.cuda.current_stream(dev)
    with cupy.cuda.Device(dev):   # from_external reads the device from the current one
        if hasattr(cupy.cuda.Stream, "from_external") and hasattr(s, "__cuda_stream__"):
            return cupy.cuda.Stream.from_external(s)
        import warnings

        with warnings.catch_warnings():   # ExternalStream is deprecated in CuPy 14
            warnings.simplefilter("ignore", DeprecationWarning)
            return cupy.cuda.ExternalStream(s.cuda_stream, dev)


def main() -> int:
    try:
        import torch
    except ImportError:
        print("torch_dlpack_example: PyTorch is not installed (pip install torch); "
              "nothing to show. Exiting with status 0.")
        return 0

    with gb.BufferManager("auto", device_limit=BUDGET) as mgr:
        print(f"backend: {mgr.backend.name} ({mgr.backend.reason}); torch {torch.__version__}")
        if mgr.backend.name == "host":
            print("(host backend: tensors are CPU tensors over RAM that emulates device memory)")
        stream = torch_stream(mgr, torch)
        n = BUFFER_BYTES // 4
        bufs = [mgr.alloc(BUFFER_BYTES) for _ in range(N_BUFFERS)]
        for i, buf in enumerate(bufs):
            with buf.access("w", stream=stream) as arr:
                t = torch.from_dlpack(arr).view(torch.float32)   # zero-copy, same memory
                t.copy_(torch.arange(n, dtype=torch.float32, device=t.device) + i)
                del t                                            # not valid after the block
        # More buffers than the budget: the first ones have been evicted by now.
        print(f"{N_BUFFERS} x {BUFFER_BYTES:,} B under a {BUDGET:,} B budget; states: "
              + ", ".join(b.state.value for b in bufs))

        for i, buf in enumerate(bufs):
            with buf.access("rw", stream=stream) as arr:         # restored if evicted
                t = torch.from_dlpack(arr).view(torch.float32)
                t.mul_(2)
                total = float(t.sum(dtype=torch.float64))
                del t
            want = 2.0 * (n * (n - 1) / 2 + i * n)
            assert total == want, f"buffer {i}: sum {total}, expected {want}"
        s = mgr.stats()
        print(f"all {N_BUFFERS} buffers verified from torch; {s['evictions']} evictions, "
              f"{s['restores']} restores")
        for buf in bufs:
            buf.free()
    return 0


if __name__ == "__main__":
    sys.exit(main())

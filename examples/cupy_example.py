"""Hold more GPU buffers than a device budget allows, with a CuPy workload.

Run from the repo root:  python3 examples/cupy_example.py

Eight 8 MiB buffers share a 32 MiB device budget: each time one is used, the manager
evicts the least recently used idle ones into the host store, and restores a buffer,
bit-exact, when it is accessed again.  On a machine without a usable GPU the same code
runs on the host backend (device memory emulated in RAM; ``access()`` yields numpy
arrays instead of cupy arrays) and says so.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

try:
    import gpu_backup as gb
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gpu_backup as gb

N_BUFFERS = 8
BUFFER_BYTES = 8 << 20
BUDGET = 32 << 20


def array_module(mgr: gb.BufferManager) -> Any:
    """cupy on the cuda backend, numpy on the host backend."""
    if mgr.backend.name == "cuda":
        import cupy
        return cupy
    return np


def main() -> int:
    with gb.BufferManager("auto", device_limit=BUDGET) as mgr:
        xp = array_module(mgr)
        print(f"backend: {mgr.backend.name} ({mgr.backend.reason})")
        if mgr.backend.name == "host":
            print("(host backend: device memory is emulated in RAM; no GPU is used)")

        # Buffers hold float32 vectors: the manager deals in bytes; view them as you like.
        bufs = [mgr.alloc(BUFFER_BYTES) for _ in range(N_BUFFERS)]
        n = BUFFER_BYTES // 4
        for i, buf in enumerate(bufs):
            with buf.access("w") as raw:          # "w": every byte is overwritten, nothing restored
                x = raw.view(xp.float32)
                x[:] = xp.arange(n, dtype=xp.float32) * (i + 1)
        print(f"{N_BUFFERS} x {BUFFER_BYTES:,} B allocated under a {BUDGET:,} B budget: "
              f"{mgr.device_bytes:,} B on the device, {mgr.store.bytes_used:,} B in the store")

        # Use them in turn: each access restores the buffer if it was evicted.
        for step in range(2):
            for i, buf in enumerate(bufs):
                with buf.access("rw") as raw:      # the array is valid only inside the block
                    x = raw.view(xp.float32)
                    x *= 2
                    first = float(x[1])            # a device -> host copy on cuda
                assert first == (i + 1) * 2.0 ** (step + 1), (i, step, first)

        # Check every buffer on the host.
        for i, buf in enumerate(bufs):
            got = buf.to_host().view(np.float32)
            want = np.arange(n, dtype=np.float32) * (i + 1) * 4
            assert np.array_equal(got, want), f"buffer {i} differs"
        s = mgr.stats()
        print(f"all {N_BUFFERS} buffers verified; {s['evictions']} evictions, "
              f"{s['restores']} restores, {s['bytes_copied_out']:,} B copied out, "
              f"{s['bytes_copied_in']:,} B copied in")
        for buf in bufs:
            buf.free()
    return 0


if __name__ == "__main__":
    sys.exit(main())

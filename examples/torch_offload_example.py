"""Train a small model with its activations in gpu_backup buffers, under a device limit
smaller than the activations, and check the losses against training without offload.

Run from the repo root:  python3 examples/torch_offload_example.py [--device auto|host|cuda]
                                                                   [--steps N]

Both runs start from the same weights and see the same batches on the same device; the
losses must be identical bit for bit (the example exits with status 1 if not).  The
manager's ``device_limit`` is a third of the bytes autograd saves in one step, so the
oldest saved tensors are evicted during the forward pass and restored in the backward
pass.  On the host backend the tensors are CPU tensors and "device" memory is host RAM.
Without torch installed, this example says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # deterministic cuBLAS on a GPU

try:
    import gpu_backup as gb
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gpu_backup as gb

SEED = 0
LR = 0.05


def sizes(backend: str) -> dict[str, int]:
    """A model whose saved activations are a few MiB on host and ~100 MiB on a GPU."""
    if backend == "cuda":
        return {"batch": 1024, "width": 1024, "depth": 12}
    return {"batch": 64, "width": 256, "depth": 6}


def make_model(torch: Any, width: int, depth: int, device: Any) -> Any:
    torch.manual_seed(SEED)
    layers: list[Any] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.LayerNorm(width)]
    layers.append(torch.nn.Linear(width, 10))
    return torch.nn.Sequential(*layers).to(device)


def batches(torch: Any, n: int, batch: int, width: int, device: Any) -> list[tuple[Any, Any]]:
    g = torch.Generator().manual_seed(SEED + 1)
    return [(torch.randn(batch, width, generator=g).to(device),
             torch.randint(0, 10, (batch,), generator=g).to(device)) for _ in range(n)]


def train(torch: Any, model: Any, data: list[tuple[Any, Any]], offload: Any = None
          ) -> list[float]:
    """Plain SGD; one loss per step.  ``offload``: a callable returning the context that
    wraps each step's forward and backward pass."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        if offload is None:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
        else:
            with offload():
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto (cuda if usable), cuda or host")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    try:
        import torch

        import gpu_backup.torch as gbt
    except ImportError:
        print("torch_offload_example: PyTorch is not installed (pip install 'gpu-backup[torch]'); "
              "nothing to show. Exiting with status 0.")
        return 0
    torch.use_deterministic_algorithms(True)

    # The backend first (to size the model), then a manager with a limit set from it.
    with gb.BufferManager(args.device) as probe:
        backend, reason = probe.backend.name, probe.backend.reason
        device = gbt.torch_device(probe)
    if backend == "cuda" and not torch.cuda.is_available():
        print(f"backend cuda, but this torch has no CUDA ({torch.__version__}); use --device host")
        return 1
    s = sizes(backend)
    min_bytes = s["batch"] * s["width"] * 4 // 2          # every activation, not the biases
    data = batches(torch, args.steps, s["batch"], s["width"], device)
    model, (x, y) = make_model(torch, s["width"], s["depth"], device), data[0]
    act = gbt.saved_bytes(lambda: torch.nn.functional.cross_entropy(model(x), y),
                          min_bytes=min_bytes)
    limit = act // 3
    print(f"backend: {backend} ({reason}); torch {torch.__version__} on {device}")
    if backend == "host":
        print("(host backend: CPU tensors; 'device' memory is host RAM, and nothing here is a "
              "GPU figure)")
    print(f"model: {s['depth']} blocks of width {s['width']}, batch {s['batch']}; autograd saves "
          f"{act:,} B per step; device_limit {limit:,} B")

    ref = train(torch, make_model(torch, s["width"], s["depth"], device), data)
    with gb.BufferManager(args.device, device_limit=limit) as mgr:
        got = train(torch, make_model(torch, s["width"], s["depth"], device), data,
                    offload=lambda: gbt.offload_saved_tensors(mgr, min_bytes=min_bytes))
        st = mgr.stats()
    for i, (a, b) in enumerate(zip(ref, got)):
        print(f"step {i}: loss {a:.9g} without offload, {b:.9g} with ({b.hex()})")
    print(f"offload: {st['evictions']} evictions, {st['restores']} restores, peak "
          f"{st['peak_device_bytes']:,} B of buffers under the {limit:,} B limit; "
          f"{st['buffers']} buffers left")
    if ref != got:
        print("losses DIFFER")
        return 1
    if st["evictions"] == 0 or st["buffers"] != 0:
        print("expected evictions under the limit and no buffer left after training")
        return 1
    print(f"losses identical bit for bit over {len(ref)} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())

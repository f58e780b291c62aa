"""Issue 13's benchmark: a training step whose saved activations exceed a device limit, with
``offload_saved_tensors`` against ``torch.autograd.graph.save_on_cpu(pin_memory=True)``
and against no offload.

Run from the repo root:  python3 benchmarks/bench_torch.py [--device auto|host|cuda]
                         [--batch N --width N --depth N] [--steps 5] [--limit 0.5]
                         [--json PATH]

The measuring is :mod:`gpu_backup.bench.torchstep` (``gpu-backup bench`` runs the same
thing as its ``torch_step`` step); this is its command line.  Modes: ``none``,
``save_on_cpu``, ``offload_fits`` (no device limit: nothing evicted) and ``offload``
(``device_limit`` = ``--limit`` x the bytes autograd saves per step).  Per mode: median
step time, peak device memory, pinned host memory, evictions and restores, and whether
the losses match ``none`` bit for bit; then the issue's goals, evaluated from these
numbers.  On the host backend every row says ``backend: host``: these are never GPU
figures.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # deterministic cuBLAS

try:
    from gpu_backup.bench import torchstep
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from gpu_backup.bench import torchstep

MODES = torchstep.MODES
SIZES = torchstep.SIZES
run = torchstep.run


def _fmt(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--depth", type=int)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--limit", type=float, default=0.5)
    ap.add_argument("--json", help="write the rows, with the machine and versions, here")
    args = ap.parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("bench_torch: PyTorch is not installed (pip install 'gpu-backup[torch]'); nothing to run.")
        return 0
    device: Any = int(args.device) if args.device.isdigit() else args.device
    rows = run(device, batch=args.batch, width=args.width, depth=args.depth, steps=args.steps,
               warmup=args.warmup, limit=args.limit)
    r0 = rows[0]
    print(f"backend: {r0['backend']} ({r0['backend_reason']}); device: {r0['device']}; "
          f"torch {r0['torch']}")
    if r0["backend"] == "host":
        print("host backend: CPU tensors over host RAM; these are host figures, not GPU figures; "
              "torch's CPU memory is not measured and nothing is pinned")
    print(f"model: depth {r0['depth']}, width {r0['width']}, batch {r0['batch']}; saved per step "
          f"{_fmt(r0['saved_bytes_per_step'])}; offload limit "
          f"{_fmt(next(r['device_limit'] for r in rows if r['mode'] == 'offload'))}")
    print(f"{'mode':<13} {'step ms':>9} {'x none':>7} {'peak device':>13} {'buffers':>11} "
          f"{'pinned':>11} {'evict':>6} {'restore':>7}  same losses")
    for r in rows:
        ratio = "-" if r["ratio_to_none"] is None else f"{r['ratio_to_none']:.2f}"
        print(f"{r['mode']:<13} {r['step_s'] * 1e3:>9.1f} {ratio:>7} {_fmt(r['peak_device_bytes']):>13} "
              f"{_fmt(r['buffers_peak_bytes']):>11} {_fmt(r['pinned_host_bytes']):>11} "
              f"{r['evictions']:>6} {r['restores']:>7}  {r['same_losses_as_none']}")
    goals = torchstep.goals(rows)
    print("goals" + (" (host figures)" if r0["backend"] == "host" else "") + ":")
    for g in goals:
        met = {True: "met", False: "MISSED", None: "n/a"}[g["met"]]
        value = "" if g["value"] is None else f": {g['value']:.3g} {g['unit']}"
        print(f"  [{met}] {g['text']}{value} ({g['detail']})")
    if args.json:
        from gpu_backup.bench import machine, now_iso, versions, write_json

        write_json({"benchmark": "bench_torch", "date": now_iso(), "machine": machine(),
                    "versions": versions(), "results": rows, "goals": goals}, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

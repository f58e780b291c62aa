"""Issue 13's benchmark: a training step whose saved activations exceed a device limit, with
``offload_saved_tensors`` against ``torch.autograd.graph.save_on_cpu(pin_memory=True)``
and against no offload.

Run from the repo root:  python3 benchmarks/bench_torch.py [--device auto|host|cuda]
                         [--batch N --width N --depth N] [--steps 5] [--limit 0.5]
                         [--json PATH]

Modes, each on its own copy of one model (same seed, same batches), their steps
interleaved so that every mode sees the same machine noise:

- ``none``: plain autograd (where it fits: on a GPU everything saved stays in torch's memory);
- ``save_on_cpu``: every saved tensor copied to pinned host memory and back;
- ``offload_fits``: ``offload_saved_tensors`` with no device limit (nothing is evicted;
  the price of the device-to-device copies alone);
- ``offload``: ``offload_saved_tensors`` with ``device_limit`` = ``--limit`` x the bytes
  autograd saves per step (the oldest saved tensors are evicted, then restored).

Per mode: median step time (forward, backward, optimizer step, synchronised), the step's
peak device memory (torch's allocations above the step's start plus the manager's
buffers), pinned host memory (torch's pinned allocator for ``save_on_cpu``; the staging
ring for ``offload``), evictions and restores, and whether the losses match ``none`` bit
for bit.  On the host backend tensors are CPU tensors, "device" memory is host RAM, torch's
CPU memory is not measured, nothing is pinned, and every row says ``backend: host``: these
are never GPU figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # deterministic cuBLAS

try:
    import gpu_backup as gb
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gpu_backup as gb

MODES = ("none", "save_on_cpu", "offload_fits", "offload")
SIZES = {"cuda": {"batch": 4096, "width": 4096, "depth": 12},
         "host": {"batch": 128, "width": 256, "depth": 6}}


def _model(torch: Any, width: int, depth: int, device: Any, seed: int) -> Any:
    torch.manual_seed(seed)
    layers: list[Any] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.LayerNorm(width)]
    layers.append(torch.nn.Linear(width, 10))
    return torch.nn.Sequential(*layers).to(device)


def _saved_bytes(torch: Any, model: Any, x: Any, y: Any, min_bytes: int) -> int:
    total = 0

    def pack(t: Any) -> Any:
        nonlocal total
        n = t.numel() * t.element_size()
        total += n if n >= min_bytes else 0
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.nn.functional.cross_entropy(model(x), y)
    return total


class _Mode:
    """One mode's model, optimizer, context and measurements."""

    def __init__(self, torch: Any, name: str, model: Any, ctx: Any, mgr: Any) -> None:
        self.torch, self.name, self.model, self.ctx, self.mgr = torch, name, model, ctx, mgr
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01)
        self.times: list[float] = []
        self.losses: list[float] = []
        self.torch_peak = 0

    def step(self, x: Any, y: Any, cuda: bool, timed: bool) -> None:
        torch = self.torch
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with self.ctx():
            loss = torch.nn.functional.cross_entropy(self.model(x), y)
            loss.backward()
        self.opt.step()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if cuda:
            self.torch_peak = max(self.torch_peak, torch.cuda.max_memory_allocated() - base)
        if timed:
            self.times.append(dt)
        self.losses.append(loss.item())


def run(device: Any = "auto", *, batch: int | None = None, width: int | None = None,
        depth: int | None = None, steps: int = 5, warmup: int = 1, limit: float = 0.5,
        seed: int = 0, modes: tuple[str, ...] = MODES) -> list[dict[str, Any]]:
    """Run the modes and return one result row (a dict) per mode; see the module doc.

    ``device`` is a :class:`gpu_backup.BufferManager` device (``"auto"``, ``"cuda"``, N,
    ``"host"``).  ``batch``/``width``/``depth`` default per backend (:data:`SIZES`).
    ``limit`` is the ``offload`` mode's device limit as a fraction of the bytes saved per
    step.  Raises ``ImportError`` without torch.
    """
    import torch

    import gpu_backup.torch as gbt

    bad = set(modes) - set(MODES)
    if bad or not 0 < limit <= 1 or steps < 1 or warmup < 0:
        raise ValueError(f"modes must be among {MODES} (got {sorted(bad)}), 0 < {limit=} <= 1, "
                         f"{steps=} >= 1, {warmup=} >= 0")
    with gb.BufferManager(device) as probe:
        backend, reason = probe.backend.name, probe.backend.reason
        dev = gbt.torch_device(probe)
        device_name = probe.backend.device_name
        dev_arg = "host" if backend == "host" else probe.backend.device_id
    cuda = backend == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(f"the manager found a GPU but torch {torch.__version__} has no CUDA")
    s = {**SIZES[backend], **{k: v for k, v in (("batch", batch), ("width", width),
                                                ("depth", depth)) if v is not None}}
    min_bytes = s["batch"] * s["width"] * 4 // 2
    g = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(s["batch"], s["width"], generator=g).to(dev),
             torch.randint(0, 10, (s["batch"],), generator=g).to(dev))
            for _ in range(warmup + steps)]
    saved = _saved_bytes(torch, _model(torch, s["width"], s["depth"], dev, seed), *data[0], min_bytes)
    device_limit = max(1, int(saved * limit))
    staging = gb.Staging()
    ring_bytes = staging.slots * staging.slot_bytes
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    managers: list[Any] = []
    try:
        runs = []
        for name in modes:
            mgr = None
            if name == "none":
                def ctx() -> Any:
                    return _nullcontext()
            elif name == "save_on_cpu":
                def ctx() -> Any:
                    return torch.autograd.graph.save_on_cpu(pin_memory=True)
            else:
                mgr = gb.BufferManager(dev_arg, staging=staging,
                                       device_limit=None if name == "offload_fits" else device_limit)
                managers.append(mgr)

                def ctx(mgr: Any = mgr) -> Any:
                    return gbt.offload_saved_tensors(mgr, min_bytes=min_bytes)
            runs.append(_Mode(torch, name, _model(torch, s["width"], s["depth"], dev, seed), ctx, mgr))
        for i, (x, y) in enumerate(data):
            for m in runs:
                m.step(x, y, cuda, timed=i >= warmup)
        base = next((m for m in runs if m.name == "none"), None)
        rows = []
        for m in runs:
            st = m.mgr.stats() if m.mgr is not None else {}
            buffers_peak = st.get("peak_device_bytes", 0)
            if m.name == "save_on_cpu":
                pinned = _torch_pinned_peak(torch) if cuda else 0
            else:
                pinned = ring_bytes if (cuda and m.mgr is not None) else 0
            step_s = statistics.median(m.times)
            rows.append({
                "scenario": "torch_step", "mode": m.name, "backend": backend,
                "backend_reason": reason, "device": device_name if cuda else "host",
                "torch": torch.__version__, **s, "steps": steps, "step_s": step_s,
                "step_times_s": m.times,
                "ratio_to_none": step_s / statistics.median(base.times) if base else None,
                "saved_bytes_per_step": saved, "min_bytes": min_bytes,
                "device_limit": device_limit if m.name == "offload" else None,
                "torch_step_peak_bytes": m.torch_peak if cuda else None,
                "buffers_peak_bytes": buffers_peak,
                "peak_device_bytes": (m.torch_peak + buffers_peak) if cuda else None,
                "pinned_host_bytes": pinned,
                "evictions": st.get("evictions", 0), "restores": st.get("restores", 0),
                "losses": m.losses,
                "same_losses_as_none": (m.losses == base.losses) if base else None,
            })
        return rows
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        for mgr in managers:
            mgr.close()


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _torch_pinned_peak(torch: Any) -> int | None:
    """Peak bytes of torch's pinned host allocator (active + cached), where torch reports it."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None:
        return None
    return int(stats().get("allocated_bytes.all.peak", stats().get("allocated_bytes.peak", 0))) or None


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
    if args.json:
        from gpu_backup.bench import machine, now_iso, versions, write_json

        write_json({"benchmark": "bench_torch", "date": now_iso(), "machine": machine(),
                    "versions": versions(), "results": rows}, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

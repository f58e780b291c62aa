"""The ``torch_step`` scenario: a training step whose saved activations exceed a device
limit, with ``offload_saved_tensors`` against ``torch.autograd.graph.save_on_cpu(pin_memory=True)``
and against no offload.

Modes, each on its own copy of one model (same seed, same batches), their steps
interleaved so that every mode sees the same machine noise:

- ``none``: plain autograd (where it fits: on a GPU everything saved stays in torch's memory);
- ``save_on_cpu``: every saved tensor copied to pinned host memory and back;
- ``offload_fits``: ``offload_saved_tensors`` with no device limit (nothing is evicted;
  the price of the device-to-device copies alone);
- ``offload``: ``offload_saved_tensors`` with ``device_limit`` = ``limit`` x the bytes
  autograd saves per step (the oldest saved tensors are evicted, then restored).

Per mode (one row each): median step time (forward, backward, optimizer step,
synchronised), the step's peak device memory (torch's allocations above the step's start
plus the manager's buffers), pinned host memory (``save_on_cpu``: the peak of torch's
pinned blocks in use during the run, not counting its cache, so a lower bound of what it
pins; the offload modes: their staging ring), evictions and restores, and
whether the losses match ``none`` bit for bit.  On the host backend tensors are CPU
tensors, "device" memory is host RAM, torch's CPU memory is not measured, nothing is
pinned, and every row says ``backend: host``: these are never GPU figures.

Used by ``gpu-backup bench`` (its ``torch_step`` step, once per run) and by
``benchmarks/bench_torch.py``.  torch is imported inside the functions only.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Any

from ..manager import BufferManager
from .report import goal as _goal
from ..staging import Staging

__all__ = ["MODES", "SIZES", "QUICK_SIZES", "QUICK_STEPS", "OFFLOAD_FITS_GOAL", "run",
           "sizes_for", "estimate_needs", "goals", "unusable"]

MODES = ("none", "save_on_cpu", "offload_fits", "offload")
SIZES: dict[str, dict[str, int]] = {"cuda": {"batch": 4096, "width": 4096, "depth": 12},
                                    "host": {"batch": 128, "width": 256, "depth": 6}}
"""Model and batch per backend: on cuda the saved activations (about 2.3 GiB a step)
dwarf the staging ring; on host a step takes milliseconds."""
QUICK_SIZES: dict[str, dict[str, int]] = {"cuda": {"batch": 2048, "width": 2048, "depth": 8},
                                          "host": {"batch": 64, "width": 128, "depth": 3}}
"""``gpu-backup bench --quick``: a step takes about a millisecond on host."""
QUICK_STEPS = 3
OFFLOAD_FITS_GOAL = 1.1
"""``offload_fits`` step time at most this many times ``none``'s (nothing to evict)."""


def sizes_for(backend: str, quick: bool = False) -> dict[str, int]:
    """``batch``/``width``/``depth`` for a backend name (``"cuda"`` or ``"host"``)."""
    return dict((QUICK_SIZES if quick else SIZES)[backend])


def estimate_needs(batch: int, width: int, depth: int, *, steps: int, warmup: int,
                   on_host: bool, staging: Staging) -> tuple[int, int]:
    """Approximate peak (device, host) bytes of :func:`run` with these sizes.

    Device: four models with their gradients, the batches, and twice the saved
    activations of a step (autograd's plus the offload buffers' copies).  Host: the saved
    activations twice (``save_on_cpu``'s pinned copies, the ``offload`` store) and one
    staging ring per offload mode.  On the host backend device memory is host memory.
    """
    f32 = 4
    saved = 3 * depth * batch * width * f32
    params = len(MODES) * 2 * (depth * (width * width + 3 * width) + 11 * width) * f32
    data = (steps + warmup) * batch * (width + 2) * f32
    dev = params + data + 2 * saved
    host = 2 * saved + 2 * staging.slots * staging.slot_bytes
    if on_host:
        host += dev
    return dev, host


def unusable(backend: Any) -> str | None:
    """None when the torch step can run on this backend (``BufferManager.backend``),
    else why not: torch absent, or a cuda backend with a torch build without CUDA."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install 'gpu-backup[torch]')"
    if backend.name != "cuda":
        return None
    try:
        import torch

        if not torch.cuda.is_available():
            return (f"the backend is cuda but torch {torch.__version__} has no usable CUDA "
                    "(torch.cuda.is_available() is False)")
    except Exception as e:  # noqa: BLE001 - a broken torch is a reason to skip, not to fail
        return f"importing torch failed: {e!r}"
    return None


# ---------------------------------------------------------------------- run
def _model(torch: Any, width: int, depth: int, device: Any, seed: int) -> Any:
    torch.manual_seed(seed)
    layers: list[Any] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.LayerNorm(width)]
    layers.append(torch.nn.Linear(width, 10))
    return torch.nn.Sequential(*layers).to(device)


LR = 0.01


class _Mode:
    """One mode's model, context and measurements.  The manager (if any) is owned by
    :func:`_measure`, which closes it.

    The optimizer step is plain SGD written out (``p -= lr * grad``, as
    ``torch.optim.SGD`` without momentum does it): ``torch.optim``'s constructor imports
    torch's compiler stack, a second or more on a small machine, for nothing here."""

    def __init__(self, torch: Any, name: str, model: Any, ctx: Any, mgr: Any) -> None:
        self.torch, self.name, self.model, self.ctx, self.mgr = torch, name, model, ctx, mgr
        self.params = list(model.parameters())
        self.times: list[float] = []
        self.losses: list[float] = []
        self.torch_peak = 0

    def step(self, x: Any, y: Any, cuda: bool, timed: bool) -> None:
        torch, dev = self.torch, x.device
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        t0 = time.perf_counter()
        for p in self.params:
            p.grad = None
        with self.ctx():
            loss = torch.nn.functional.cross_entropy(self.model(x), y)
            loss.backward()
        with torch.no_grad():
            for p in self.params:
                p.add_(p.grad, alpha=-LR)
        if cuda:
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        if cuda:
            self.torch_peak = max(self.torch_peak, torch.cuda.max_memory_allocated(dev) - base)
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
    step.  Every manager it opens it closes.  On cuda it enables torch's deterministic
    algorithms for the run (and sets ``CUBLAS_WORKSPACE_CONFIG`` if unset), so that the
    losses can be compared bit for bit.  Raises ``ImportError`` without torch,
    ``ValueError`` for bad arguments, ``RuntimeError`` for a cuda backend with a torch
    build without CUDA.
    """
    bad = set(modes) - set(MODES)
    if bad or not modes or not 0 < limit <= 1 or steps < 1 or warmup < 0:
        raise ValueError(f"modes must be among {MODES} (got {sorted(bad) or list(modes)}), "
                         f"0 < {limit=} <= 1, {steps=} >= 1, {warmup=} >= 0")
    for k, v in (("batch", batch), ("width", width), ("depth", depth)):
        if v is not None and v < 1:
            raise ValueError(f"{k}={v} must be >= 1")
    import torch

    import gpu_backup.torch as gbt

    with BufferManager(device) as probe:
        backend, reason = probe.backend.name, probe.backend.reason
        dev = gbt.torch_device(probe)
        device_name = probe.backend.device_name
        dev_arg = "host" if backend == "host" else probe.backend.device_id
    cuda = backend == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(f"the manager found a GPU but torch {torch.__version__} has no CUDA")
    s = {**SIZES[backend], **{k: v for k, v in (("batch", batch), ("width", width),
                                                ("depth", depth)) if v is not None}}
    # CPU kernels are deterministic already; on cuda, ask torch (and cuBLAS) for it.  Only
    # there: the switch imports torch's compiler stack, seconds on a small machine.
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        rows = _measure(torch, gbt, dev, dev_arg, cuda, s, steps=steps, warmup=warmup,
                        limit=limit, seed=seed, modes=modes)
    finally:
        if cuda:
            torch.use_deterministic_algorithms(was_deterministic)
            torch.cuda.empty_cache()     # the models and batches are gone: give the blocks back
    for r in rows:
        r.update(backend=backend, backend_reason=reason,
                 device=device_name if cuda else "host")
    return rows


def _measure(torch: Any, gbt: Any, dev: Any, dev_arg: Any, cuda: bool, s: dict[str, int], *,
             steps: int, warmup: int, limit: float, seed: int,
             modes: tuple[str, ...]) -> list[dict[str, Any]]:
    """The rows of :func:`run` (less the backend fields).  Owns the models, the batches
    and the offload modes' managers: the managers are closed here, the rest dropped on
    return."""
    min_bytes = s["batch"] * s["width"] * 4 // 2
    g = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(s["batch"], s["width"], generator=g).to(dev),
             torch.randint(0, 10, (s["batch"],), generator=g).to(dev))
            for _ in range(warmup + steps)]
    from ..torch import saved_bytes

    x0, y0 = data[0]
    model0 = _model(torch, s["width"], s["depth"], dev, seed)
    saved = saved_bytes(lambda: torch.nn.functional.cross_entropy(model0(x0), y0),
                         min_bytes=min_bytes)
    device_limit = max(1, int(saved * limit))
    staging = Staging()
    ring_bytes = staging.slots * staging.slot_bytes
    managers: list[BufferManager] = []
    pinned_start = _pinned_start(torch) if cuda else None
    try:
        runs = []
        for name in modes:
            mgr = None
            if name == "none":
                ctx: Any = contextlib.nullcontext
            elif name == "save_on_cpu":
                def ctx() -> Any:
                    return torch.autograd.graph.save_on_cpu(pin_memory=True)
            else:
                mgr = BufferManager(dev_arg, staging=staging,
                                    device_limit=None if name == "offload_fits" else device_limit)
                managers.append(mgr)

                def ctx(mgr: Any = mgr) -> Any:
                    return gbt.offload_saved_tensors(mgr, min_bytes=min_bytes)
            runs.append(_Mode(torch, name, _model(torch, s["width"], s["depth"], dev, seed),
                              ctx, mgr))
        for i, (x, y) in enumerate(data):
            for m in runs:
                m.step(x, y, cuda, timed=i >= warmup)
        base = next((m for m in runs if m.name == "none"), None)
        rows = []
        for m in runs:
            st = m.mgr.stats() if m.mgr is not None else {}
            buffers_peak = st.get("peak_device_bytes", 0)
            if m.name == "save_on_cpu":
                pinned = _pinned_peak(torch, pinned_start) if cuda else 0
            else:
                pinned = ring_bytes if (cuda and m.mgr is not None) else 0
            step_s = statistics.median(m.times)
            rows.append({
                "scenario": "torch_step", "mode": m.name, "backend": None,
                "backend_reason": None, "device": None,
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
        for mgr in managers:
            mgr.close()


def _pinned_start(torch: Any) -> int | None:
    """Reset the peak of torch's pinned host allocator; the bytes handed out now (blocks
    that earlier work still holds), or None where this torch does not report them."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    reset = getattr(torch.cuda, "reset_peak_host_memory_stats", None)
    if stats is None or reset is None:
        return None
    reset()
    return int(stats().get("active_bytes.current", 0))


def _pinned_peak(torch: Any, start: int | None) -> int | None:
    """Peak pinned bytes handed out by torch's allocator since :func:`_pinned_start`
    (``active_bytes``: blocks in use, not its cache, so earlier work's cached blocks do
    not count and reused ones do), or None where this torch does not report them."""
    if start is None:
        return None
    peak = torch.cuda.host_memory_stats().get("active_bytes.peak")
    return None if peak is None else max(0, int(peak) - start)


# -------------------------------------------------------------------- goals
def _ms(r: dict[str, Any]) -> str:
    return f"{r['mode']} {r['step_s'] * 1e3:.3g} ms"


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 13's goals, from the rows of one :func:`run` (``met`` None where the modes
    they compare did not run or a figure is not measured on this backend):

    - ``offload_fits`` step time within :data:`OFFLOAD_FITS_GOAL` x ``none``'s;
    - ``offload`` (evicting) faster than ``save_on_cpu``;
    - ``offload`` pins less host memory than ``save_on_cpu``;
    - every mode's losses equal ``none``'s, bit for bit.
    """
    by = {r["mode"]: r for r in rows}
    out = []
    fits, none = by.get("offload_fits"), by.get("none")
    if fits and none:
        value, detail = fits["step_s"] / none["step_s"], f"{_ms(fits)} vs {_ms(none)}"
    else:
        value, detail = None, "not evaluated: offload_fits or none did not run"
    out.append(_goal("torch_offload_fits_vs_none",
                     f"torch_step: offload_fits step time <= {OFFLOAD_FITS_GOAL}x none "
                     "(nothing evicted)", value, OFFLOAD_FITS_GOAL, "<=", "x none", detail))
    off, soc = by.get("offload"), by.get("save_on_cpu")
    if off and soc:
        value = off["step_s"] / soc["step_s"]
        detail = f"{_ms(off)} ({off['evictions']} evictions) vs {_ms(soc)}"
    else:
        value, detail = None, "not evaluated: offload or save_on_cpu did not run"
    out.append(_goal("torch_offload_vs_save_on_cpu_time",
                     "torch_step: offload (evicting) faster than save_on_cpu",
                     value, 1.0, "<=", "x save_on_cpu", detail))
    value = None
    if not (off and soc):
        detail = "not evaluated: offload or save_on_cpu did not run"
    elif off["backend"] != "cuda":
        detail = "not evaluated: the host backend pins nothing"
    elif not soc["pinned_host_bytes"]:
        detail = "not evaluated: this torch does not report its pinned memory"
    else:
        value = off["pinned_host_bytes"] / soc["pinned_host_bytes"]
        detail = (f"offload {off['pinned_host_bytes'] / 2**20:,.0f} MiB (the staging ring) vs "
                  f"save_on_cpu {soc['pinned_host_bytes'] / 2**20:,.0f} MiB")
    out.append(_goal("torch_offload_vs_save_on_cpu_pinned",
                     "torch_step: offload pins less host memory than save_on_cpu",
                     value, 1.0, "<=", "x save_on_cpu", detail))
    if none:
        differ = [r["mode"] for r in rows if r["same_losses_as_none"] is False]
        value = float(len(differ))
        detail = ("every mode's losses equal none's" if not differ
                  else "losses differ from none in: " + ", ".join(differ))
    else:
        value, detail = None, "not evaluated: none did not run"
    out.append(_goal("torch_same_losses", "torch_step: same losses as none, bit for bit",
                     value, 0.0, "<=", "modes differing", detail))
    return out

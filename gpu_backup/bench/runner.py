"""``gpu-backup bench``: plan which sizes fit, run every scenario in one process, and
assemble the JSON document (results, skipped scenarios, summary of the goals)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .._os import host_memory
from ..manager import BufferManager
from ..staging import Staging
from ..store import PAGE_SIZE, ShmemStore
from . import scenarios as sc
from .env import machine, now_iso, versions
from .report import HOST_NOTE, summarize
from .sizes import SizeError, fmt_bytes, fmt_size

__all__ = ["BenchConfig", "Progress", "FULL_SIZES", "QUICK_SIZES", "PAGE_AT_A_TIME_CAP",
           "device_arg", "run_bench"]

FULL_SIZES = (64 << 10, 1 << 20, 16 << 20, 256 << 20, 1 << 30)
QUICK_SIZES = (64 << 10, 1 << 20, 16 << 20)
PAGE_AT_A_TIME_CAP = 16 << 20
"""Largest size ``page_at_a_time`` runs at: it is slow (one copy call per 4 KiB)."""
SMALL = 1 << 20
"""Sizes up to this run ``SMALL_FACTOR`` times the repeats: one operation takes microseconds."""
SMALL_FACTOR = 10
OVERSUB_MIN = 1 << 20
HOST_FRACTION = 0.8
"""Share of the available host memory (RAM + free swap) the bench plans to use at most."""


@dataclass(frozen=True)
class BenchConfig:
    """What to run.  ``sizes``/``repeat``/``touches`` None: the defaults for ``quick``."""

    device: Any = "auto"
    sizes: tuple[int, ...] | None = None
    repeat: int | None = None
    quick: bool = False
    page_size: int = PAGE_SIZE
    staging: Staging = field(default_factory=Staging)
    touches: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.repeat is not None and self.repeat < 1:
            raise ValueError(f"repeat={self.repeat} must be >= 1")
        if self.touches is not None and self.touches < 1:
            raise ValueError(f"touches={self.touches} must be >= 1")
        for s in self.sizes or ():
            if s <= 0 or s % self.page_size:
                raise SizeError(f"size {s:,} B is not a positive multiple of the page size "
                                f"{self.page_size:,} B")

    @property
    def explicit_sizes(self) -> bool:
        return self.sizes is not None

    def size_list(self) -> list[int]:
        return sorted(set(self.sizes or (QUICK_SIZES if self.quick else FULL_SIZES)))

    @property
    def base_repeat(self) -> int:
        return self.repeat if self.repeat is not None else (3 if self.quick else 5)

    def repeats_for(self, size: int) -> int:
        n = self.base_repeat
        return n * SMALL_FACTOR if size <= SMALL else n

    @property
    def touch_count(self) -> int:
        return self.touches if self.touches is not None else (16 if self.quick else 32)


class Progress(Protocol):
    """What the runner reports while it works (the CLI draws a rich progress bar)."""

    def begin(self, total: int, header: str) -> None: ...
    def step(self, description: str) -> None: ...


class _Quiet:
    def begin(self, total: int, header: str) -> None:
        pass

    def step(self, description: str) -> None:
        pass


def device_arg(backend: Any) -> Any:
    """The ``device=`` that opens this backend's device again (for the extra managers)."""
    return "host" if backend.name == "host" else backend.device_id


def torch_unusable(backend: Any) -> str | None:
    """None when the torch scenario can run, else why not."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    if backend.name != "cuda":
        return f"the backend is {backend.name}, not cuda (torch's copies need a GPU)"
    try:
        import torch
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False"
    except Exception as e:  # noqa: BLE001 - a broken torch is a reason to skip, not to fail
        return f"importing torch failed: {e!r}"
    return None


# --------------------------------------------------------------------- plan
def _needs(size: int, on_host: bool) -> tuple[int, int, int, int]:
    """Approximate peak (device, host) bytes at one size: the core scenarios, then
    oversubscribe.  Sizes run in increasing order, so the warm store then holds at most
    about twice this size.

    Core: a raw allocation and a gpu_backup buffer on the device; data, pinned buffer,
    pageable copy, its store array and the warm store on the host.
    Oversubscribe: half of 8 buffers on the device, the other half in the store.
    """
    core_dev, core_host = 2 * size, 6 * size
    over_dev = sc.OVERSUB_BUFFERS * size // 2
    over_host = size + over_dev + 2 * size
    if on_host:  # the emulated device is host memory too
        core_host += core_dev
        over_host += over_dev
    return core_dev, core_host, over_dev, over_host


def plan(backend: Any, cfg: BenchConfig) -> tuple[list[int], list[dict[str, Any]], set[int]]:
    """Sizes to run, skipped entries, and the sizes where oversubscribe fits.

    Default sizes that do not fit are skipped with the numbers; an explicitly requested
    size that does not fit raises :class:`SizeError` with the numbers.
    """
    free_dev = backend.mem_info()[0]
    mem = host_memory.read(fresh=True)
    avail_host = int((mem["available"] + mem["swap_free"]) * HOST_FRACTION)
    on_host = backend.name == "host"
    sizes = cfg.size_list()
    run, skipped, over = [], [], set()
    for size in sizes:
        cd, ch, od, oh = _needs(size, on_host)
        why = None
        if cd > free_dev:
            why = (f"needs about {cd:,} B of device memory, {free_dev:,} B free on "
                   f"{backend.device_name}")
        elif ch > avail_host:
            why = (f"needs about {ch:,} B of host memory, {avail_host:,} B usable "
                   f"({HOST_FRACTION:.0%} of available RAM + free swap)")
        if why is not None:
            if cfg.explicit_sizes:
                raise SizeError(f"size {fmt_size(size)} ({size:,} B) is too large for this "
                                f"machine: it {why}")
            skipped.append({"scenario": "all", "size_bytes": size, "reason": why})
            continue
        run.append(size)
        if size < OVERSUB_MIN:
            continue
        if od > free_dev or oh > avail_host:
            skipped.append({"scenario": "oversubscribe", "size_bytes": size, "reason":
                            f"needs about {od:,} B device and {oh:,} B host memory; "
                            f"{free_dev:,} B and {avail_host:,} B usable"})
        else:
            over.add(size)
    if not run:
        raise SizeError("none of the sizes fits on this machine: " +
                        "; ".join(f"{fmt_size(s['size_bytes'])} {s['reason']}" for s in skipped))
    return run, skipped, over


# ---------------------------------------------------------------------- run
def run_bench(cfg: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run every scenario at every size that fits and return the JSON document.

    Raises :class:`SizeError` for an explicitly requested size that cannot fit,
    :class:`scenarios.VerifyError` if bytes do not survive a copy.
    """
    progress = progress or _Quiet()
    ps = cfg.page_size
    rng = np.random.default_rng(cfg.seed)
    sizes_all = cfg.size_list()
    max_size = max(sizes_all)
    with ShmemStore(page_size=ps, warm_slack=2 * max_size) as store, \
            BufferManager(cfg.device, store=store, page_size=ps, staging=cfg.staging) as mgr:
        backend = mgr.backend
        dev_free, dev_total = backend.mem_info()
        sizes, skipped, over = plan(backend, cfg)
        no_torch = torch_unusable(backend)
        if no_torch:
            skipped.append({"scenario": "torch", "size_bytes": None, "reason": no_torch})
        below = [s for s in sizes if s < OVERSUB_MIN]
        if below:
            skipped.append({"scenario": "oversubscribe", "size_bytes": None, "reason":
                            f"runs only for sizes >= {fmt_size(OVERSUB_MIN)}; not run at "
                            f"{', '.join(fmt_size(s) for s in below)}"})
        above = [s for s in sizes if s > PAGE_AT_A_TIME_CAP]
        if above:
            skipped.append({"scenario": "page_at_a_time", "size_bytes": None, "reason":
                            f"capped at {fmt_size(PAGE_AT_A_TIME_CAP)} (one copy call per 4 KiB "
                            f"is slow); not run at {', '.join(fmt_size(s) for s in above)}"})
        steps = sum(5 + (s <= PAGE_AT_A_TIME_CAP) + (s in over) + (no_torch is None)
                    for s in sizes)
        header = (f"backend {backend.name} ({backend.reason}); device {backend.device_name}; "
                  f"sizes {', '.join(fmt_size(s) for s in sizes)}")
        if backend.name == "host":
            header += "\nHOST BACKEND: these will be host figures, NOT GPU figures"
        progress.begin(steps, header)
        results: list[dict[str, Any]] = []
        for size in sizes:
            results += _run_size(mgr, store, cfg, size, size in over, no_torch is None,
                                 rng, progress)
        progress.step("done")
        doc: dict[str, Any] = {
            "device": backend.device_name if backend.name == "cuda" else "host",
            "backend": backend.name,
            "backend_reason": backend.reason,
            "date": now_iso(),
            "versions": versions(),
            "machine": machine(),
            "config": {
                "page_size": ps,
                "staging": {"slots": cfg.staging.slots, "slot_bytes": cfg.staging.slot_bytes,
                            "threads": cfg.staging.threads,
                            "pinned_bytes": cfg.staging.slots * (cfg.staging.slot_bytes // ps * ps)},
                "quick": cfg.quick,
                "sizes": sizes,
                "repeat": cfg.base_repeat,
                "small_size_repeat_factor": SMALL_FACTOR,
                "small_size_max": SMALL,
                "oversubscribe": {"buffers": sc.OVERSUB_BUFFERS, "touches": cfg.touch_count,
                                  "device_limit": "half the buffers' total"},
                "store_warm_slack": store.warm_slack,
                "zero_scan": getattr(mgr, "zero_scan", None),
                "device_memory": {"free": dev_free, "total": dev_total},
                "gbps": "1e9 bytes per second",
            },
            "results": results,
            "skipped": skipped,
        }
        if backend.name == "host":
            doc["host_backend_note"] = HOST_NOTE
    doc["summary"] = summarize(doc["results"], doc["backend"])
    return doc


def _run_size(mgr: BufferManager, store: ShmemStore, cfg: BenchConfig, size: int,
              with_over: bool, with_torch: bool, rng: np.random.Generator,
              progress: Progress) -> list[dict[str, Any]]:
    backend = mgr.backend
    n = cfg.repeats_for(size)
    label = fmt_size(size)
    data = rng.integers(0, 256, size, dtype=np.uint8)
    rec = sc.record
    out: list[dict[str, Any]] = []

    # raw backend copies: the link, page at a time, pageable
    progress.step(f"{label} link (raw d2h/h2d)")
    pat = None
    with sc.raw_buffers(backend, data) as (dev, pin):
        t_d2h, t_h2d = sc.link_times(backend, dev, pin, data, n)
        if size <= PAGE_AT_A_TIME_CAP:
            progress.step(f"{label} page_at_a_time")
            pat = sc.page_at_a_time_times(backend, dev, pin, data, size, n)
        progress.step(f"{label} pageable")
        t_pageable = sc.pageable_times(backend, dev, data, n)
        del dev, pin
    d2h = rec("link_d2h", size, t_d2h, link_gbps=None, direction="d2h",
              note="one pinned buffer, one copy")
    h2d = rec("link_h2d", size, t_h2d, link_gbps=None, direction="h2d",
              note="one pinned buffer, one copy")
    for r in (d2h, h2d):
        r["ratio_to_link"] = 1.0
        r["link_gbps"] = r["gbps"]
    link = {"d2h": d2h["gbps"], "h2d": h2d["gbps"]}
    link["roundtrip"] = sc.roundtrip_gbps(link["d2h"], link["h2d"])
    out += [d2h, h2d]

    progress.step(f"{label} evict/restore (warm store)")
    er = sc.evict_restore_times(mgr, data, n)
    warm_note = None if er.all_warm else "store NOT warm for every repeat (bytes_warm < size)"
    out.append(rec("evict", size, er.evict, link_gbps=link["d2h"], direction="d2h",
                   note=warm_note or "warm store"))
    out.append(rec("restore", size, er.restore, link_gbps=link["h2d"], direction="h2d",
                   note="access('rw') of an evicted buffer"))
    out.append(rec("evict_restore", size, [a + b for a, b in zip(er.evict, er.restore)],
                   link_gbps=link["roundtrip"], direction="roundtrip",
                   note="round trip; link = 1/(1/d2h + 1/h2d)"))
    clean_note = "no copy: backup still valid"
    if er.clean_evictions != len(er.clean):
        clean_note += f" (manager counted {er.clean_evictions} of {len(er.clean)} as clean)"
    out.append(rec("evict_clean", size, er.clean, link_gbps=link["d2h"], direction="d2h",
                   note=clean_note))

    progress.step(f"{label} evict_zero (all-zero buffer, page scan)")
    zero = sc.evict_zero_times(device_arg(backend), store, cfg.page_size, cfg.staging, size, n)
    out.append(rec("evict_zero", size, zero, link_gbps=link["d2h"], direction="d2h",
                   note="all pages zero: found by the page scan, nothing copied"))

    progress.step(f"{label} evict_cold (fresh store)")
    cold = sc.evict_cold_times(device_arg(backend), cfg.page_size, cfg.staging, data,
                               max(1, min(n, 3)))
    out.append(rec("evict_cold", size, cold, link_gbps=link["d2h"], direction="d2h",
                   note="fresh store per repeat (warm_slack=0): first touch of memfd pages"))

    if pat is not None:
        out.append(rec("page_at_a_time", size, pat, link_gbps=link["d2h"], direction="d2h",
                       note=f"one 4 KiB copy per page; capped at {fmt_size(PAGE_AT_A_TIME_CAP)}"))
    out.append(rec("pageable", size, t_pageable, link_gbps=link["d2h"], direction="d2h",
                   note="sync copy to fresh pageable array, then into a host array"))

    if with_over:
        progress.step(f"{label} oversubscribe")
        o = sc.oversubscribe(device_arg(backend), store, cfg.page_size, cfg.staging, data,
                             cfg.touch_count, rng)
        ideal = o.misses * size * (1 / link["d2h"] + 1 / link["h2d"]) / 1e9
        r = rec("oversubscribe", size, o.touch_times, link_gbps=link["roundtrip"],
                direction="roundtrip",
                note=f"{o.buffers} x {label} under device_limit {fmt_bytes(o.device_limit)}; "
                     "gbps = bytes touched / time; ratio = ideal / actual time")
        r.update(gbps=o.touches * size / o.seconds / 1e9, ratio_to_link=ideal / o.seconds,
                 seconds=o.seconds, ideal_seconds=ideal, touches=o.touches, misses=o.misses,
                 buffers=o.buffers, device_limit=o.device_limit)
        out.append(r)

    if with_torch:
        progress.step(f"{label} torch")
        td, th = sc.torch_times(backend.device_id, data, n)
        out.append(rec("torch_d2h", size, td, link_gbps=link["d2h"], direction="d2h",
                       note="pinned.copy_(cuda, non_blocking=True); torch.cuda.synchronize()"))
        out.append(rec("torch_h2d", size, th, link_gbps=link["h2d"], direction="h2d",
                       note="cuda.copy_(pinned, non_blocking=True); torch.cuda.synchronize()"))
    return out

"""``gpu-backup bench``: run every scenario at every size in its own guarded step, then
``torch_step`` (a training step, :mod:`.torchstep`) once per run.

A step (one group of scenarios at one size, see :data:`STEPS`) first checks, against fresh
readings of device and host memory, that it can fit; if not it is skipped with the
numbers.  A step that raises is recorded in ``failures`` (step, scenarios, size, error
type and message) and the run goes on.  After every step the caller's ``on_update`` gets
the document as it stands (the CLI writes the JSON then), so a run that dies later still
leaves every finished row.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .._os import host_memory
from ..manager import BufferManager
from ..staging import Staging
from ..store import PAGE_SIZE
from . import hostlimits
from . import scenarios as sc
from . import torchstep
from .env import machine, now_iso, versions
from .report import HOST_NOTE, summarize
from .sizes import SizeError, fmt_bytes, fmt_size
from .stats import Repeats
from .uvm import uvm_times, uvm_unusable

__all__ = ["BenchConfig", "Progress", "FULL_SIZES", "QUICK_SIZES", "PAGE_AT_A_TIME_CAP",
           "STEPS", "step_needs", "device_arg", "torch_step_config", "run_bench"]

log = logging.getLogger("gpu_backup.bench")

FULL_SIZES = (64 << 10, 1 << 20, 16 << 20, 256 << 20, 1 << 30)
QUICK_SIZES = (64 << 10, 1 << 20, 16 << 20)
PAGE_AT_A_TIME_CAP = 16 << 20
"""Largest size ``page_at_a_time`` runs at: it is slow (one copy call per 4 KiB)."""
SMALL = 1 << 20
"""Sizes up to this run ``SMALL_FACTOR`` times the repeats: one operation takes microseconds."""
SMALL_FACTOR = 10
OVERSUB_MIN = 1 << 20
FIRST_REPEATS = 3
"""``evict_first``/``restore_first`` build a new manager per repeat: at most this many."""
MAX_FACTOR = 4
"""Repeats may grow to this many times the minimum while the median is not stable."""
HOST_FRACTION = 0.8
"""Share of the available host memory (RAM + free swap) the bench plans to use at most."""

STEPS: dict[str, tuple[str, ...]] = {
    "link": ("link_d2h", "link_h2d"),
    "alternatives": ("page_at_a_time", "pageable"),
    "evict_restore": ("evict", "restore", "evict_restore", "evict_clean"),
    "first": ("evict_first", "restore_first"),
    "evict_zero": ("evict_zero",),
    "oversubscribe": ("oversubscribe",),
    "swap": ("swap",),
    "uvm": ("uvm_evict", "uvm_restore"),
    "torch": ("torch_d2h", "torch_h2d"),
    "torch_step": ("torch_step",),
}
"""Each step and the scenarios (result rows) it produces, in the order they run.  Every
step but ``torch_step`` runs once per size and adds its rows to ``results``;
``torch_step`` runs once per run and fills ``torch_step`` (a training step per mode, not
a copy: see :mod:`gpu_backup.bench.torchstep`)."""


@dataclass(frozen=True)
class BenchConfig:
    """What to run.  ``sizes``/``repeat``/``touches``/``budget_s`` None: the defaults for
    ``quick``.  ``repeat`` is the minimum number of repeats; more run (up to 4x) while
    the median is not stable and the row's ``budget_s`` is not spent."""

    device: Any = "auto"
    sizes: tuple[int, ...] | None = None
    repeat: int | None = None
    quick: bool = False
    page_size: int = PAGE_SIZE
    staging: Staging = field(default_factory=Staging)
    touches: int | None = None
    seed: int = 0
    budget_s: float | None = None
    host_limits: bool = True

    def __post_init__(self) -> None:
        if self.repeat is not None and self.repeat < 1:
            raise ValueError(f"repeat={self.repeat} must be >= 1")
        if self.touches is not None and self.touches < 1:
            raise ValueError(f"touches={self.touches} must be >= 1")
        if self.budget_s is not None and self.budget_s < 0:
            raise ValueError(f"budget_s={self.budget_s} must be >= 0")
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

    @property
    def budget(self) -> float:
        return self.budget_s if self.budget_s is not None else (0.5 if self.quick else 2.0)

    def repeats_for(self, size: int) -> Repeats:
        rep = Repeats(self.base_repeat, self.base_repeat * MAX_FACTOR, self.budget)
        return rep.scaled(SMALL_FACTOR) if size <= SMALL else rep

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
def step_needs(step: str, size: int, on_host: bool, staging: Staging) -> tuple[int, int]:
    """Approximate peak (device, host) bytes of one step at one size, beside the data
    array (``size`` B of host memory, counted here too).

    link / alternatives: a raw allocation; pinned buffer, pageable copy and its host array.
    evict_restore / first: the buffer; store pages, a read-back copy (first: plus a new
    staging ring per repeat).  evict_zero: the buffer and its zero template.
    oversubscribe: half of 8 buffers on the device, the other half in the store, plus the
    read-back.  swap: two buffers, one on the device; both in the store at worst, and the
    read-back.  uvm: managed memory, on the device then on the host; the read-back.
    torch: a tensor; a pinned tensor.  torch_step runs once per run, whatever ``size``:
    here the estimate for the largest model it builds (cuda, not quick), an upper bound;
    the run checks the model it builds (:func:`torchstep.estimate_needs`).  On the host
    backend device memory is host memory.
    """
    pinned = staging.slots * staging.slot_bytes
    if step == "torch_step":
        dev, host = torchstep.estimate_needs(**torchstep.sizes_for("cuda"), steps=5, warmup=1,
                                             on_host=False, staging=staging)
        return dev, host + size + (dev if on_host else 0)
    dev, host = {
        "link": (size, 3 * size),
        "alternatives": (size, 3 * size),
        "evict_restore": (size, 2 * size),
        "first": (size, 2 * size + pinned),
        "evict_zero": (size, size),
        "oversubscribe": (sc.OVERSUB_BUFFERS * size // 2, (sc.OVERSUB_BUFFERS // 2 + 1) * size),
        "swap": (size, 3 * size),
        "uvm": (size, 2 * size),
        "torch": (size, size),
    }[step]
    host += size
    if on_host:
        host += dev
    return dev, host


def _usable_host() -> int:
    mem = host_memory.read(fresh=True)
    return int((mem["available"] + mem["swap_free"]) * HOST_FRACTION)


def _why_not(backend: Any, step: str, size: int, staging: Staging) -> str | None:
    return _why_not_bytes(backend, *step_needs(step, size, backend.name == "host", staging))


def _why_not_bytes(backend: Any, dev: int, host: int) -> str | None:
    free_dev = backend.mem_info()[0]
    avail = _usable_host()
    if dev > free_dev:
        return (f"needs about {dev:,} B of device memory, {free_dev:,} B free on "
                f"{backend.device_name}")
    if host > avail:
        return (f"needs about {host:,} B of host memory, {avail:,} B usable "
                f"({HOST_FRACTION:.0%} of available RAM + free swap)")
    return None


def _release_caches(mgr: BufferManager) -> None:
    """Give back what this process holds but does not use: collected objects, the store's
    warm pages, CuPy's cached device and pinned blocks."""
    gc.collect()
    trim = getattr(mgr.store, "trim", None)
    if trim is not None:
        trim()
    if mgr.backend.name == "cuda":
        try:
            import cupy
            cupy.get_default_memory_pool().free_all_blocks()
            cupy.get_default_pinned_memory_pool().free_all_blocks()
        except Exception:  # noqa: BLE001 - best effort
            pass


def plan(backend: Any, cfg: BenchConfig) -> tuple[list[int], list[dict[str, Any]]]:
    """Sizes to run and the skipped entries: a size whose ``link`` step cannot fit now is
    skipped (a default size) or an error (:class:`SizeError`, an explicitly requested
    size).  Each step checks again, with fresh readings, before it runs."""
    run, skipped = [], []
    for size in cfg.size_list():
        why = _why_not(backend, "link", size, cfg.staging)
        if why is None:
            run.append(size)
            continue
        if cfg.explicit_sizes:
            raise SizeError(f"size {fmt_size(size)} ({size:,} B) is too large for this "
                            f"machine: it {why}")
        skipped.append(_skip("all", size, why))
    if not run:
        raise SizeError("none of the sizes fits on this machine: " +
                        "; ".join(f"{fmt_size(s['size_bytes'])} {s['reason']}" for s in skipped))
    return run, skipped


def _skip(step: str, size: int | None, reason: str) -> dict[str, Any]:
    scen = [s for names in STEPS.values() for s in names] if step == "all" else list(STEPS[step])
    return {"step": step, "scenarios": scen, "size_bytes": size, "reason": reason}


# ---------------------------------------------------------------------- run
class _Run:
    """One bench run: the document, the shared manager, and the guarded steps."""

    def __init__(self, cfg: BenchConfig, mgr: BufferManager, progress: Progress,
                 on_update: Callable[[dict[str, Any]], None]) -> None:
        self.cfg, self.mgr, self.progress, self.on_update = cfg, mgr, progress, on_update
        self.backend = mgr.backend
        self.rng = np.random.default_rng(cfg.seed)
        self.doc: dict[str, Any] = {}

    def update(self) -> None:
        self.doc["summary"] = summarize(self.doc["results"], self.doc["backend"],
                                        self.doc.get("failures"))
        self.on_update(self.doc)

    def guarded(self, step: str, size: int | None, fn: Callable[[], list[dict[str, Any]]],
                needs_check: bool = True, needs: tuple[int, int] | None = None) -> bool:
        """Run one step: check it fits, run it, record its rows or its failure, publish.

        The check uses :func:`step_needs` at ``size``, or ``needs`` (device, host bytes)
        for a step that runs once per run (``size`` None)."""
        label = f"{fmt_size(size)} " if size else ""
        self.progress.step(f"{label}{step}")
        if needs_check and (size is not None or needs is not None):
            def why_not() -> str | None:
                if needs is not None:
                    return _why_not_bytes(self.backend, *needs)
                assert size is not None
                return _why_not(self.backend, step, size, self.cfg.staging)
            why = why_not()
            if why is not None:
                _release_caches(self.mgr)
                why = why_not()
            if why is not None:
                self.doc["skipped"].append(_skip(step, size, why))
                self.update()
                return False
        try:
            rows = fn()
        except Exception as e:  # noqa: BLE001 - recorded; the run goes on
            log.warning("bench step %s at %s failed: %s: %s", step, label.strip(),
                        type(e).__name__, e)
            self.doc["failures"].append({
                "step": step, "scenarios": list(STEPS.get(step, ())), "size_bytes": size,
                "error_type": type(e).__name__, "message": str(e)})
            del e
            _release_caches(self.mgr)
            self.update()
            return False
        self.doc["results"] += rows
        self.update()
        return True


def run_bench(cfg: BenchConfig, progress: Progress | None = None,
              on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every step at every size that fits and return the JSON document.

    ``on_update(doc)`` is called with the document after every step (and once before the
    first).  Raises :class:`SizeError` for an explicitly requested size that cannot fit;
    every other failure is recorded in ``doc["failures"]``.
    """
    progress = progress or _Quiet()
    ps = cfg.page_size
    with BufferManager(cfg.device, page_size=ps, staging=cfg.staging) as mgr:
        backend = mgr.backend
        dev_free, dev_total = backend.mem_info()
        sizes, skipped = plan(backend, cfg)
        run = _Run(cfg, mgr, progress, on_update or (lambda doc: None))
        run.doc = doc = _document(cfg, mgr, sizes, dev_free, dev_total, skipped)
        no_torch = torch_unusable(backend)
        if no_torch:
            skipped.append(_skip("torch", None, no_torch))
        no_torch_step = torchstep.unusable(backend)
        if no_torch_step:
            skipped.append(_skip("torch_step", None, no_torch_step))
        if backend.name != "cuda":
            skipped.append(_skip("uvm", None, f"the backend is {backend.name}: managed memory "
                                              "and its prefetches need a CUDA GPU"))
        below = [s for s in sizes if s < OVERSUB_MIN]
        if below:
            for step in ("oversubscribe", "swap"):
                skipped.append(_skip(step, None,
                                     f"runs only for sizes >= {fmt_size(OVERSUB_MIN)}; not run "
                                     f"at {', '.join(fmt_size(s) for s in below)}"))
        above = [s for s in sizes if s > PAGE_AT_A_TIME_CAP]
        if above:
            skipped.append({"step": "alternatives", "scenarios": ["page_at_a_time"],
                            "size_bytes": None,
                            "reason": f"page_at_a_time is capped at {fmt_size(PAGE_AT_A_TIME_CAP)} "
                                      f"(one copy call per 4 KiB is slow); not run at "
                                      f"{', '.join(fmt_size(s) for s in above)}"})
        per_size = 5 + (backend.name == "cuda") + (no_torch is None)
        steps = (cfg.host_limits + sum(per_size + 2 * (s >= OVERSUB_MIN) for s in sizes)
                 + (no_torch_step is None))
        header = (f"backend {backend.name} ({backend.reason}); device {backend.device_name}; "
                  f"sizes {', '.join(fmt_size(s) for s in sizes)}")
        if backend.name == "host":
            header += "\nHOST BACKEND: these will be host figures, NOT GPU figures"
        progress.begin(steps, header)
        run.update()
        if cfg.host_limits:
            def limits() -> list[dict[str, Any]]:
                # 4x the largest size, from 32M (small runs stay quick) to 256M (past CPU
                # caches); four buffers of it at once, well inside free memory
                nbytes = min(hostlimits.BENCH_BYTES, max(32 << 20, 4 * max(sizes)),
                             max(1 << 20, _usable_host() // 16))
                doc["host_limits"] = hostlimits.measure(nbytes)
                return []
            run.guarded("host_limits", None, limits, needs_check=False)
        for size in sizes:
            _run_size(run, size, with_torch=no_torch is None)
        if no_torch_step is None:      # last: torch's caches never crowd the other steps
            _run_torch_step(run)
        progress.step("done")
    return doc


def _document(cfg: BenchConfig, mgr: BufferManager, sizes: list[int], dev_free: int,
              dev_total: int, skipped: list[dict[str, Any]]) -> dict[str, Any]:
    backend, ps = mgr.backend, cfg.page_size
    rep = cfg.repeats_for(max(sizes))
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
            "max_repeat": rep.limit,
            "repeat_budget_s": cfg.budget,
            "small_size_repeat_factor": SMALL_FACTOR,
            "small_size_max": SMALL,
            "oversubscribe": {"buffers": sc.OVERSUB_BUFFERS, "touches": cfg.touch_count,
                              "device_limit": "half the buffers' total"},
            "store": "BufferManager's own default store",
            "store_warm_slack": getattr(mgr.store, "warm_slack", None),
            "zero_scan": getattr(mgr, "zero_scan", None),
            "device_memory": {"free": dev_free, "total": dev_total},
            "gbps": "1e9 bytes per second",
        },
        "steps": {k: list(v) for k, v in STEPS.items()},
        "results": [],
        "torch_step": {"config": None, "rows": [], "goals": []},
        "skipped": skipped,
        "failures": [],
    }
    if backend.name == "host":
        doc["host_backend_note"] = HOST_NOTE
    return doc


def _bound(run: _Run, row: dict[str, Any], op: str, link: dict[str, float] | None) -> None:
    """Add what bounds ``row`` (the slower of the link and the host copies) to it."""
    limits = run.doc.get("host_limits")
    if not limits or not link:
        return
    b = hostlimits.bounds(limits, link.get("d2h"), link.get("h2d"))[op]
    row.update(bound_gbps=b["bound_gbps"], bound_by=b["bound_by"], bound_what=b["what"],
               host_gbps=b["host_gbps"],
               ratio_to_bound=row["gbps"] / b["bound_gbps"])


def torch_step_config(backend: Any, cfg: BenchConfig) -> dict[str, Any]:
    """The ``torch_step`` arguments for this backend and config: smaller with ``quick``."""
    return {**torchstep.sizes_for(backend.name, cfg.quick),
            "steps": torchstep.QUICK_STEPS if cfg.quick else 5, "warmup": 1, "limit": 0.5,
            "seed": cfg.seed}


def _run_torch_step(run: _Run) -> None:
    """The ``torch_step`` step, once per run: its rows and goals go to ``torch_step``."""
    tcfg = torch_step_config(run.backend, run.cfg)
    needs = torchstep.estimate_needs(tcfg["batch"], tcfg["width"], tcfg["depth"],
                                     steps=tcfg["steps"], warmup=tcfg["warmup"],
                                     on_host=run.backend.name == "host",
                                     staging=run.cfg.staging)

    def step() -> list[dict[str, Any]]:
        rows = torchstep.run(device_arg(run.backend), **tcfg)
        run.doc["torch_step"] = {"config": tcfg, "rows": rows, "goals": torchstep.goals(rows)}
        return []

    run.guarded("torch_step", None, step, needs=needs)


def _run_size(run: _Run, size: int, *, with_torch: bool) -> None:
    cfg, mgr, backend = run.cfg, run.mgr, run.backend
    rep = cfg.repeats_for(size)
    label = fmt_size(size)
    data = run.rng.integers(0, 256, size, dtype=np.uint8)
    rec = sc.record
    link: dict[str, float] = {}

    def link_step() -> list[dict[str, Any]]:
        with sc.raw_buffers(backend, data) as (dev, pin):
            t_d2h, t_h2d = sc.link_times(backend, dev, pin, data, rep)
            del dev, pin
        d2h = rec("link_d2h", size, t_d2h, link_gbps=None, direction="d2h", repeats=rep,
                  note="one pinned buffer, one copy")
        h2d = rec("link_h2d", size, t_h2d, link_gbps=None, direction="h2d", repeats=rep,
                  note="one pinned buffer, one copy")
        for r in (d2h, h2d):
            r["ratio_to_link"] = 1.0
            r["link_gbps"] = r["gbps"]
        link.update(d2h=d2h["gbps"], h2d=h2d["gbps"],
                    roundtrip=sc.roundtrip_gbps(d2h["gbps"], h2d["gbps"]))
        return [d2h, h2d]

    def alternatives_step() -> list[dict[str, Any]]:
        with sc.raw_buffers(backend, data) as (dev, pin):
            pat = None
            if size <= PAGE_AT_A_TIME_CAP:
                pat = sc.page_at_a_time_times(backend, dev, pin, data, size, rep)
            t_pageable = sc.pageable_times(backend, dev, data, rep)
            del dev, pin
        rows = []
        if pat is not None:
            rows.append(rec("page_at_a_time", size, pat, link_gbps=link.get("d2h"), direction="d2h",
                            repeats=rep, note=f"one 4 KiB copy per page; capped at "
                                              f"{fmt_size(PAGE_AT_A_TIME_CAP)}"))
        rows.append(rec("pageable", size, t_pageable, link_gbps=link.get("d2h"), direction="d2h",
                        repeats=rep, note="sync copy to fresh pageable array, then into a "
                                          "host array"))
        return rows

    def evict_restore_step() -> list[dict[str, Any]]:
        er = sc.evict_restore_times(mgr, data, rep)
        ev = rec("evict", size, er.evict, link_gbps=link.get("d2h"), direction="d2h",
                 repeats=rep, store_warm=er.all_warm,
                 note="default store" + ("" if er.all_warm else ", NOT warm every repeat"))
        rs = rec("restore", size, er.restore, link_gbps=link.get("h2d"), direction="h2d",
                 repeats=rep, note="access('rw') of an evicted buffer")
        _bound(run, ev, "evict", link)
        _bound(run, rs, "restore", link)
        rt = rec("evict_restore", size, [a + b for a, b in zip(er.evict, er.restore)],
                 link_gbps=link.get("roundtrip"), direction="roundtrip", repeats=rep,
                 note="round trip; link = 1/(1/d2h + 1/h2d)")
        clean_note = "no copy: backup still valid"
        if er.clean_evictions != len(er.clean):
            clean_note += f" (manager counted {er.clean_evictions} of {len(er.clean)} as clean)"
        cl = rec("evict_clean", size, er.clean, link_gbps=link.get("d2h"), direction="d2h",
                 kind=sc.EFFECTIVE, repeats=rep, note=clean_note)
        return [ev, rs, rt, cl]

    def first_step() -> list[dict[str, Any]]:
        frep = rep.capped(FIRST_REPEATS)
        ev, rs = sc.first_cycle_times(device_arg(backend), cfg.page_size, cfg.staging, data,
                                      frep)
        e = rec("evict_first", size, ev, link_gbps=link.get("d2h"), direction="d2h",
                repeats=frep, note="first evict of a buffer: new BufferManager() per repeat")
        r = rec("restore_first", size, rs, link_gbps=link.get("h2d"), direction="h2d",
                repeats=frep, note="its first restore, access('rw')")
        _bound(run, e, "evict_first", link)
        _bound(run, r, "restore", link)
        return [e, r]

    def zero_step() -> list[dict[str, Any]]:
        t = sc.evict_zero_times(device_arg(backend), cfg.page_size, cfg.staging, size, rep)
        return [rec("evict_zero", size, t, link_gbps=link.get("d2h"), direction="d2h",
                    kind=sc.EFFECTIVE, repeats=rep,
                    note="all pages zero: found by the page scan, nothing copied")]

    def over_step() -> list[dict[str, Any]]:
        o = sc.oversubscribe(device_arg(backend), cfg.page_size, cfg.staging, data,
                             cfg.touch_count, run.rng)
        r = rec("oversubscribe", size, o.touch_times, link_gbps=link.get("roundtrip"),
                direction="roundtrip", kind=sc.EFFECTIVE,
                note=f"{o.buffers} x {label} under device_limit {fmt_bytes(o.device_limit)}; "
                     "gbps = bytes touched / time; effective ratio = ideal / actual time")
        # One touch is a hit or a miss: the spread of single touches says nothing about
        # noise, so the row gives the total only.
        r.update(gbps=o.touches * size / o.seconds / 1e9, gbps_min=None, gbps_max=None,
                 gbps_lo=None, gbps_hi=None,
                 spread="n/a", seconds=o.seconds,
                 touches=o.touches, misses=o.misses, buffers=o.buffers,
                 device_limit=o.device_limit)
        if link:
            ideal = o.misses * size * (1 / link["d2h"] + 1 / link["h2d"]) / 1e9
            r.update(effective_ratio=ideal / o.seconds, ideal_seconds=ideal)
        return [r]

    def swap_step() -> list[dict[str, Any]]:
        t, swaps = sc.swap_times(device_arg(backend), cfg.page_size, cfg.staging, data, rep)
        how = ("restored into the victim's memory while it is evicted" if swaps else
               "swap on a miss is off here (on for cuda): evict, then restore, in series")
        return [rec("swap", size, t, link_gbps=link.get("roundtrip"), direction="roundtrip",
                    repeats=rep, swaps=swaps,
                    note=f"a miss under a one-buffer limit: {how}; link = size / (d2h + h2d "
                         "link times), so > 1 means the two directions overlapped")]

    def uvm_step() -> list[dict[str, Any]]:
        why = uvm_unusable(backend, size)
        if why is not None:
            run.doc["skipped"].append(_skip("uvm", size, why))
            return []
        ev, rs = uvm_times(backend.device_id, data, rep)
        return [rec("uvm_evict", size, ev, link_gbps=link.get("d2h"), direction="d2h",
                    repeats=rep, note="managed memory: cudaMemPrefetchAsync to the CPU"),
                rec("uvm_restore", size, rs, link_gbps=link.get("h2d"), direction="h2d",
                    repeats=rep, note="managed memory: cudaMemPrefetchAsync to the GPU")]

    def torch_step() -> list[dict[str, Any]]:
        td, th = sc.torch_times(backend.device_id, data, rep)
        return [rec("torch_d2h", size, td, link_gbps=link.get("d2h"), direction="d2h",
                    repeats=rep, note="pinned.copy_(cuda, non_blocking=True); synchronize"),
                rec("torch_h2d", size, th, link_gbps=link.get("h2d"), direction="h2d",
                    repeats=rep, note="cuda.copy_(pinned, non_blocking=True); synchronize")]

    run.guarded("link", size, link_step)
    run.guarded("alternatives", size, alternatives_step)
    run.guarded("evict_restore", size, evict_restore_step)
    run.guarded("first", size, first_step)
    run.guarded("evict_zero", size, zero_step)
    if size >= OVERSUB_MIN:
        run.guarded("oversubscribe", size, over_step)
        run.guarded("swap", size, swap_step)
    if backend.name == "cuda":
        run.guarded("uvm", size, uvm_step)
    if with_torch:
        run.guarded("torch", size, torch_step)

"""The copy pipeline's own checks: page size, zero runs, swap, per-piece cost.

Run from the repo root:  python3 benchmarks/bench_pipeline.py [--device host|cuda]
                         [--size 256M] [--repeat 5] [--json PATH]
                         [--zero] [--swap] [--pieces] [--only-extra]

Issue 3's check: does a 4 KiB page cost the pipeline more than a 2 MiB page?

For each page size (4 KiB, 2 MiB), with the same staging ring and a warm store
(one untimed evict/restore first): evict + restore of one buffer (default 256 MiB),
median of the repeats, bytes checked once outside the timed region.  Prints both times,
their ratio, and whether the goal "4 KiB costs no more than 1.5x of 2 MiB" is met,
computed from the numbers.  On a GPU (``--device cuda``) it also prints evict and
restore GB/s beside the link (one pinned copy of the whole buffer) measured in the
same run.  On the host backend the numbers are host numbers, not GPU numbers.

``--zero``: a buffer (``--zero-size``, default 64 MiB) with every other page zero against
the same buffer dense, zero scan on for both, evict and restore timed in alternation
(goal: <= 1.2x the dense time).  ``--swap``: under a device limit of one buffer, a miss
(restore B, which needs A's memory) as one swap against ``A.evict()`` then B's restore in
series, alternated, roles swapped each round (goal on a GPU: >= 1.3x faster).
``--pieces``: the fixed cost of one piece, from the same evict + restore with 8 MiB and
with 256 KiB slots; at 55 GB/s it is the zero-run length below which skipping does not pay.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

import numpy as np

try:
    import gpu_backup as gb
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gpu_backup as gb

from gpu_backup.bench import HOST_NOTE, SizeError, fmt_bytes, machine, now_iso, parse_size, versions
from gpu_backup.bench import scenarios as sc
from gpu_backup.bench.report import write_json

GOAL = 1.5
PAGE_SIZES = (4 << 10, 2 << 20)


def measure(device: Any, page_size: int, staging: gb.Staging, data: np.ndarray,
            repeat: int) -> dict[str, Any]:
    """Median evict, restore and round-trip times of one buffer at ``page_size``."""
    with gb.ShmemStore(page_size=page_size, warm_slack=2 * data.size) as store, \
            gb.BufferManager(device, store=store, page_size=page_size, staging=staging) as mgr:
        t = sc.evict_restore_times(mgr, data, repeat, clean=False)
        backend = mgr.backend
        out: dict[str, Any] = {
            "page_size": page_size,
            "evict_s": statistics.median(t.evict),
            "restore_s": statistics.median(t.restore),
            "roundtrip_s": statistics.median([a + b for a, b in zip(t.evict, t.restore)]),
            "all_warm": t.all_warm,
            "repeats": repeat,
            "backend": backend.name,
            "backend_reason": backend.reason,
            "device": backend.device_name if backend.name == "cuda" else "host",
        }
        if backend.name == "cuda":
            with sc.raw_buffers(backend, data) as (dev, pin):
                d2h, h2d = sc.link_times(backend, dev, pin, data, repeat)
                del dev, pin
            out["link_d2h_gbps"] = data.size / statistics.median(d2h) / 1e9
            out["link_h2d_gbps"] = data.size / statistics.median(h2d) / 1e9
    out["evict_gbps"] = data.size / out["evict_s"] / 1e9
    out["restore_gbps"] = data.size / out["restore_s"] / 1e9
    return out


def _median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def zero_vs_dense(device: Any, size: int, repeat: int) -> dict[str, Any]:
    """Evict and restore times, every-other-page-zero vs dense, zero scan on, alternated."""
    ps = gb.PAGE_SIZE
    dense = np.random.default_rng(1).integers(1, 256, size, dtype=np.uint8)
    half = dense.copy()
    half.reshape(-1, ps)[::2] = 0
    times: dict[str, list[tuple[float, float]]] = {"dense": [], "half_zero": []}
    with gb.ShmemStore(warm_slack=4 * size) as store, \
            gb.BufferManager(device, store=store, zero_scan=True) as mgr:
        for _ in range(repeat):
            for name, data in (("dense", dense), ("half_zero", half)):
                t = sc.evict_restore_times(mgr, data, 1, clean=False)
                times[name].append((t.evict[0], t.restore[0]))
    out: dict[str, Any] = {"size_bytes": size, "repeats": repeat}
    for name, ts in times.items():
        out[f"{name}_evict_ms"] = _median_ms([e for e, _ in ts])
        out[f"{name}_restore_ms"] = _median_ms([r for _, r in ts])
    out["evict_ratio"] = out["half_zero_evict_ms"] / out["dense_evict_ms"]
    out["restore_ratio"] = out["half_zero_restore_ms"] / out["dense_restore_ms"]
    out["met"] = max(out["evict_ratio"], out["restore_ratio"]) <= 1.2
    return out


def swap_vs_series(device: Any, size: int, repeat: int) -> dict[str, Any]:
    """A miss under a one-buffer device limit: swap (B restored into A's memory while A is
    evicted) against A.evict() then B's restore, alternated in one loop (swap on a miss is
    the default on a GPU only; measured here everywhere)."""
    series: list[float] = []
    data = np.random.default_rng(2).integers(0, 256, size, dtype=np.uint8)
    swap, swaps = sc.swap_times(device, gb.PAGE_SIZE, gb.Staging(), data, repeat, swap=True,
                                series=series)
    out = {"size_bytes": size, "repeats": repeat, "series_ms": _median_ms(series),
           "swap_ms": _median_ms(swap), "swaps": swaps}
    out["speedup"] = out["series_ms"] / out["swap_ms"]
    return out


def piece_cost(device: Any, size: int, repeat: int) -> dict[str, Any]:
    """Fixed cost of one piece: evict + restore with big and with small slots."""
    data = np.random.default_rng(3).integers(0, 256, size, dtype=np.uint8)
    rows = {}
    for slot in (8 << 20, 256 << 10):
        staging = gb.Staging(slot_bytes=slot)
        with gb.ShmemStore(warm_slack=4 * size) as store, \
                gb.BufferManager(device, store=store, staging=staging) as mgr:
            t = sc.evict_restore_times(mgr, data, repeat, clean=False)
        rows[slot] = statistics.median([a + b for a, b in zip(t.evict, t.restore)])
    big, small = rows[8 << 20], rows[256 << 10]
    extra = 2 * (size // (256 << 10) - size // (8 << 20))   # evict and restore pieces
    per_piece = max(0.0, (small - big) / extra)
    return {"size_bytes": size, "roundtrip_8M_ms": big * 1e3, "roundtrip_256K_ms": small * 1e3,
            "per_piece_us": per_piece * 1e6,
            "breakeven_run_bytes_at_55GBps": int(per_piece * 55e9)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--device", default="host",
                    help="host (default), cuda, auto, or a GPU index")
    ap.add_argument("--size", default="256M", help="buffer size (default: 256M)")
    ap.add_argument("--repeat", type=int, default=5, help="timed repeats (default: 5)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    ap.add_argument("--zero", action="store_true", help="every-other-page-zero vs dense")
    ap.add_argument("--zero-size", default="64M", help="buffer size for --zero (default 64M)")
    ap.add_argument("--swap", action="store_true", help="swap vs evict + restore in series")
    ap.add_argument("--pieces", action="store_true", help="fixed cost of one piece")
    ap.add_argument("--only-extra", action="store_true",
                    help="skip the page-size comparison (run only --zero/--swap/--pieces)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat {args.repeat} must be >= 1")
    try:
        size = parse_size(args.size, multiple_of=max(PAGE_SIZES))
    except SizeError as e:
        ap.error(str(e))
    device: Any = int(args.device) if args.device.isdigit() else args.device

    extra: dict[str, Any] = {}
    if args.zero:
        try:
            zsize = parse_size(args.zero_size, multiple_of=gb.PAGE_SIZE)
        except SizeError as e:
            ap.error(str(e))
        z = extra["zero_runs"] = zero_vs_dense(device, zsize, args.repeat)
        print(f"every other page zero vs dense, {fmt_bytes(zsize)}, zero scan on, median of "
              f"{args.repeat}: evict {z['half_zero_evict_ms']:.1f} / {z['dense_evict_ms']:.1f} ms "
              f"({z['evict_ratio']:.2f}x), restore {z['half_zero_restore_ms']:.1f} / "
              f"{z['dense_restore_ms']:.1f} ms ({z['restore_ratio']:.2f}x) -> goal (<= 1.2x) "
              f"{'MET' if z['met'] else 'NOT MET'}")
    if args.swap:
        w = extra["swap"] = swap_vs_series(device, size, args.repeat)
        print(f"miss under a one-buffer limit, {fmt_bytes(size)}, median of {args.repeat}: "
              f"evict + restore in series {w['series_ms']:.1f} ms, swap {w['swap_ms']:.1f} ms "
              f"({w['speedup']:.2f}x faster; {w['swaps']} swaps)")
    if args.pieces:
        c = extra["pieces"] = piece_cost(device, size, args.repeat)
        print(f"one piece costs {c['per_piece_us']:.1f} us (8 MiB slots {c['roundtrip_8M_ms']:.1f} ms, "
              f"256 KiB slots {c['roundtrip_256K_ms']:.1f} ms per round trip): skipping a zero run "
              f"pays above {fmt_bytes(c['breakeven_run_bytes_at_55GBps'])} at 55 GB/s")
    if extra and args.json and args.only_extra:
        write_json({"benchmark": "bench_pipeline", "date": now_iso(), "versions": versions(),
                    "machine": machine(), **extra}, args.json)
    if args.only_extra:
        return 0

    staging = gb.Staging()
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    rows = [measure(device, ps, staging, data, args.repeat) for ps in PAGE_SIZES]
    small, big = rows
    host = small["backend"] == "host"
    print(f"evict + restore of {fmt_bytes(size)} on {small['device']} "
          f"(backend {small['backend']}: {small['backend_reason']})")
    print(f"staging {staging.slots} x {fmt_bytes(staging.slot_bytes)}, {staging.threads} "
          f"threads; warm store; median of {args.repeat}; GB/s = 1e9 B/s")
    if host:
        print(HOST_NOTE)
    print()
    print(f"{'page size':>10}{'evict ms':>11}{'restore ms':>12}{'round trip ms':>15}"
          f"{'evict GB/s':>12}{'restore GB/s':>14}  warm")
    for r in rows:
        print(f"{r['page_size'] // 1024:>7} KiB{r['evict_s'] * 1e3:>11.2f}"
              f"{r['restore_s'] * 1e3:>12.2f}{r['roundtrip_s'] * 1e3:>15.2f}"
              f"{r['evict_gbps']:>12.2f}{r['restore_gbps']:>14.2f}  "
              f"{'yes' if r['all_warm'] else 'NO'}")
    if "link_d2h_gbps" in small:
        for r in rows:
            print(f"{r['page_size'] // 1024:>7} KiB: evict {r['evict_gbps'] / r['link_d2h_gbps']:.2f}x "
                  f"of link d2h {r['link_d2h_gbps']:.1f} GB/s, restore "
                  f"{r['restore_gbps'] / r['link_h2d_gbps']:.2f}x of link h2d "
                  f"{r['link_h2d_gbps']:.1f} GB/s")
    ratio = small["roundtrip_s"] / big["roundtrip_s"]
    met = ratio <= GOAL
    print()
    print(f"4 KiB / 2 MiB round-trip time: {ratio:.2f}x -> goal (<= {GOAL}x) "
          f"{'MET' if met else 'NOT MET'}" + (" (host figures)" if host else ""))
    if args.json:
        doc = {"benchmark": "bench_pipeline", "device": small["device"],
               "backend": small["backend"], "backend_reason": small["backend_reason"],
               "date": now_iso(), "versions": versions(), "machine": machine(),
               "size_bytes": size, "staging": {"slots": staging.slots,
                                               "slot_bytes": staging.slot_bytes,
                                               "threads": staging.threads},
               "results": rows, **extra,
               "goal": {"text": f"4 KiB pages cost no more than {GOAL}x of 2 MiB pages "
                                "(evict + restore round trip, medians)",
                        "value": ratio, "threshold": GOAL, "met": met}}
        if host:
            doc["host_backend_note"] = HOST_NOTE
        write_json(doc, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

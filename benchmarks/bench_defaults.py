"""What a user gets with ``BufferManager()``'s own defaults, against an explicitly warm store.

Run from the repo root:  python3 benchmarks/bench_defaults.py [--device host|cuda]
                         [--sizes 256M,1G] [--repeat 7] [--over 8x128M] [--touches 64]
                         [--json PATH]

Two managers on the same device, built the same way but for their store:

* ``default``  ``BufferManager(device)``: the store it makes itself (its free-page pool sized
  like TTM's page pool, given back under pressure or when idle).
* ``warm``     ``BufferManager(device, store=ShmemStore(warm_slack=2 x the working set))``
  after one untimed cycle: every page lands in an already-faulted slot, as ``gpu-backup
  bench`` used to measure.

Per size, paired in one loop (the order alternates each repeat): one evict + restore cycle
of one buffer (``buf.evict()`` then ``access("rw")``, which drops the backup, as a steady
swap pattern does).  The first, cold cycle of the default manager is its own row.  Then
the oversubscribed workload: ``N`` buffers of ``S`` under ``device_limit = N*S/2``, random
``access("rw")`` touches, default against warm, also paired.

Goals (issue 11): default >= 0.9x warm for each cycle size and for the oversubscribed run
(ratios of medians: warm time / default time).  Bytes are checked after every run.  On the
host backend the figures are host figures, never GPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

try:
    import gpu_backup as gb
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gpu_backup as gb

from gpu_backup.bench.env import machine, now_iso, versions
from gpu_backup.bench.sizes import fmt_size, parse_size, parse_sizes

GOAL = 0.9


def _fill(arr: Any, data: np.ndarray) -> None:
    if isinstance(arr, np.ndarray):
        arr[:] = data
    else:
        arr.set(data)


def _sync(arr: Any) -> None:
    if not isinstance(arr, np.ndarray):
        import cupy

        cupy.cuda.get_current_stream().synchronize()


def _check(buf: Any, want: np.ndarray, what: str) -> None:
    got = buf.to_host()
    if not np.array_equal(got, want):
        bad = int(np.flatnonzero(got != want)[0])
        raise SystemExit(f"{what}: bytes differ at offset {bad:,}")


def _cycle(buf: Any) -> float:
    t0 = time.perf_counter()
    buf.evict()
    with buf.access("rw") as arr:
        _sync(arr)
    return time.perf_counter() - t0


def cycles(device: str, size: int, repeat: int) -> dict[str, Any]:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    with gb.BufferManager(device) as d, \
            gb.ShmemStore(warm_slack=2 * size) as wstore, \
            gb.BufferManager(device, store=wstore) as w:
        bufs = {}
        for name, mgr in (("default", d), ("warm", w)):
            bufs[name] = mgr.alloc(size)
            with bufs[name].access("w") as arr:
                _fill(arr, data)
        first = _cycle(bufs["default"])          # the default store's first, cold cycle
        _cycle(bufs["warm"])                     # warm-up: the warm store's pages faulted in
        times: dict[str, list[float]] = {"default": [], "warm": []}
        for k in range(repeat):
            for name in (("default", "warm") if k % 2 == 0 else ("warm", "default")):
                times[name].append(_cycle(bufs[name]))
        for name, buf in bufs.items():
            _check(buf, data, f"{name} cycle at {fmt_size(size)}")
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"scenario": "evict_restore_cycle", "size_bytes": size, "repeats": repeat,
            "default_s": med["default"], "warm_s": med["warm"], "default_first_s": first,
            "default_gbps": 2 * size / med["default"] / 1e9,
            "warm_gbps": 2 * size / med["warm"] / 1e9,
            "ratio": med["warm"] / med["default"],
            "default_times_s": times["default"], "warm_times_s": times["warm"]}


def _touches(mgr: Any, bufs: list[Any], order: list[int]) -> float:
    t0 = time.perf_counter()
    for i in order:
        with bufs[i].access("rw") as arr:
            _sync(arr)
    return time.perf_counter() - t0


def oversubscribe(device: str, nbuf: int, size: int, touches: int, repeat: int) -> dict[str, Any]:
    limit = nbuf * size // 2
    rng = np.random.default_rng(7)
    datas = [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(nbuf)]
    with gb.BufferManager(device, device_limit=limit) as d, \
            gb.ShmemStore(warm_slack=2 * nbuf * size) as wstore, \
            gb.BufferManager(device, device_limit=limit, store=wstore) as w:
        sets = {}
        for name, mgr in (("default", d), ("warm", w)):
            sets[name] = []
            for data in datas:
                buf = mgr.alloc(size)
                with buf.access("w") as arr:
                    _fill(arr, data)
                sets[name].append(buf)
        orders = [rng.integers(0, nbuf, touches).tolist() for _ in range(repeat + 1)]
        first = _touches(d, sets["default"], orders[0])
        _touches(w, sets["warm"], orders[0])     # warm-up
        times: dict[str, list[float]] = {"default": [], "warm": []}
        for k in range(repeat):
            for name in (("default", "warm") if k % 2 == 0 else ("warm", "default")):
                mgr = d if name == "default" else w
                times[name].append(_touches(mgr, sets[name], orders[k + 1]))
        stats = {name: mgr.stats() for name, mgr in (("default", d), ("warm", w))}
        for name, bufs in sets.items():
            for i, buf in enumerate(bufs):
                _check(buf, datas[i], f"{name} oversubscribed buffer {i}")
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"scenario": "oversubscribe", "buffers": nbuf, "size_bytes": size,
            "device_limit": limit, "touches": touches, "repeats": repeat,
            "default_s": med["default"], "warm_s": med["warm"], "default_first_s": first,
            "ratio": med["warm"] / med["default"],
            "evictions": {k: v["evictions"] for k, v in stats.items()},
            "default_times_s": times["default"], "warm_times_s": times["warm"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="host", help="host (default) or cuda")
    ap.add_argument("--sizes", default="256M,1G", help="evict/restore cycle sizes")
    ap.add_argument("--repeat", type=int, default=7, help="paired repeats (default 7)")
    ap.add_argument("--over", default="8x128M", help="oversubscribed set: NxSIZE (default 8x128M)")
    ap.add_argument("--touches", type=int, default=64, help="touches per oversubscribed run")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    n, _, s = args.over.lower().partition("x")
    rows = [cycles(args.device, size, args.repeat) for size in parse_sizes(args.sizes)]
    rows.append(oversubscribe(args.device, int(n), parse_size(s.upper()), args.touches,
                              max(3, args.repeat)))
    backend = "host" if args.device == "host" else args.device
    print(f"BufferManager() defaults vs an explicitly warm store, device {args.device}"
          + ("  (HOST BACKEND: host figures, not GPU figures)" if backend == "host" else ""))
    met = True
    for r in rows:
        ok = r["ratio"] >= GOAL
        met &= ok
        what = (f"cycle {fmt_size(r['size_bytes'])}" if r["scenario"] == "evict_restore_cycle"
                else f"oversubscribe {r['buffers']}x{fmt_size(r['size_bytes'])} under "
                     f"{fmt_size(r['device_limit'])}, {r['touches']} touches")
        print(f"  {what}: default {r['default_s'] * 1e3:,.1f} ms, warm {r['warm_s'] * 1e3:,.1f} ms "
              f"(medians of {r['repeats']}), default/warm speed {r['ratio']:.2f}x "
              f"[{'met' if ok else 'MISSED'} >= {GOAL}x]; default's first run "
              f"{r['default_first_s'] * 1e3:,.1f} ms")
    if args.json:
        doc = {"benchmark": "bench_defaults", "device": args.device, "date": now_iso(),
               "versions": versions(), "machine": machine(), "goal": GOAL, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())

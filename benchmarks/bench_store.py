"""Host page-store throughput, compared with a plain numpy copy on the same machine.

Run from the repo root:  python3 benchmarks/bench_store.py [--sizes 4M,64M,256M] [--repeat 5]
                                                           [--json PATH]

For each size, all in one run (GB/s = 1e9 bytes/s; median and best of the repeats):

* ``numpy_copy``       ``dst[:] = src`` into an already-touched array: the baseline.
* ``store_write_cold`` ``ShmemStore.backup(src)`` on a fresh store.  This includes the
  first touch of fresh memfd pages (``MADV_POPULATE_WRITE``: the kernel allocates and
  zeroes every page), which costs many times the copy itself.
* ``store_write_warm`` ``backup`` after a ``backup`` + ``drop`` with ``warm_slack >= size``,
  so every page lands in a warm (already-faulted) slot: the steady-state eviction cost.
  The script checks ``bytes_warm >= size`` after each drop and reports it.
* ``store_read``       ``ShmemStore.read(handles, out)`` into a touched ``out`` (the bytes
  are checked against ``src`` once, outside the timed region).
* ``file_write_warm``, ``file_read``  the same for ``FileStore`` in a temporary directory
  under /tmp (page-cache backed; nothing is forced to disk).
* ``default_write``    ``backup`` on a ``ShmemStore`` built with its defaults, in
  backup -> drop -> backup cycles (no warm-up: the first, cold, backup is its own row,
  ``default_write_first``), each paired with a numpy copy of the same bytes in the same
  loop; its ratio is to those paired copies.  The goal: >= 0.8x.

Then, for each ``--cycle-sizes`` size, paired in the same loop (the order alternates):

* ``cycle_default``    one ``backup`` + ``drop`` on a store with its defaults (the first,
  cold cycle is reported as ``cycle_default_first`` and left out of the median).
* ``cycle_warm``       the same on an explicitly warm store (``warm_slack`` = 2x the size,
  an untimed warm-up cycle first), as ``gpu-backup bench`` builds it.
  The goal: ``cycle_default`` >= 0.9x ``cycle_warm`` (medians).

Each row also gives the ratio to the numpy copy measured in this run, and the last lines
say whether "warm store write >= 0.8x numpy copy" holds at each size (from the medians).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime

import numpy as np

try:
    import gpu_backup
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gpu_backup

GOAL = 0.8
CYCLE_GOAL = 0.9
COLD_BIG = 256 << 20  # from this size on, cold writes repeat at most twice (they are slow)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in "KMG" else ""
    try:
        n = int(float(t[: len(t) - len(unit)]) * _UNITS[unit])
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 4M, 512K, 1G)") from None
    if n <= 0 or n % gpu_backup.PAGE_SIZE:
        raise argparse.ArgumentTypeError(
            f"size {text!r} must be a positive multiple of {gpu_backup.PAGE_SIZE} B")
    return n


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_numpy(src: np.ndarray, repeat: int) -> list[float]:
    dst = np.empty_like(src)
    dst.fill(1)  # touch every page, so the timed copies fault nothing in

    def copy() -> None:
        dst[:] = src

    copy()  # untimed warm-up, like the untimed first backup/read of the store scenarios
    return [timed(copy) for _ in range(repeat)]


def bench_cold(src: np.ndarray, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        with gpu_backup.ShmemStore(src.size, warm_slack=src.size) as store:
            times.append(timed(lambda: store.backup(src)))
    return times


def bench_warm_and_read(store, src: np.ndarray, repeat: int):
    """Warm-write and read times on an open store; also whether every timed write hit warm
    slots and whether the read-back bytes matched."""
    size = src.size
    handles = store.backup(src)  # untimed: faults the slots in
    writes, all_warm = [], True
    for _ in range(repeat):
        store.drop(handles)
        all_warm &= store.bytes_warm >= size
        t0 = time.perf_counter()
        handles = store.backup(src)
        writes.append(time.perf_counter() - t0)
    out = np.empty_like(src)
    out.fill(1)
    store.read(handles, out)
    ok = bool(np.array_equal(out, src))
    out.fill(1)
    reads = [timed(lambda: store.read(handles, out)) for _ in range(repeat)]
    store.drop(handles)
    return writes, reads, all_warm, ok


def bench_default_write(src: np.ndarray, repeat: int) -> tuple[float, list[float], list[float], bool]:
    """On a store with its defaults: the first (cold) backup time, then warm backup times
    in backup -> drop -> backup cycles, each paired with a numpy copy of the same bytes."""
    dst = np.empty_like(src)
    dst.fill(1)
    with gpu_backup.ShmemStore(src.size) as store:
        t0 = time.perf_counter()
        handles = store.backup(src)
        first = time.perf_counter() - t0
        times, copies, all_warm = [], [], True
        for _ in range(repeat):
            store.drop(handles)
            all_warm &= store.bytes_warm >= src.size
            t0 = time.perf_counter()
            handles = store.backup(src)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            dst[:] = src
            copies.append(time.perf_counter() - t0)
        store.drop(handles)
    return first, times, copies, all_warm


def bench_cycles(src: np.ndarray, repeat: int) -> tuple[float, list[float], list[float]]:
    """Paired backup+drop cycles: a default store (first cycle returned apart) and an
    explicitly warm one (untimed warm-up), alternating which goes first."""
    size = src.size

    def cycle(store) -> float:
        t0 = time.perf_counter()
        store.drop(store.backup(src))
        return time.perf_counter() - t0

    with gpu_backup.ShmemStore(size) as default, \
            gpu_backup.ShmemStore(size, warm_slack=2 * size) as warm:
        first = cycle(default)
        cycle(warm)
        d, w = [], []
        for i in range(repeat):
            if i % 2:
                w.append(cycle(warm))
                d.append(cycle(default))
            else:
                d.append(cycle(default))
                w.append(cycle(warm))
    return first, d, w


def record(scenario: str, size: int, times: list[float], base: float | None, note: str = ""):
    med, best = size / statistics.median(times) / 1e9, size / min(times) / 1e9
    return {"scenario": scenario, "size_bytes": size, "gbps_median": med, "gbps_best": best,
            "ratio_to_numpy": med / base if base else 1.0, "repeats": len(times), "note": note}


def fmt_size(n: int) -> str:
    for unit, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--sizes", default="4M,64M,256M",
                    type=lambda s: [parse_size(x) for x in s.split(",") if x.strip()],
                    help="comma-separated sizes with K/M/G suffixes (default: 4M,64M,256M)")
    ap.add_argument("--repeat", type=int, default=5, help="timed repetitions (default: 5)")
    ap.add_argument("--cycle-sizes", default="256M,1G",
                    type=lambda s: [parse_size(x) for x in s.split(",") if x.strip()],
                    help="sizes for the default-vs-warm backup/drop cycles (default: 256M,1G)")
    ap.add_argument("--json", metavar="PATH", help="also write the records as JSON here")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")

    date = datetime.now().isoformat(timespec="seconds")
    machine = {"node": platform.node(), "cpu_count": os.cpu_count(),
               "platform": platform.platform(), "arch": platform.machine()}
    print(f"gpu_backup host store on this machine: {machine['node']}, "
          f"{machine['cpu_count']} CPUs, numpy {np.__version__}, {date}")
    print(f"(GB/s = 1e9 B/s; ratio = median / numpy-copy median; repeat={args.repeat}, "
          f"cold repeats capped at 2 from {fmt_size(COLD_BIG)})\n")
    hdr = (f"{'scenario':<20}{'size':>6}{'n':>3}{'median GB/s':>13}{'best GB/s':>11}"
           f"{'x numpy':>9}  note")
    print(hdr)
    print("-" * len(hdr))

    results, goal, default_goal = [], [], []
    rng = np.random.default_rng(0)
    for size in args.sizes:
        src = rng.integers(0, 256, size, dtype=np.uint8)
        rows = [record("numpy_copy", size, bench_numpy(src, args.repeat), None)]
        base = rows[0]["gbps_median"]
        cold_n = min(args.repeat, 2) if size >= COLD_BIG else args.repeat
        rows.append(record("store_write_cold", size, bench_cold(src, cold_n), base))
        with gpu_backup.ShmemStore(size, warm_slack=size) as store:
            w, r, warm, ok = bench_warm_and_read(store, src, args.repeat)
        rows.append(record("store_write_warm", size, w, base,
                           "all warm hits" if warm else "NOT warm: bytes_warm < size"))
        rows.append(record("store_read", size, r, base, "verified" if ok else "MISMATCH"))
        with tempfile.TemporaryDirectory(dir="/tmp", prefix="bench_store_") as tmp, \
                gpu_backup.FileStore(tmp, size, warm_slack=size) as store:
            w, r, warm, ok = bench_warm_and_read(store, src, args.repeat)
        rows.append(record("file_write_warm", size, w, base,
                           "all warm hits" if warm else "NOT warm: bytes_warm < size"))
        rows.append(record("file_read", size, r, base, "verified" if ok else "MISMATCH"))
        first, w, copies, warm = bench_default_write(src, args.repeat)
        paired = record("numpy_copy_paired", size, copies, None)
        rows.append(record("default_write_first", size, [first], base, "cold: first touch"))
        rows.append(record("default_write", size, w, paired["gbps_median"],
                           ("all warm hits" if warm else "NOT warm: bytes_warm < size")
                           + f"; ratio to the paired numpy copy ({paired['gbps_median']:.2f} GB/s)"))
        for rec in rows:
            print(f"{rec['scenario']:<20}{fmt_size(size):>6}{rec['repeats']:>3}"
                  f"{rec['gbps_median']:>13.2f}{rec['gbps_best']:>11.2f}"
                  f"{rec['ratio_to_numpy']:>8.2f}x  {rec['note']}".rstrip())
        print()
        results += rows
        goal.append((size, rows[2]["ratio_to_numpy"]))
        default_goal.append((size, rows[-1]["ratio_to_numpy"]))

    cycle_goal = []
    if args.cycle_sizes:
        print(f"backup+drop cycles, default store vs explicitly warm store (paired; "
              f"ratio = default median / warm median)\n")
        print(hdr.replace("x numpy", " x warm"))
        print("-" * len(hdr))
    for size in args.cycle_sizes:
        src = rng.integers(0, 256, size, dtype=np.uint8)
        first, d, w = bench_cycles(src, args.repeat)
        warm_rec = record("cycle_warm", size, w, None)
        wbase = warm_rec["gbps_median"]
        rows = [record("cycle_default_first", size, [first], wbase, "cold: first cycle"),
                record("cycle_default", size, d, wbase, "defaults, after the first cycle"),
                warm_rec | {"note": "warm_slack=2x size, warmed up"}]
        for rec in rows:
            print(f"{rec['scenario']:<20}{fmt_size(size):>6}{rec['repeats']:>3}"
                  f"{rec['gbps_median']:>13.2f}{rec['gbps_best']:>11.2f}"
                  f"{rec['ratio_to_numpy']:>8.2f}x  {rec['note']}".rstrip())
        print()
        for rec in rows:
            rec["ratio_to_warm"] = rec.pop("ratio_to_numpy")
        results += rows
        cycle_goal.append((size, rows[1]["ratio_to_warm"]))

    parts = [f"{fmt_size(s)} {'met' if r >= GOAL else 'NOT met'} ({r:.2f}x)" for s, r in goal]
    print(f"goal: warm store write >= {GOAL}x numpy copy (medians): " + ", ".join(parts))
    print("goal " + ("met at every size" if all(r >= GOAL for _, r in goal)
                     else "NOT met at every size"))
    parts = [f"{fmt_size(s)} {'met' if r >= GOAL else 'NOT met'} ({r:.2f}x)" for s, r in default_goal]
    print(f"goal: default-store write >= {GOAL}x numpy copy (medians): " + ", ".join(parts))
    parts = [f"{fmt_size(s)} {'met' if r >= CYCLE_GOAL else 'NOT met'} ({r:.2f}x)"
             for s, r in cycle_goal]
    if parts:
        print(f"goal: default-store cycle >= {CYCLE_GOAL}x warm-store cycle (medians): "
              + ", ".join(parts))

    if args.json:
        doc = {"device": "host", "backend": "host", "date": date, "machine": machine,
               "versions": {"numpy": np.__version__, "python": platform.python_version(),
                            "gpu_backup": gpu_backup.__version__},
               "results": results}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

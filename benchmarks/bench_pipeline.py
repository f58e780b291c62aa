"""Issue 3's check: does a 4 KiB page cost the pipeline more than a 2 MiB page?

Run from the repo root:  python3 benchmarks/bench_pipeline.py [--device host|cuda]
                         [--size 256M] [--repeat 5] [--json PATH]

For each page size (4 KiB, 2 MiB), with the same staging ring and a warm store
(one untimed evict/restore first): evict + restore of one buffer (default 256 MiB),
median of the repeats, bytes checked once outside the timed region.  Prints both times,
their ratio, and whether the goal "4 KiB costs no more than 1.5x of 2 MiB" is met,
computed from the numbers.  On a GPU (``--device cuda``) it also prints evict and
restore GB/s beside the link (one pinned copy of the whole buffer) measured in the
same run.  On the host backend the numbers are host numbers, not GPU numbers.
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--device", default="host",
                    help="host (default), cuda, auto, or a GPU index")
    ap.add_argument("--size", default="256M", help="buffer size (default: 256M)")
    ap.add_argument("--repeat", type=int, default=5, help="timed repeats (default: 5)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat {args.repeat} must be >= 1")
    try:
        size = parse_size(args.size, multiple_of=max(PAGE_SIZES))
    except SizeError as e:
        ap.error(str(e))
    device: Any = int(args.device) if args.device.isdigit() else args.device

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
               "results": rows,
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

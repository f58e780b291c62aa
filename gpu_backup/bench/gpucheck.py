"""What ``benchmarks/gpu_check.sh`` needs from Python: which machine this is, and the summary.

``python -m gpu_backup.bench.gpucheck probe`` prints ``<mode> <slug> <device name>``
(mode ``gpu`` or ``host``; slug as ``benchmarks/results/README.md`` names files).
``python -m gpu_backup.bench.gpucheck summary MODE DIR BENCH_JSON PART...`` writes
``DIR/summary.txt``: every part with its status and time, then every goal met or
missed, from the files the parts wrote.  A PART is ``name|rc|seconds|budget|note``
(rc 124: the part ran out of its time budget; rc -1: not run here).  Exit status: 1 if
a part failed or a bench step failed, else 0.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

from .sizes import fmt_size

__all__ = ["slug", "probe", "summary_lines", "main"]

TOTAL_BUDGET_S = 480
"""The whole check must finish within 8 minutes on an H100."""
STORE_GOAL = 0.8


def slug(device_name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    s = re.sub(r"[^a-z0-9.]+", "-", device_name.strip().lower()).strip("-")
    return s or "unknown-device"


def probe() -> tuple[str, str, str]:
    """(mode, slug, device name) of the device ``"auto"`` picks."""
    from ..device import open_backend

    b = open_backend("auto")
    try:
        if b.name == "cuda":
            return "gpu", slug(b.device_name), b.device_name
        return "host", "host", f"host ({b.reason})"
    finally:
        b.close()


def _load(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _mark(met: bool | None) -> str:
    return {True: "[met]   ", False: "[MISSED]", None: "[n/a]   "}[met]


def _bench_lines(doc: dict[str, Any] | None) -> tuple[list[str], bool]:
    if doc is None:
        return ["[MISSED] gpu-backup bench wrote no readable JSON"], True
    out = _goal_lines("bench", doc["summary"]["goals"])
    fails = doc.get("failures", [])
    out.append(f"{_mark(not fails)} bench: every step completed"
               + ("" if not fails else f": {len(fails)} failed"))
    for f in fails:
        at = f" at {fmt_size(f['size_bytes'])}" if f.get("size_bytes") else ""
        out.append(f"           {f['step']}{at}: {f['error_type']}: {f['message'][:200]}")
    if doc.get("interrupted"):
        out.append("[MISSED] bench: interrupted (time budget); the JSON holds what finished")
    by = {(r["scenario"], r["size_bytes"]): r for r in doc["results"]}
    sizes = sorted({s for (n, s) in by if n == "evict"})
    if sizes:
        s = sizes[-1]
        parts = []
        for name in ("evict", "restore", "uvm_evict", "uvm_restore", "evict_first",
                     "link_d2h", "link_h2d"):
            r = by.get((name, s))
            if r:
                parts.append(f"{name} {r['gbps']:.3g}")
        out.append(f"         bench at {fmt_size(s)} (GB/s): " + ", ".join(parts))
        for name in ("evict", "restore"):
            r = by.get((name, s))
            if r and r.get("bound_by"):
                out.append(f"         {name} at {fmt_size(s)} is bounded by {r['bound_what']} "
                           f"({r['bound_gbps']:.3g} GB/s); measured {r['ratio_to_bound']:.2f}x "
                           "of that bound")
    uvm_skip = [x for x in doc.get("skipped", []) if x.get("step") == "uvm"]
    if not any(n.startswith("uvm_") for (n, _) in by) and uvm_skip:
        out.append(f"[n/a]    bench: uvm not run: {uvm_skip[0]['reason']}")
    ts = doc.get("torch_step") or {}
    out += _goal_lines("bench", ts.get("goals") or [])
    ts_skip = [x for x in doc.get("skipped", []) if x.get("step") == "torch_step"]
    if not ts.get("rows") and ts_skip:
        out.append(f"[n/a]    bench: torch_step not run: {ts_skip[0]['reason']}")
    return out, bool(fails)


def _goal_lines(part: str, goals: list[dict[str, Any]]) -> list[str]:
    out = []
    for g in goals:
        value = "n/a" if g["value"] is None else f"{g['value']:.3g} {g['unit']}"
        out.append(f"{_mark(g['met'])} {part}: {g['text']}: {value} ({g['detail']})")
    return out


def _torch_lines(doc: dict[str, Any] | None) -> list[str]:
    """bench_torch.py's goals (issue 13), evaluated from the rows of its JSON."""
    if doc is None:
        return ["[n/a]    bench_torch: no JSON"]
    from .torchstep import goals

    rows = doc.get("results") or []
    if not rows:
        return ["[n/a]    bench_torch: no rows"]
    out = _goal_lines("bench_torch", goals(rows))
    if rows[0].get("backend") == "host":
        out.append("         bench_torch: host backend (CPU tensors): not GPU figures")
    return out


def _pipeline_lines(doc: dict[str, Any] | None) -> list[str]:
    if doc is None:
        return ["[n/a]    bench_pipeline: no JSON"]
    g = doc["goal"]
    out = [f"{_mark(g['met'])} bench_pipeline: {g['text']}: {g['value']:.3g}x "
           f"(<= {g['threshold']}x)"]
    z = doc.get("zero_runs")
    if z:
        worst = max(z["evict_ratio"], z["restore_ratio"])
        out.append(f"{_mark(worst <= 1.2)} bench_pipeline: every-other-page-zero buffer evicts "
                   f"and restores in <= 1.2x the dense time: evict {z['evict_ratio']:.3g}x, "
                   f"restore {z['restore_ratio']:.3g}x")
    w = doc.get("swap")
    if w:
        out.append(f"{_mark(w['speedup'] >= 1.3)} bench_pipeline: swap >= 1.3x faster than evict "
                   f"+ restore in series: {w['speedup']:.3g}x ({w['swap_ms']:.3g} vs "
                   f"{w['series_ms']:.3g} ms, {w['swaps']} swaps)")
    c = doc.get("pieces")
    if c:
        out.append(f"         bench_pipeline: one piece costs {c['per_piece_us']:.3g} us: a zero "
                   f"run pays to skip above {c['breakeven_run_bytes_at_55GBps']:,} B at 55 GB/s")
    return out


def _store_lines(doc: dict[str, Any] | None) -> list[str]:
    if doc is None:
        return ["[n/a]    bench_store: no JSON"]
    out = []
    for r in doc["results"]:
        if r["scenario"] == "store_write_warm":
            x = r["ratio_to_numpy"]
            out.append(f"{_mark(x >= STORE_GOAL)} bench_store: warm store write >= "
                       f"{STORE_GOAL}x numpy copy at {fmt_size(r['size_bytes'])}: {x:.2f}x")
    return out or ["[n/a]    bench_store: no store_write_warm rows"]


def summary_lines(outdir: str, bench_json: str, parts: list[str],
                  mode: str = "gpu") -> tuple[list[str], int]:
    """The summary's lines and the exit status."""
    rows, failed, total = [], False, 0.0
    not_run: dict[str, str] = {}
    for spec in parts:
        name, rc, secs, budget, *note = spec.split("|")
        rc_i, t = int(rc), float(secs)
        total += t
        if rc_i == -1:
            status = "skipped"
            not_run[name] = note[0] if note and note[0] else "skipped"
        elif rc_i == 0:
            status = "ok"
        elif rc_i == 124:
            status = "TIMED OUT"
        elif name == "bench" and rc_i == 1:
            status = "FAILED (a step failed: see below)"
        else:
            status = f"FAILED (rc {rc_i})"
        failed |= rc_i not in (0, -1)
        rows.append(f"  {name:<16}{status:<36}{t:>7.1f} s  (budget {budget} s)"
                    + (f"  {note[0]}" if note and note[0] else ""))
    bench, bench_failed = _bench_lines(_load(bench_json))
    lines = [f"gpu_check: mode {mode}; results in {outdir}",
             f"total {total:.0f} s" + (f" (goal: under {TOTAL_BUDGET_S} s on an H100)"
                                       if mode == "gpu" else " (host mode: tiny sizes)"),
             "", "parts:", *rows, "", "goals:"]
    if mode == "gpu":
        lines.append(f"{_mark(total < TOTAL_BUDGET_S)} whole check under {TOTAL_BUDGET_S} s: "
                     f"{total:.0f} s")
    lines += bench
    lines += _pipeline_lines(_load(os.path.join(outdir, "pipeline.json")))
    lines += _store_lines(_load(os.path.join(outdir, "store.json")))
    if "bench_torch" in not_run:
        lines.append(f"[n/a]    bench_torch: not run: {not_run['bench_torch']}")
    else:
        lines += _torch_lines(_load(os.path.join(outdir, "torch.json")))
    if mode == "host":
        lines += ["", "HOST MODE: no usable GPU; every figure above is a host figure, not a "
                      "GPU figure. Do not commit these under benchmarks/results/."]
    return lines, int(failed or bench_failed)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["probe"]:
        mode, s, name = probe()
        print(mode, s, name)
        return 0
    if args[:1] == ["summary"] and len(args) >= 4:
        mode, outdir, bench_json, *parts = args[1:]
        lines, rc = summary_lines(outdir, bench_json, parts, mode)
        text = "\n".join(lines) + "\n"
        with open(os.path.join(outdir, "summary.txt"), "w") as f:
            f.write(text)
        sys.stdout.write(text)
        return rc
    print("usage: python -m gpu_backup.bench.gpucheck probe | summary MODE DIR BENCH_JSON "
          "PART...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""Turning bench results into a verdict, a table, a JSON file and a plot.

The goals are evaluated from the measured numbers of the same run (never
hard-coded).  On the host backend every output says, prominently, that the figures
are host figures and not GPU figures.  rich and matplotlib are imported inside the
functions that need them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from typing import Any

from .sizes import fmt_size

__all__ = ["HOST_NOTE", "summarize", "print_report", "to_json", "write_json", "plot"]

HOST_NOTE = ("HOST BACKEND: device memory is emulated in host RAM and copies run on CPU "
             "threads. These are host figures, NOT GPU figures; the goals are GPU goals, "
             "evaluated here only from these host numbers.")
BIG = 256 << 20
SMALL_RT = 64 << 10

# scenario -> (colour, marker, linestyle); the order is the legend's.  The label is
# the scenario's own name, as in the table and the JSON.
_STYLE: dict[str, tuple[str, str, str]] = {
    "link_d2h": ("black", "", "--"),
    "link_h2d": ("dimgray", "", ":"),
    "evict": ("tab:blue", "o", "-"),
    "restore": ("tab:orange", "s", "-"),
    "evict_restore": ("tab:purple", "D", "-"),
    "evict_first": ("tab:cyan", "v", "--"),
    "restore_first": ("gold", "^", "--"),
    "uvm_evict": ("tab:blue", "o", ":"),
    "uvm_restore": ("tab:orange", "s", ":"),
    "pageable": ("tab:red", "^", "-."),
    "page_at_a_time": ("tab:brown", "x", "-."),
    "torch_d2h": ("tab:pink", "<", "-."),
    "torch_h2d": ("darkkhaki", ">", "-."),
    "evict_clean": ("tab:gray", "*", "-"),
    "evict_zero": ("tab:olive", "X", "-"),
    "oversubscribe": ("tab:green", "P", "-"),
    "swap": ("tab:purple", "h", "-."),
}
_OTHER = ("tab:gray", ".", "-")

_NICE = [m * 10.0 ** e for e in range(-4, 5) for m in (1, 2, 5)]
"""Tick values for the log axes: 0.1, 0.2, 0.5, 1, 2, 5, ..."""


# ------------------------------------------------------------------ summary
def goal(name: str, text: str, value: float | None, threshold: float, op: str, unit: str,
         detail: str) -> dict[str, Any]:
    """One goal row: the measured ``value`` against ``threshold`` (``op`` is ``>=`` or
    ``<=``); ``met`` is None when the value was not measured."""
    met = None
    if value is not None:
        met = value >= threshold if op == ">=" else value <= threshold
    return {"goal": name, "text": text, "value": value, "threshold": threshold, "op": op,
            "unit": unit, "met": met, "evaluated": value is not None, "detail": detail}


def _ratio_at_largest_common(by: dict[tuple[str, int], dict[str, Any]], a: str,
                             b: str) -> tuple[float | None, str]:
    common = sorted({s for (n, s) in by if n == a} & {s for (n, s) in by if n == b})
    if not common:
        return None, f"not evaluated: {a} and {b} never ran at the same size"
    s = common[-1]
    ga, gb = by[(a, s)]["gbps"], by[(b, s)]["gbps"]
    return ga / gb, f"at {fmt_size(s)}: {a} {ga:.3g} GB/s vs {b} {gb:.3g} GB/s"


def summarize(results: list[dict[str, Any]], backend: str,
              failures: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The goals, each with the measured value, threshold and ``met`` (None when the
    needed scenarios did not run), and how many steps failed."""
    by = {(r["scenario"], r["size_bytes"]): r for r in results}
    goals = []

    big = [r for r in results if r["scenario"] in ("evict", "restore") and r["size_bytes"] >= BIG
           and r.get("ratio_to_link") is not None]
    if big:
        worst = min(big, key=lambda r: r["ratio_to_link"])
        detail = (f"lowest: {worst['scenario']} at {fmt_size(worst['size_bytes'])}, "
                  f"{worst['gbps']:.3g} GB/s vs link {worst['link_gbps']:.3g} GB/s")
        value = worst["ratio_to_link"]
    else:
        value, detail = None, f"not evaluated: no size >= {fmt_size(BIG)} ran"
    goals.append(goal("evict_restore_vs_link",
                       f"evict and restore >= 0.9x link (sizes >= {fmt_size(BIG)})",
                       value, 0.9, ">=", "x link", detail))

    value, detail = _ratio_at_largest_common(by, "evict", "page_at_a_time")
    goals.append(goal("evict_vs_page_at_a_time", "evict >= 10x page_at_a_time (largest common size)",
                       value, 10.0, ">=", "x", detail))

    value, detail = _ratio_at_largest_common(by, "evict", "pageable")
    goals.append(goal("evict_vs_pageable", "evict >= 2x pageable (largest common size)",
                       value, 2.0, ">=", "x", detail))

    rt = by.get(("evict_restore", SMALL_RT))
    if rt is not None:
        value = rt["p50_us"]
        detail = (f"p50 of evict + restore of one {fmt_size(SMALL_RT)} buffer, "
                  f"{rt['repeats']} repeats")
    else:
        value, detail = None, f"not evaluated: {fmt_size(SMALL_RT)} did not run"
    goals.append(goal("small_roundtrip_latency", f"{fmt_size(SMALL_RT)} evict+restore p50 <= 100 us",
                       value, 100.0, "<=", "us", detail))

    evaluated = [g for g in goals if g["evaluated"]]
    out: dict[str, Any] = {
        "goals": goals,
        "evaluated": len(evaluated),
        "met": sum(bool(g["met"]) for g in evaluated),
        "all_met": bool(evaluated) and all(g["met"] for g in evaluated),
        "failed_steps": len(failures or ()),
    }
    if backend == "host":
        out["note"] = HOST_NOTE
    return out


# -------------------------------------------------------------------- table
def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, fmt)


def _short_note(r: dict[str, Any]) -> str:
    s = r["scenario"]
    if s == "oversubscribe":
        return f"{r['misses']}/{r['touches']} misses; effective = ideal/actual time"
    if s == "evict_restore":
        return "link = 1/(1/d2h+1/h2d)"
    if s == "page_at_a_time":
        return "4 KiB per copy call"
    if s == "pageable":
        return "sync copy + host copy"
    if s in ("evict_first", "restore_first"):
        return "first cycle, new manager"
    note = r.get("note", "")
    return "" if note in ("default store", "one pinned buffer, one copy") else note


def _bounds_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in doc["results"] if r.get("bound_gbps")]


def print_report(doc: dict[str, Any], console: Any = None) -> None:
    """The results table, host limits and bounds, skipped and failed steps, and the goals,
    with rich."""
    from rich.console import Console
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    console = console or Console()
    host = doc["backend"] == "host"
    if host:
        console.print(Panel(f"[bold]{HOST_NOTE}[/bold]\nwhy host: {escape(doc['backend_reason'])}",
                            title="[bold red]HOST BACKEND — NOT GPU FIGURES[/bold red]",
                            border_style="red"))
    title = escape(f"gpu_backup bench: {doc['device']} (backend {doc['backend']}), {doc['date']}")
    table = Table(title=title, title_justify="left",
                  caption=escape("GB/s: median; range: [slowest, fastest repeat]; x link: "
                                 "copies only; x eff.: scenarios that copy nothing or less "
                                 "(not bounded by the link); spread 'wide': IQR > 25% of the "
                                 "median (below 5 repeats: max - min > the median)"),
                  caption_justify="left")
    for col, kw in (("scenario", {}), ("size", {"justify": "right"}),
                    ("GB/s", {"justify": "right"}), ("range", {"justify": "right"}),
                    ("x link", {"justify": "right"}), ("x eff.", {"justify": "right"}),
                    ("p50 µs", {"justify": "right"}), ("n", {"justify": "right"}),
                    ("spread", {}), ("note", {"style": "dim"})):
        table.add_column(col, **kw)
    last = None
    for r in doc["results"]:
        if last is not None and r["size_bytes"] != last:
            table.add_section()
        last = r["size_bytes"]
        style = "bold" if r["scenario"] in ("evict", "restore", "evict_restore") else None
        spread = r.get("spread", "ok")
        table.add_row(r["scenario"], fmt_size(r["size_bytes"]), _num(r["gbps"], ".3g"),
                      f"[{_num(r.get('gbps_min'), '.3g')}, {_num(r.get('gbps_max'), '.3g')}]",
                      _num(r.get("ratio_to_link"), ".2f") if r.get("ratio_to_link") else "",
                      _num(r.get("effective_ratio"), ".2f") if r.get("effective_ratio") else "",
                      _num(r["p50_us"], ",.0f"), str(r["repeats"]),
                      "[yellow]wide[/yellow]" if spread == "wide" else spread,
                      escape(_short_note(r)), style=style)
    console.print(table)
    _print_torch_step(doc, console)
    _print_limits(doc, console)
    if doc["skipped"]:
        console.print("[bold]skipped[/bold]")
        for s in doc["skipped"]:
            at = f" at {fmt_size(s['size_bytes'])}" if s.get("size_bytes") else ""
            what = ", ".join(s.get("scenarios") or [s.get("step", "?")])
            console.print(escape(f"  {s.get('step')} ({what}){at}: {s['reason']}"))
    for f in doc.get("failures", ()):
        at = f" at {fmt_size(f['size_bytes'])}" if f.get("size_bytes") else ""
        console.print(f"[bold red]FAILED[/bold red] {escape(f['step'])}{at} "
                      f"({escape(', '.join(f['scenarios']))}): "
                      f"{escape(f['error_type'])}: {escape(f['message'])}")
    summary = doc["summary"]
    gt = Table(title="goals (from the numbers above)" + (" — HOST figures" if host else ""),
               title_justify="left")
    for col in ("goal", "measured", "met", "detail"):
        gt.add_column(col)
    for g in summary["goals"]:
        met = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "n/a"}[g["met"]]
        value = "n/a" if g["value"] is None else f"{_num(g['value'], '.3g')} {g['unit']}"
        gt.add_row(escape(g["text"]), value, met, escape(g["detail"]))
    for g in _torch_step(doc)["goals"]:
        met = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "n/a"}[g["met"]]
        value = "n/a" if g["value"] is None else f"{_num(g['value'], '.3g')} {g['unit']}"
        gt.add_row(escape(g["text"]), value, met, escape(g["detail"]))
    console.print(gt)
    if doc.get("failures"):
        console.print(f"[bold red]{len(doc['failures'])} step(s) failed; every other row "
                      "above is complete[/bold red]")
    if host:
        console.print("[bold red]host backend: not GPU figures.[/bold red]")


def _torch_step(doc: dict[str, Any]) -> dict[str, Any]:
    """The document's ``torch_step`` section (empty in documents from before it)."""
    return doc.get("torch_step") or {"config": None, "rows": [], "goals": []}


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def _print_torch_step(doc: dict[str, Any], console: Any) -> None:
    """The ``torch_step`` rows: a table of their own (training steps, not copies)."""
    from rich.markup import escape
    from rich.table import Table

    rows = _torch_step(doc)["rows"]
    if not rows:
        return
    r0 = rows[0]
    limit = next((r["device_limit"] for r in rows if r["device_limit"] is not None), None)
    host = r0["backend"] == "host"
    t = Table(title=escape(f"torch_step: one training step per mode (not a copy: no link "
                           f"ratio), torch {r0['torch']}" + (" — HOST figures" if host else "")),
              title_justify="left",
              caption=escape(
                  f"model: depth {r0['depth']}, width {r0['width']}, batch {r0['batch']}; "
                  f"saved per step {_mib(r0['saved_bytes_per_step'])}; offload's device_limit "
                  f"{_mib(limit)}; median of {r0['steps']} steps"
                  + ("; host: CPU tensors, torch's CPU memory not measured, nothing pinned"
                     if host else "")),
              caption_justify="left")
    for col in ("mode", "step ms", "x none", "peak device", "buffers", "pinned host",
                "evictions", "restores", "same losses"):
        t.add_column(col, justify="left" if col in ("mode", "same losses") else "right")
    for r in rows:
        same = r["same_losses_as_none"]
        t.add_row(r["mode"], _num(r["step_s"] * 1e3, ".3g"),
                  _num(r["ratio_to_none"], ".2f"), _mib(r["peak_device_bytes"]),
                  _mib(r["buffers_peak_bytes"]), _mib(r["pinned_host_bytes"]),
                  str(r["evictions"]), str(r["restores"]),
                  {True: "yes", False: "[red]NO[/red]", None: "n/a"}[same])
    console.print(t)


def _print_limits(doc: dict[str, Any], console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    lim = doc.get("host_limits")
    if not lim:
        return
    console.print(escape(
        f"host-side limits ({fmt_size(lim['bytes'])} per copy, GB/s): into warm memfd pages "
        f"{lim['write_1']:.3g} (1 thread), {lim['write_n']:.3g} ({lim['threads']} threads), "
        f"{lim['write_cpus']:.3g} ({lim['cpus']} CPUs); out of memfd {lim['read_1']:.3g} / "
        f"{lim['read_n']:.3g} / {lim['read_cpus']:.3g}; first touch of fresh memfd pages "
        f"{lim['first_touch']:.3g}"))
    rows = _bounds_rows(doc)
    if not rows:
        return
    t = Table(title="what bounds each operation: the slower of the link and the host copies",
              title_justify="left")
    for col in ("scenario", "size", "link GB/s", "host GB/s", "bound by", "measured",
                "x bound"):
        t.add_column(col, justify="left" if col in ("scenario", "bound by") else "right")
    for r in rows:
        t.add_row(r["scenario"], fmt_size(r["size_bytes"]), _num(r.get("link_gbps"), ".3g"),
                  _num(r.get("host_gbps"), ".3g"), escape(r["bound_what"]), _num(r["gbps"], ".3g"),
                  _num(r.get("ratio_to_bound"), ".2f"))
    console.print(t)


# --------------------------------------------------------------------- files
def to_json(doc: dict[str, Any]) -> str:
    """The document as strict JSON text (no NaN or infinity)."""
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


def write_json(doc: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write the document atomically: a temporary file beside ``path``, then
    ``os.replace``, so a reader (or a crash) never sees half a file."""
    text = to_json(doc)
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".bench-", suffix=".json.tmp", dir=d)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)        # as open() would have made it, not 0600
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _series(doc: dict[str, Any], key: str) -> dict[str, list[tuple[int, float, float, float]]]:
    """scenario -> sorted (size, value, low, high) of ``key`` (``gbps``, ``ratio_to_link`` or
    ``effective_ratio``); low/high span the interquartile range of the repeats (the full
    range below 5 repeats)."""
    out: dict[str, list[tuple[int, float, float, float]]] = {}
    for r in doc["results"]:
        v = r.get(key)
        if v is None or not math.isfinite(v) or v <= 0:
            continue
        scale = v / r["gbps"] if r.get("gbps") else 1.0
        lo = (r.get("gbps_lo") or r["gbps"]) * scale
        hi = (r.get("gbps_hi") or r["gbps"]) * scale
        out.setdefault(r["scenario"], []).append((r["size_bytes"], v, lo, hi))
    return {k: sorted(v) for k, v in out.items()}


def _order(names: Any) -> list[str]:
    known = [n for n in _STYLE if n in names]
    return known + sorted(n for n in names if n not in _STYLE)


def _draw(ax: Any, series: dict[str, list[tuple[int, float, float, float]]]) -> None:
    for name in _order(series):
        pts = series[name]
        color, marker, ls = _STYLE.get(name, _OTHER)
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        err = [[max(0.0, p[1] - p[2]) for p in pts], [max(0.0, p[3] - p[1]) for p in pts]]
        link = name.startswith("link_")
        ax.errorbar(xs, ys, yerr=err, label=name, color=color, marker=marker or None,
                    linestyle=ls, linewidth=2.6 if link else 1.5, markersize=5, capsize=3,
                    elinewidth=1, zorder=3 if link else 4)


def _log_axes(ax: Any, sizes: list[int], ylabel: str, fmt: str) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(sizes, [fmt_size(s) for s in sizes])
    ax.set_xlabel("buffer size (log scale)")
    ax.grid(True, which="major", alpha=0.35)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(FixedLocator(_NICE))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt.format(v)))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylabel(ylabel)


def _ylim(ax: Any, series: dict[str, list[tuple[int, float, float, float]]],
          include: tuple[float, ...] = ()) -> None:
    vals = [v for pts in series.values() for p in pts for v in (p[2], p[3]) if v > 0]
    vals += list(include)
    if vals:
        ax.set_ylim(min(vals) / 1.5, max(vals) * 1.5)


_MODE_COLOR = {"none": "tab:gray", "save_on_cpu": "tab:red", "offload_fits": "tab:cyan",
               "offload": "tab:blue"}


def _draw_torch_step(ax: Any, doc: dict[str, Any]) -> None:
    """``torch_step``'s panel: median step time per mode (bars, IQR or range as error bars,
    slowest to fastest below 5 steps), each labelled with its ratio to ``none``, pinned
    host memory and evictions.  Its own axes: a training step, not a copy."""
    rows = _torch_step(doc)["rows"]
    if not rows:
        why = next((s["reason"] for s in doc.get("skipped", ()) if s.get("step") == "torch_step"),
                   None) or next((f"failed: {f['error_type']}" for f in doc.get("failures", ())
                                  if f.get("step") == "torch_step"), "did not run")
        ax.text(0.5, 0.5, "torch_step: " + why, transform=ax.transAxes, ha="center",
                va="center", color="gray", wrap=True)
        ax.set_axis_off()
        return
    import numpy as np

    names = [r["mode"] for r in rows]
    ms = [r["step_s"] * 1e3 for r in rows]
    lo, hi = [], []
    for r, m in zip(rows, ms):
        t = np.asarray(r["step_times_s"]) * 1e3
        a, b = (np.percentile(t, [25, 75]) if t.size >= 5 else (t.min(), t.max()))
        lo.append(max(0.0, m - a))
        hi.append(max(0.0, b - m))
    y = np.arange(len(rows))
    ax.barh(y, ms, xerr=[lo, hi], color=[_MODE_COLOR.get(n, "tab:gray") for n in names],
            capsize=3)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    for i, r in enumerate(rows):
        ratio = "" if r["ratio_to_none"] is None else f"{r['ratio_to_none']:.2f}x none"
        pinned = "" if r["backend"] == "host" else f", pinned {_mib(r['pinned_host_bytes'])}"
        ax.annotate(f" {ratio}{pinned}, {r['evictions']} evictions", (ms[i] + hi[i], i),
                    va="center", fontsize=8)
    ax.set_xlim(0, max(m + h for m, h in zip(ms, hi)) * 1.9)
    ax.set_xlabel("step ms: median; bars: IQR (range < 5 steps)")
    r0 = rows[0]
    ax.set_title("torch_step: one training step (not a copy)\n"
                 f"depth {r0['depth']}, width {r0['width']}, batch {r0['batch']}, "
                 f"saved {_mib(r0['saved_bytes_per_step'])}/step"
                 + ("\nHOST: CPU tensors, nothing pinned" if r0["backend"] == "host" else ""),
                 fontsize=10)
    ax.grid(True, axis="x", alpha=0.35)


def plot(doc: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """One PNG from whatever rows the document has: throughput of the copies with the
    link measured in this run (left), each copy's ratio to the link of its direction
    (second), the effective ratio of the scenarios that copy nothing or less (third,
    never against the link line), and ``torch_step``'s step time per mode (right, on
    axes of its own).  Error bars span the interquartile range of the repeats
    (slowest to fastest below 5 repeats)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    host = doc["backend"] == "host"
    copies = {r["scenario"] for r in doc["results"] if r.get("kind", "copy") == "copy"}
    tput = {k: v for k, v in _series(doc, "gbps").items() if k in copies}
    ratio = {k: v for k, v in _series(doc, "ratio_to_link").items()
             if not k.startswith("link_")}
    eff = _series(doc, "effective_ratio")
    sizes = sorted({r["size_bytes"] for r in doc["results"]}) or doc["config"]["sizes"]

    fig = Figure(figsize=(23, 7.5), layout="constrained", dpi=100)
    FigureCanvasAgg(fig)
    ax_t, ax_r, ax_e, ax_s = fig.subplots(1, 4, width_ratios=(1, 1, 1, 0.75))
    _draw(ax_t, tput)
    _draw(ax_r, ratio)
    _draw(ax_e, eff)
    _log_axes(ax_t, sizes, "throughput, GB/s (1e9 B/s, log scale)", "{:g}")
    _log_axes(ax_r, sizes, "ratio to the link of the same direction and size", "{:g}x")
    _log_axes(ax_e, sizes, "effective GB/s / link GB/s (no copy: not bounded by it)", "{:g}x")
    _ylim(ax_t, tput)
    _ylim(ax_r, ratio, (0.5, 1.0))
    _ylim(ax_e, eff, (1.0,))
    cfg = doc["config"]
    ax_t.set_title(f"copies: median of >= {cfg['repeat']} repeats "
                   f"(x{cfg['small_size_repeat_factor']} up to {fmt_size(cfg['small_size_max'])})"
                   "\nlink_d2h / link_h2d: the link measured in this run; "
                   "bars: interquartile range", fontsize=10)
    ax_r.axhline(1.0, color="black", linestyle="--", linewidth=1.2, label="link (1.0x)")
    ax_r.axhline(0.9, color="tab:green", linestyle=":", linewidth=1.2, label="goal 0.9x")
    ax_r.set_title("copies: fraction of the link of the same direction", fontsize=10)
    ax_e.set_title("no copy or fewer copies (evict_clean, evict_zero, oversubscribe):\n"
                   "effective ratio, not a fraction of the link", fontsize=10)
    if not eff:
        ax_e.text(0.5, 0.5, "no such rows in this run", transform=ax_e.transAxes,
                  ha="center", va="center", color="gray")
    _draw_torch_step(ax_s, doc)
    handles, labels = [], []
    for ax in (ax_t, ax_r, ax_e):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncol=9, fontsize=9, frameon=False)
    title = f"gpu_backup bench — {doc['device']} — {doc['date']}"
    if doc.get("failures"):
        title += f"  ({len(doc['failures'])} step(s) FAILED: see the JSON)"
    if host:
        title += "\nHOST BACKEND — not GPU figures (device memory emulated in host RAM)"
    fig.suptitle(title, fontsize=13, fontweight="bold", color="firebrick" if host else "black")
    fig.savefig(path, format="png")

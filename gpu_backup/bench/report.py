"""Turning bench results into a verdict, a table, a JSON file and a plot.

The goals are evaluated from the measured numbers of the same run (never
hard-coded).  On the host backend every output says, prominently, that the figures
are host figures and not GPU figures.  rich and matplotlib are imported inside the
functions that need them.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from .sizes import fmt_size

__all__ = ["HOST_NOTE", "summarize", "print_report", "write_json", "plot"]

HOST_NOTE = ("HOST BACKEND: device memory is emulated in host RAM and copies run on CPU "
             "threads. These are host figures, NOT GPU figures; the goals are GPU goals, "
             "evaluated here only from these host numbers.")
BIG = 256 << 20
SMALL_RT = 64 << 10

# scenario -> (label, colour, marker, linestyle); the order is the legend's
_STYLE: dict[str, tuple[str, str, str, str]] = {
    "link_d2h": ("link d2h (1 pinned copy)", "black", "", "--"),
    "link_h2d": ("link h2d (1 pinned copy)", "dimgray", "", ":"),
    "evict": ("evict (warm store)", "tab:blue", "o", "-"),
    "restore": ("restore", "tab:orange", "s", "-"),
    "evict_restore": ("evict + restore round trip", "tab:purple", "D", "-"),
    "evict_cold": ("evict, fresh store", "tab:cyan", "v", "-"),
    "oversubscribe": ("oversubscribe (effective)", "tab:green", "P", "-"),
    "pageable": ("pageable (cuDF-style)", "tab:red", "^", "-."),
    "page_at_a_time": ("4 KiB copy per page", "tab:brown", "x", "-."),
    "torch_d2h": ("torch d2h", "tab:pink", "<", "-."),
    "torch_h2d": ("torch h2d", "tab:olive", ">", "-."),
}


_NICE = [m * 10.0 ** e for e in range(-4, 5) for m in (1, 2, 5)]
"""Tick values for the log axes: 0.1, 0.2, 0.5, 1, 2, 5, ..."""


# ------------------------------------------------------------------ summary
def _goal(name: str, text: str, value: float | None, threshold: float, op: str, unit: str,
          detail: str) -> dict[str, Any]:
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


def summarize(results: list[dict[str, Any]], backend: str) -> dict[str, Any]:
    """The issue's goals, each with the measured value, threshold and ``met`` (None when
    the needed scenarios did not run)."""
    by = {(r["scenario"], r["size_bytes"]): r for r in results}
    goals = []

    big = [r for r in results if r["scenario"] in ("evict", "restore") and r["size_bytes"] >= BIG]
    if big:
        worst = min(big, key=lambda r: r["ratio_to_link"])
        detail = (f"lowest: {worst['scenario']} at {fmt_size(worst['size_bytes'])}, "
                  f"{worst['gbps']:.3g} GB/s vs link {worst['link_gbps']:.3g} GB/s")
        value = worst["ratio_to_link"]
    else:
        value, detail = None, f"not evaluated: no size >= {fmt_size(BIG)} ran"
    goals.append(_goal("evict_restore_vs_link",
                       f"evict and restore >= 0.9x link (sizes >= {fmt_size(BIG)})",
                       value, 0.9, ">=", "x link", detail))

    value, detail = _ratio_at_largest_common(by, "evict", "page_at_a_time")
    goals.append(_goal("evict_vs_page_at_a_time", "evict >= 10x page_at_a_time (largest common size)",
                       value, 10.0, ">=", "x", detail))

    value, detail = _ratio_at_largest_common(by, "evict", "pageable")
    goals.append(_goal("evict_vs_pageable", "evict >= 2x pageable (largest common size)",
                       value, 2.0, ">=", "x", detail))

    rt = by.get(("evict_restore", SMALL_RT))
    if rt is not None:
        value = rt["p50_us"]
        detail = (f"p50 of evict + restore of one {fmt_size(SMALL_RT)} buffer, "
                  f"{rt['repeats']} repeats")
    else:
        value, detail = None, f"not evaluated: {fmt_size(SMALL_RT)} did not run"
    goals.append(_goal("small_roundtrip_latency", f"{fmt_size(SMALL_RT)} evict+restore p50 <= 100 us",
                       value, 100.0, "<=", "us", detail))

    evaluated = [g for g in goals if g["evaluated"]]
    out: dict[str, Any] = {
        "goals": goals,
        "evaluated": len(evaluated),
        "met": sum(bool(g["met"]) for g in evaluated),
        "all_met": bool(evaluated) and all(g["met"] for g in evaluated),
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
        return f"{r['misses']}/{r['touches']} misses; ratio=ideal/actual"
    if s == "evict_restore":
        return "link = 1/(1/d2h+1/h2d)"
    if s == "evict_cold":
        return "fresh store per repeat"
    if s == "page_at_a_time":
        return "4 KiB per copy call"
    if s == "pageable":
        return "sync copy + host copy"
    note = r.get("note", "")
    return "" if note in ("warm store", "one pinned buffer, one copy") else note


def print_report(doc: dict[str, Any], console: Any = None) -> None:
    """The results table, skipped scenarios and the goals, with rich."""
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
    table = Table(title=title, title_justify="left")
    for col, kw in (("scenario", {}), ("size", {"justify": "right"}),
                    ("GB/s", {"justify": "right"}), ("x link", {"justify": "right"}),
                    ("p50 µs", {"justify": "right"}), ("n", {"justify": "right"}),
                    ("note", {"style": "dim"})):
        table.add_column(col, **kw)
    last = None
    for r in doc["results"]:
        if last is not None and r["size_bytes"] != last:
            table.add_section()
        last = r["size_bytes"]
        style = "bold" if r["scenario"] in ("evict", "restore", "evict_restore") else None
        table.add_row(r["scenario"], fmt_size(r["size_bytes"]), _num(r["gbps"], ".3g"),
                      _num(r["ratio_to_link"], ".2f"), _num(r["p50_us"], ",.0f"),
                      str(r["repeats"]), escape(_short_note(r)), style=style)
    console.print(table)
    if doc["skipped"]:
        console.print("[bold]skipped[/bold]")
        for s in doc["skipped"]:
            at = f" at {fmt_size(s['size_bytes'])}" if s.get("size_bytes") else ""
            console.print(escape(f"  {s['scenario']}{at}: {s['reason']}"))
    summary = doc["summary"]
    gt = Table(title="goals (from the numbers above)" + (" — HOST figures" if host else ""),
               title_justify="left")
    for col in ("goal", "measured", "met", "detail"):
        gt.add_column(col)
    for g in summary["goals"]:
        met = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "n/a"}[g["met"]]
        value = "n/a" if g["value"] is None else f"{_num(g['value'], '.3g')} {g['unit']}"
        gt.add_row(escape(g["text"]), value, met,
                   escape(g["detail"]))
    console.print(gt)
    if host:
        console.print("[bold red]host backend: not GPU figures.[/bold red]")


# --------------------------------------------------------------------- files
def write_json(doc: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write the document (strict JSON: no NaN or infinity)."""
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, allow_nan=False)
        f.write("\n")


def plot(doc: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """One PNG: throughput vs size per scenario with the measured link lines (left), and
    each scenario's ratio to the link of its direction (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    host = doc["backend"] == "host"
    series: dict[str, list[tuple[int, float, float | None]]] = {}
    for r in doc["results"]:
        if r["scenario"] in _STYLE:
            series.setdefault(r["scenario"], []).append(
                (r["size_bytes"], r["gbps"], r["ratio_to_link"]))
    sizes = sorted({r["size_bytes"] for r in doc["results"]})

    fig = Figure(figsize=(14, 7), layout="constrained", dpi=110)
    FigureCanvasAgg(fig)
    ax_t, ax_r = fig.subplots(1, 2)
    for name, (label, color, marker, ls) in _STYLE.items():
        pts = sorted(series.get(name, []))
        if not pts:
            continue
        xs = [p[0] for p in pts]
        link = name.startswith("link_")
        ax_t.plot(xs, [p[1] for p in pts], label=label, color=color, marker=marker or None,
                  linestyle=ls, linewidth=2.6 if link else 1.6, markersize=6, zorder=3 if link else 4)
        if not link and name != "oversubscribe":
            ax_r.plot(xs, [p[2] for p in pts], label=label, color=color, marker=marker,
                      linestyle=ls, linewidth=1.6, markersize=6)
        elif name == "oversubscribe":
            ax_r.plot(xs, [p[2] for p in pts], label="oversubscribe (ideal / actual time)",
                      color=color, marker=marker, linestyle=ls, linewidth=1.6, markersize=6)
    for ax in (ax_t, ax_r):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(sizes, [fmt_size(s) for s in sizes])
        ax.set_xlabel("buffer size (bytes, log scale)")
        ax.grid(True, which="major", alpha=0.35)
    ax_t.set_yscale("log")
    ax_t.yaxis.set_major_locator(FixedLocator(_NICE))
    ax_t.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_t.yaxis.set_minor_locator(NullLocator())
    ax_t.set_ylabel("throughput, GB/s (1e9 B/s, log scale)")
    cfg = doc["config"]
    ax_t.set_title(f"throughput vs size: medians of {cfg['repeat']} repeats "
                   f"({cfg['repeat'] * cfg['small_size_repeat_factor']} up to "
                   f"{fmt_size(cfg['small_size_max'])})\nblack dashed / grey dotted: the link "
                   "measured in this run", fontsize=10)
    ax_r.axhline(1.0, color="black", linestyle="--", linewidth=1.2, label="link (1.0)")
    ax_r.axhline(0.9, color="tab:green", linestyle=":", linewidth=1.2, label="goal 0.9x")
    ax_r.set_ylabel("ratio to the link of the same direction and size (log scale)")
    ax_r.set_title("fraction of the link of the same direction reached\n"
                   "(evict_clean and evict_zero copy nothing and are not plotted: see the JSON)", fontsize=10)
    ax_r.set_yscale("log")
    ratios = [p[2] for pts in series.values() for p in pts if p[2]]
    if ratios:
        ax_r.set_ylim(min(ratios + [0.5]) / 1.5, max(ratios + [1.0]) * 1.5)
    ax_r.yaxis.set_major_locator(FixedLocator(_NICE))
    ax_r.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax_r.yaxis.set_minor_locator(NullLocator())
    handles, labels = [], []
    for ax in (ax_t, ax_r):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncol=5, fontsize=9, frameon=False)

    title = f"gpu_backup bench — {doc['device']} — {doc['date']}"
    if host:
        title += "\nHOST BACKEND — not GPU figures (device memory emulated in host RAM)"
    fig.suptitle(title, fontsize=13, fontweight="bold", color="firebrick" if host else "black")
    fig.savefig(path, format="png")

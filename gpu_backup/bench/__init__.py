"""Benchmarks of the eviction pipeline against the host link and the alternatives.

``run_bench(BenchConfig(...))`` runs every scenario in one process and returns a JSON-ready
document; ``print_report``, ``write_json`` and ``plot`` present it.  Used by the
``gpu-backup bench`` command and by ``benchmarks/``.  Importing this package imports
neither rich, matplotlib, cupy nor torch.
"""

from __future__ import annotations

from .env import machine, now_iso, versions
from .report import HOST_NOTE, plot, print_report, summarize, to_json, write_json
from .runner import FULL_SIZES, QUICK_SIZES, STEPS, BenchConfig, run_bench
from .scenarios import VerifyError
from .sizes import SizeError, fmt_bytes, fmt_size, parse_size, parse_sizes
from .stats import Repeats

__all__ = [
    "FULL_SIZES",
    "HOST_NOTE",
    "QUICK_SIZES",
    "STEPS",
    "BenchConfig",
    "Repeats",
    "SizeError",
    "VerifyError",
    "fmt_bytes",
    "fmt_size",
    "machine",
    "now_iso",
    "parse_size",
    "parse_sizes",
    "plot",
    "print_report",
    "run_bench",
    "summarize",
    "to_json",
    "versions",
    "write_json",
]

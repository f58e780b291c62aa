"""The ``gpu-backup`` command: ``info``, ``bench`` and ``demo``.

Exit status: 0 success; 1 a failure (bytes did not verify, a bench step failed, no usable
device); 2 bad input (argparse's convention), with a message that states the numbers;
130 interrupted.
rich (tables, progress) and matplotlib (the plot) are imported only when a command
needs them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import asdict
from typing import Any

import numpy as np

from . import __version__
from ._os import host_memory
from .bench.env import cuda_versions
from .bench.sizes import SizeError, fmt_bytes, fmt_size, parse_size, parse_sizes
from .errors import HostFallbackWarning, NoDeviceError
from .staging import Staging
from .store import PAGE_SIZE

__all__ = ["main", "build_parser"]

DEMO_HOST_BUDGET = 64 << 20
DEMO_CUDA_CAP = 4 << 30
DEMO_BYTES_PER_TOUCH = 8
"""Bytes the demo changes in a buffer each time it uses it."""


class UsageError(Exception):
    """Bad command-line input; the message says what and gives the numbers."""


# ------------------------------------------------------------------ parsing
def _device(text: str) -> str | int:
    from .device import parse_device

    t = text.strip()
    if t.isdigit():
        return int(t)
    try:
        kind, index = parse_device(t)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"device {text!r}: use auto, host, cuda, cuda:N or a GPU index (0, 1, ...)") from None
    return kind if index is None else f"{kind}:{index}"


def _size_arg(text: str) -> int:
    try:
        return parse_size(text, multiple_of=PAGE_SIZE)
    except SizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sizes_arg(text: str) -> list[int]:
    try:
        return parse_sizes(text, multiple_of=PAGE_SIZE)
    except SizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be >= 1")
    return n


def _seconds(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"{x} must be >= 0 seconds")
    return x


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpu-backup",
        description="Hold more GPU buffers than the GPU has: inspect, benchmark, demonstrate.")
    p.add_argument("--version", action="version", version=f"gpu-backup {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{info,bench,demo}")
    dev_help = "auto (CUDA if usable, else host), cuda, cuda:N, host, or a GPU index (default: auto)"

    info = sub.add_parser("info", help="the backend chosen and why, device, staging, store, host memory")
    info.add_argument("--device", type=_device, default="auto", help=dev_help)
    info.add_argument("--json", action="store_true", help="print the information as JSON")
    info.add_argument("--no-host-limits", dest="host_limits", action="store_false",
                      help="skip measuring the host-side copy limits (about 0.3 s)")

    bench = sub.add_parser(
        "bench", help="evict/restore throughput beside the link and the alternatives",
        description="Runs every scenario in one process, prints a table, writes JSON and a PNG. "
                    "GB/s = 1e9 B/s; ratios compare with the link measured in the same run.")
    bench.add_argument("--device", type=_device, default="auto", help=dev_help)
    bench.add_argument("--quick", action="store_true",
                       help="small sizes (64K,1M,16M) and fewer repeats: under a minute")
    bench.add_argument("--sizes", type=_sizes_arg, default=None, metavar="LIST",
                       help="comma-separated sizes with K/M/G suffixes, multiples of "
                            f"{PAGE_SIZE:,} B (default: 64K,1M,16M,256M,1G, skipping those "
                            "that do not fit in memory; a size given here that does not fit "
                            "is an error)")
    bench.add_argument("--repeat", type=_positive, default=None, metavar="N",
                       help="least timed repeats per scenario (default 5, --quick 3; sizes up "
                            "to 1M run 10x as many: one operation there takes microseconds); "
                            "up to 4x as many run while the median is not stable")
    bench.add_argument("--budget", type=_seconds, default=None, metavar="SECONDS",
                       help="time a row may spend on repeats beyond the least number "
                            "(default 2, --quick 0.5; 0: exactly --repeat)")
    bench.add_argument("--no-host-limits", dest="host_limits", action="store_false",
                       help="skip measuring the host-side copy limits")
    bench.add_argument("--touches", type=_positive, default=None, metavar="N",
                       help="timed touches in the oversubscribe scenario (default 32, --quick 16)")
    bench.add_argument("--json", dest="json_path", default="bench-results.json", metavar="PATH",
                       help="where to write the results, rewritten after every step "
                            "(default: bench-results.json); '-': to stdout at the end, and "
                            "the table goes to stderr")
    bench.add_argument("--plot", dest="plot_path", default="bench-results.png", metavar="PATH",
                       help="where to write the plot (default: bench-results.png)")

    demo = sub.add_parser(
        "demo", help="an oversubscribed workload: 2x the budget in buffers, every byte verified")
    demo.add_argument("--device", type=_device, default="auto", help=dev_help)
    demo.add_argument("--budget", type=_size_arg, default=None, metavar="SIZE",
                      help=f"device_limit (default: {fmt_size(DEMO_HOST_BUDGET)} on host; on cuda "
                           f"a quarter of free device memory, at most {fmt_size(DEMO_CUDA_CAP)})")
    demo.add_argument("--buffers", type=_positive, default=16, metavar="N",
                      help="buffers sharing twice the budget (default: 16)")
    demo.add_argument("--rounds", type=_positive, default=3, metavar="N",
                      help="passes over all buffers in random order (default: 3)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gpu-backup`` and ``python -m gpu_backup``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            # Every command prints the backend and why it was chosen: no warning on top.
            warnings.simplefilter("ignore", HostFallbackWarning)
            if args.command == "info":
                return cmd_info(args)
            if args.command == "bench":
                return cmd_bench(args)
            return cmd_demo(args)
    except (UsageError, SizeError) as e:
        parser.exit(2, f"gpu-backup {args.command}: error: {e}\n")
    except NoDeviceError as e:
        print(f"gpu-backup {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gpu-backup {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. piped into head: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0  # pragma: no cover - parser.exit raises


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    # Piped output (tests, logs) gets a wide fixed width so tables do not wrap.
    tty = (sys.stderr if stderr else sys.stdout).isatty()
    return Console(stderr=stderr) if tty else Console(stderr=stderr, width=140)


# --------------------------------------------------------------------- info
def collect_info(device: Any, host_limits: bool = True) -> dict[str, Any]:
    """What ``gpu-backup info`` reports, as a JSON-ready dict (None where unavailable).
    ``kernels``: whether CuPy can compile this library's kernels here, and why not;
    ``host_limits``: the host side's own copy limits, measured now (unless turned off)."""
    from .bench import hostlimits
    from .kernels import kernel_build_check
    from .manager import BufferManager

    staging = Staging()
    with BufferManager(device, staging=staging) as mgr:
        b = mgr.backend
        free, total = b.mem_info()
        store = mgr.store
        ps = mgr.page_size
        slot = staging.slot_bytes // ps * ps
        info: dict[str, Any] = {
            "backend": b.name,
            "reason": b.reason,
            "device": b.device_name,
            "device_id": b.device_id,
            "device_memory": {"free": free, "total": total},
            "gpu_backup": __version__,
            **cuda_versions(),
            "page_size": ps,
            "zero_scan": getattr(mgr, "zero_scan", None),
            "kernels": asdict(kernel_build_check()),
            "staging": {"slots": staging.slots, "slot_bytes": slot, "threads": staging.threads,
                        "pinned_bytes": staging.slots * slot},
            "store": {"kind": getattr(store, "kind", type(store).__name__),
                      "capacity": store.capacity, "bytes_avail": store.bytes_avail(),
                      "warm_slack": getattr(store, "warm_slack", None),
                      "host_reserve": getattr(store, "host_reserve", None)},
            "host_memory": host_memory.read(fresh=True),
        }
    if host_limits:
        info["host_limits"] = hostlimits.measure(hostlimits.QUICK_BYTES)
    if info["backend"] == "host":
        info["note"] = ("host backend: device memory is emulated in host RAM (a quarter of it "
                        "by default); figures measured on it are not GPU figures")
    return info


def cmd_info(args: argparse.Namespace) -> int:
    info = collect_info(args.device, args.host_limits)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.markup import escape
    from rich.table import Table

    na = "n/a"
    dm, st, sg, hm = info["device_memory"], info["store"], info["staging"], info["host_memory"]
    t = Table(title=f"gpu-backup {__version__}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    rows = [
        ("backend", f"{info['backend']}  ({info['reason']})"),
        ("device", f"{info['device']}  (id {info['device_id']})"),
        ("device memory", f"{fmt_bytes(dm['free'])} free of {fmt_bytes(dm['total'])}"),
        ("CUDA driver", info["cuda_driver"] or na),
        ("CUDA runtime", info["cuda_runtime"] or na),
        ("CuPy", info["cupy"] or na),
        ("page size", f"{info['page_size']:,} B"),
        ("zero-page scan", {True: "on", False: "off", None: na}[info["zero_scan"]]),
        ("CUDA kernels", _kernels_text(info["kernels"])),
        ("staging ring", f"{sg['slots']} x {fmt_bytes(sg['slot_bytes'])} = "
                         f"{fmt_bytes(sg['pinned_bytes'])} pinned, {sg['threads']} copy threads"),
        ("store", f"{st['kind']}: capacity {fmt_bytes(st['capacity'])}, "
                  f"available {fmt_bytes(st['bytes_avail'])}"),
        ("store warm slack", fmt_bytes(st["warm_slack"])),
        ("store host reserve", fmt_bytes(st["host_reserve"])),
        ("host memory", f"{fmt_bytes(hm['available'])} available of {fmt_bytes(hm['total'])}"),
        ("swap", f"{fmt_bytes(hm['swap_free'])} free of {fmt_bytes(hm['swap_total'])}"),
    ]
    lim = info.get("host_limits")
    if lim:
        rows.append(("host copy limits", _limits_text(lim)))
    for k, v in rows:
        t.add_row(k, escape(str(v)))
    console = _console()
    console.print(t)
    if "note" in info:
        console.print(f"[bold yellow]{escape(info['note'])}[/bold yellow]")
    return 0


def _kernels_text(k: dict[str, Any]) -> str:
    if not k["ok"]:
        return f"cannot compile here: {k['why']}"
    where = f"; CUDA headers from {k['headers_from']}: {k['headers']}" if k["headers"] else ""
    return f"can compile (NVRTC {k['nvrtc']}{where})"


def _limits_text(lim: dict[str, Any]) -> str:
    return (f"into warm memfd pages {lim['write_1']:.3g} GB/s on 1 thread, "
            f"{lim['write_n']:.3g} on {lim['threads']} (the staging threads), "
            f"{lim['write_cpus']:.3g} on {lim['cpus']} CPUs; out of memfd {lim['read_n']:.3g} "
            f"on {lim['threads']}; first touch of fresh memfd pages {lim['first_touch']:.3g} "
            f"GB/s ({fmt_size(lim['bytes'])} per copy, a quick probe: a CPU cache that large "
            f"flatters it; gpu-backup bench measures with more). Evict and restore run at "
            f"most at the slower of these and the link")


# -------------------------------------------------------------------- bench
class _RichProgress:
    """The runner's progress, drawn as a rich progress bar."""

    def __init__(self, console: Any) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                                   TextColumn, TimeElapsedColumn)

        self.console = console
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description:<34}"), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                            transient=True)
        self.task: Any = None
        self.steps = 0

    def begin(self, total: int, header: str) -> None:
        from rich.markup import escape

        style = "bold red" if "HOST BACKEND" in header else "bold"
        self.console.print(f"[{style}]{escape(header)}[/{style}]")
        self.task = self.bar.add_task("starting", total=total)

    def step(self, description: str) -> None:
        if self.task is None:
            return
        if self.steps:      # the step before this one is complete
            self.bar.advance(self.task)
        self.steps += 1
        self.bar.update(self.task, description=description)


def _check_output(path: str, what: str) -> None:
    """An output path must be a file in an existing, writable directory: checked before
    any work is done."""
    if os.path.isdir(path):
        raise UsageError(f"{what} {path!r} is a directory: give a file path, e.g. "
                         f"{os.path.join(path, 'bench-results')}.{what.lstrip('-')[:4]}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{what} {path!r}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{what} {path!r}: directory {parent!r} is not writable")


def _write_outputs(doc: dict[str, Any], args: argparse.Namespace, console: Any) -> list[str]:
    """Write the JSON (unless it goes to stdout) and the plot; returns what went wrong."""
    from rich.markup import escape

    from .bench import plot, write_json

    errors = []
    if args.json_path != "-":
        try:
            write_json(doc, args.json_path)
        except Exception as e:  # noqa: BLE001 - still try the plot
            errors.append(f"writing {args.json_path}: {type(e).__name__}: {e}")
    try:
        plot(doc, args.plot_path)
    except Exception as e:  # noqa: BLE001 - the JSON is there; say what failed
        errors.append(f"drawing {args.plot_path}: {type(e).__name__}: {e}")
    for e in errors:
        console.print(f"[bold red]{escape(e)}[/bold red]")
    return errors


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from .bench import BenchConfig, print_report, run_bench, to_json, write_json

    to_stdout = args.json_path == "-"
    if not to_stdout:
        _check_output(args.json_path, "--json")
    _check_output(args.plot_path, "--plot")
    cfg = BenchConfig(device=args.device, sizes=tuple(args.sizes) if args.sizes else None,
                      repeat=args.repeat, quick=args.quick, touches=args.touches,
                      budget_s=args.budget, host_limits=args.host_limits)
    console = _console(stderr=to_stdout)
    progress = _RichProgress(console)
    last: dict[str, Any] = {}

    def on_update(doc: dict[str, Any]) -> None:
        last["doc"] = doc
        if not to_stdout:
            write_json(doc, args.json_path)

    try:
        with progress.bar:
            doc = run_bench(cfg, progress, on_update)
    except KeyboardInterrupt:
        if "doc" in last:       # keep what finished
            last["doc"]["interrupted"] = True
            _write_outputs(last["doc"], args, console)
            if to_stdout:
                sys.stdout.write(to_json(last["doc"]))
        raise
    print_report(doc, console)
    for f in doc["failures"]:
        if f["error_type"] == "VerifyError":
            console.print(f"[bold red]VERIFICATION FAILED: {escape(f['message'])}[/bold red]")
    errors = _write_outputs(doc, args, console)
    if to_stdout:
        sys.stdout.write(to_json(doc))
        sys.stdout.flush()
        console.print(f"wrote the JSON to stdout and {escape(args.plot_path)}")
    else:
        console.print(f"wrote {escape(args.json_path)} and {escape(args.plot_path)}")
    return 1 if doc["failures"] or errors else 0


# --------------------------------------------------------------------- demo
def _default_budget(device: Any) -> tuple[int, str, str, int]:
    """(budget, backend name, device name, free device bytes): 64M on host; on cuda a
    quarter of free device memory, at most 4G, in whole pages."""
    from .device import open_backend

    backend = open_backend(device)
    try:
        name, dev_name, free = backend.name, backend.device_name, backend.mem_info()[0]
    finally:
        backend.close()
    if name == "host":
        return DEMO_HOST_BUDGET, name, dev_name, free
    return min(free // 4, DEMO_CUDA_CAP) // PAGE_SIZE * PAGE_SIZE, name, dev_name, free


def _demo_sizes(budget: int, nbuf: int) -> int:
    """Bytes per buffer: ``nbuf`` buffers share twice the budget (whole pages)."""
    size = 2 * budget // nbuf // PAGE_SIZE * PAGE_SIZE
    if size < PAGE_SIZE:
        raise UsageError(f"--budget {budget:,} B is too small for {nbuf} buffers: each would "
                         f"get {2 * budget // nbuf:,} B, less than one page ({PAGE_SIZE:,} B); "
                         f"use at least {-(-nbuf * PAGE_SIZE // 2):,} B")
    return size


def _original(seed: int, i: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, i]).integers(0, 256, size, dtype=np.uint8)


def _digest(data: np.ndarray) -> str:
    return hashlib.blake2b(memoryview(data), digest_size=16).hexdigest()


def _peek_poke(arr: Any, read: np.ndarray, pos: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Read the bytes at ``read`` of a buffer's array, then write ``values`` at ``pos``
    (distinct positions, so the scatter is well defined on the GPU too)."""
    if isinstance(arr, np.ndarray):
        old = arr[read].copy()
        arr[pos] = values
        return old
    import cupy

    old = cupy.asnumpy(arr[cupy.asarray(read)])
    arr[cupy.asarray(pos)] = cupy.asarray(values)
    return old


class _Demo:
    """The demo's workload on one manager: what each buffer should hold, and the checks.

    A buffer's expected bytes are its seeded random fill plus the bytes changed since
    (``mods``); only a checksum of the fill and the changes are kept, not the bytes.
    """

    def __init__(self, mgr: Any, nbuf: int, size: int, seed: int) -> None:
        self.mgr, self.nbuf, self.size, self.seed = mgr, nbuf, size, seed
        self.bufs: list[Any] = []
        self.digests: list[str] = []
        self.mods: list[dict[int, int]] = [{} for _ in range(nbuf)]
        empty = (np.zeros(0, np.int64), np.zeros(0, np.uint8))
        self.last: list[tuple[np.ndarray, np.ndarray]] = [empty] * nbuf
        self.errors: list[str] = []
        self.touches = 0

    def fill(self, i: int) -> None:
        data = _original(self.seed, i, self.size)
        self.digests.append(_digest(data))
        buf = self.mgr.alloc(self.size)
        self.bufs.append(buf)
        with buf.access("w") as arr:
            if isinstance(arr, np.ndarray):
                arr[:] = data
            else:
                arr.set(data)

    def use(self, r: int, i: int, rng: np.random.Generator) -> None:
        """Use buffer ``i`` ("rw"): check the bytes its previous use wrote, change a few."""
        pos = np.unique(rng.integers(0, self.size, DEMO_BYTES_PER_TOUCH))
        values = ((pos * 31 + r * 7 + i) % 251).astype(np.uint8)
        prev_pos, prev_val = self.last[i]
        with self.bufs[i].access("rw") as arr:
            old = _peek_poke(arr, prev_pos, pos, values)
        self.touches += 1
        if not np.array_equal(old, prev_val):
            self.errors.append(f"round {r}, buffer {i}: bytes written by its previous use came "
                               f"back as {old.tolist()}, expected {prev_val.tolist()}")
        self.last[i] = (pos, values)
        self.mods[i].update(zip(pos.tolist(), values.tolist()))

    def verify(self, i: int) -> bool:
        """Every byte of buffer ``i``, by checksum against its fill plus its changes."""
        want = self.digests[i]
        if self.mods[i]:
            data = _original(self.seed, i, self.size)
            data[list(self.mods[i])] = list(self.mods[i].values())
            want = _digest(data)
        got = _digest(self.bufs[i].to_host())
        if got != want:
            self.errors.append(f"buffer {i}: checksum {got} at the end, expected {want}")
        return got == want

    def free(self) -> None:
        for buf in self.bufs:
            buf.free()


def _stat_text(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if key.endswith("seconds"):
        return f"{value:.3f} s"
    if key.endswith("gbps"):
        return f"{value:.3g} GB/s"
    if "bytes" in key and isinstance(value, int):
        return fmt_bytes(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.3g}"


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
    from rich.table import Table

    from .manager import BufferManager

    budget, name, dev_name, free = _default_budget(args.device)
    if args.budget is not None:
        budget = args.budget
    if budget > free:
        raise UsageError(f"--budget {budget:,} B is more than the {free:,} B of device memory "
                         f"free on {dev_name}")
    nbuf = args.buffers
    size = _demo_sizes(budget, nbuf)
    total = size * nbuf
    mem = host_memory.read(fresh=True)
    host_avail = mem["available"] + mem["swap_free"]
    host_need = total + (total if name == "host" else 0)
    if host_need > host_avail:
        raise UsageError(f"--budget {budget:,} B: {nbuf} buffers of {size:,} B need about "
                         f"{host_need:,} B of host memory for the store, {host_avail:,} B "
                         f"available (RAM + free swap)")
    console = _console()
    with BufferManager(args.device, device_limit=budget) as mgr:
        b = mgr.backend
        console.print(
            f"[bold]demo[/bold]: {nbuf} buffers x {fmt_bytes(size)} = {fmt_bytes(total)} "
            f"under device_limit {fmt_bytes(budget)} on {escape(b.device_name)} "
            f"(backend {b.name}: {escape(b.reason)})")
        if b.name == "host":
            console.print("[yellow]host backend: device memory is emulated in RAM[/yellow]")
        demo = _Demo(mgr, nbuf, size, args.seed)
        rng = np.random.default_rng([args.seed, 1 << 20])
        bar = Progress("{task.description:<8}", BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), console=console, transient=True)
        try:
            with bar:
                t0 = time.perf_counter()
                task = bar.add_task("fill", total=nbuf)
                for i in range(nbuf):
                    demo.fill(i)
                    bar.advance(task)
                task = bar.add_task("use", total=args.rounds * nbuf)
                for r in range(args.rounds):
                    for i in rng.permutation(nbuf).tolist():
                        demo.use(r, i, rng)
                        bar.advance(task)
                work = time.perf_counter() - t0
                task = bar.add_task("verify", total=nbuf)
                ok = 0
                for i in range(nbuf):
                    ok += demo.verify(i)
                    bar.advance(task)
            stats = mgr.stats()
        finally:
            demo.free()
    errors, touches = demo.errors, demo.touches

    table = Table(title="BufferManager statistics", title_justify="left")
    table.add_column("counter")
    table.add_column("value", justify="right")
    for k, v in stats.items():
        table.add_row(k, escape(_stat_text(k, v)))
    console.print(table)
    console.print(f"{touches} uses in {args.rounds} rounds, {work:.2f} s; "
                  f"{stats.get('restores', 0)} restores, {stats.get('evictions', 0)} evictions")
    for e in errors[:10]:
        console.print(f"[red]{escape(e)}[/red]")
    if ok == nbuf and not errors:
        console.print(f"[bold green]verified: all {nbuf} buffers ({fmt_bytes(total)}) are "
                      f"bit-exact[/bold green]")
        return 0
    console.print(f"[bold red]FAILED: {ok} of {nbuf} buffers verified, {len(errors)} "
                  f"error(s)[/bold red]")
    return 1

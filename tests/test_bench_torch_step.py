"""``gpu-backup bench``'s ``torch_step``: issue 13's training-step comparison, once per run.

Its rows (where torch is installed: CPU tensors on the host backend), its skip with a
reason where torch is absent or has no CUDA on a cuda backend, a failure recorded without
stopping the run, its goals from the numbers, and ``benchmarks/bench_torch.py`` over the
same code.  Host backend, tiny sizes; failures are injected."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import types

import pytest
from test_cli import PNG_MAGIC, ROOT, _strict_json, run_main

from gpu_backup.bench import BenchConfig, gpucheck, plot, print_report, run_bench, torchstep
from gpu_backup.bench import runner as rn

HAVE_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="PyTorch is not installed "
                                 "(pip install 'gpu-backup[torch]'; CI installs a CPU wheel)")
FAST = ["--device", "host", "--sizes", "64K", "--repeat", "1", "--budget", "0",
        "--no-host-limits"]


def _no_sizes(monkeypatch):
    """Only the once-per-run steps: the per-size steps are tested elsewhere."""
    monkeypatch.setattr(rn, "_run_size", lambda run, size, *, with_torch: None)


def _report(doc) -> str:
    from rich.console import Console

    buf = io.StringIO()
    print_report(doc, Console(file=buf, width=200, force_terminal=False))
    return buf.getvalue()


def test_import_bench_does_not_import_torch():
    p = subprocess.run([sys.executable, "-c", "import sys, gpu_backup.bench, "
                        "gpu_backup.bench.torchstep; print('torch' in sys.modules)"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"


# ---------------------------------------------------------------- it runs
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``gpu-backup bench --quick`` on host at 64K: the torch step's quick sizes."""
    if not HAVE_TORCH:
        pytest.skip("PyTorch is not installed")
    d = tmp_path_factory.mktemp("torch_step")
    rc, out, err = run_main(["bench", "--quick", *FAST, "--json", str(d / "r.json"),
                             "--plot", str(d / "r.png")])
    return rc, out, err, _strict_json(d / "r.json"), d / "r.png"


@needs_torch
def test_torch_step_rows_in_the_bench(quick_run):
    rc, out, err, doc, png = quick_run
    assert rc == 0, out + err
    ts = doc["torch_step"]
    cfg = ts["config"]
    assert {k: cfg[k] for k in ("batch", "width", "depth")} == torchstep.QUICK_SIZES["host"]
    assert cfg["steps"] == torchstep.QUICK_STEPS
    rows = ts["rows"]
    by = {r["mode"]: r for r in rows}
    assert list(by) == list(torchstep.MODES)
    for r in rows:          # labelled host; the same losses as plain autograd, bit for bit
        assert r["scenario"] == "torch_step" and r["backend"] == "host" and r["device"] == "host"
        assert r["batch"] == cfg["batch"] and len(r["step_times_s"]) == cfg["steps"]
        assert r["step_s"] > 0 and r["same_losses_as_none"] is True
        assert r["losses"] == by["none"]["losses"] and len(r["losses"]) == cfg["steps"] + 1
        assert r["ratio_to_none"] == pytest.approx(r["step_s"] / by["none"]["step_s"])
        assert r["pinned_host_bytes"] == 0 and r["peak_device_bytes"] is None
    off = by["offload"]
    assert off["evictions"] > 0 and off["restores"] > 0
    assert off["buffers_peak_bytes"] <= off["device_limit"] < off["saved_bytes_per_step"]
    assert by["offload_fits"]["evictions"] == 0
    # never a link row: not in results, declared as its own step
    assert doc["steps"]["torch_step"] == ["torch_step"]
    assert not any(r["scenario"] == "torch_step" for r in doc["results"])
    assert "torch_step" not in {s["step"] for s in doc["skipped"]}
    assert doc["failures"] == []
    # the goals come from these rows
    assert ts["goals"] == torchstep.goals(rows)
    goals = {g["goal"]: g for g in ts["goals"]}
    fits = goals["torch_offload_fits_vs_none"]
    assert fits["value"] == pytest.approx(by["offload_fits"]["step_s"] / by["none"]["step_s"])
    assert fits["met"] == (fits["value"] <= 1.1)
    assert goals["torch_offload_vs_save_on_cpu_pinned"]["met"] is None   # host pins nothing
    assert goals["torch_same_losses"]["met"] is True
    # its own table and goals in the report; its own panel in the plot
    assert "torch_step: one training step per mode" in out and "HOST figures" in out
    assert "torch_step: offload_fits step time <= 1.1x none" in out
    assert png.read_bytes()[:8] == PNG_MAGIC


@needs_torch
def test_gpucheck_summary_lists_the_torch_goals(quick_run, tmp_path):
    doc = quick_run[3]
    bench = tmp_path / "b.json"
    bench.write_text(json.dumps(doc))
    lines, rc = gpucheck.summary_lines(str(tmp_path), str(bench), ["bench|0|5|60|"], "host")
    text = "\n".join(lines)
    assert rc == 0
    assert "bench: torch_step: same losses as none, bit for bit: 0 modes differing" in text
    assert "[met]    bench: torch_step: same losses" in text
    assert "[n/a]    bench_torch: no JSON" in text


def test_report_and_plot_of_a_document_without_torch_step(tmp_path, monkeypatch):
    """Documents from before the step (no ``torch_step`` key) still print and plot."""
    _no_sizes(monkeypatch)
    doc = run_bench(BenchConfig(device="host", sizes=(64 << 10,), repeat=1, budget_s=0,
                                host_limits=False))
    doc.pop("torch_step")
    assert "torch_step: one training step" not in _report(doc)
    plot(doc, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------- skipped
def test_skipped_with_the_reason_without_torch(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))

    def never(*a, **k):
        raise AssertionError("torch_step ran without torch")

    monkeypatch.setattr(torchstep, "run", never)
    _no_sizes(monkeypatch)
    rc, out, err = run_main(["bench", *FAST, "--json", str(tmp_path / "r.json"),
                             "--plot", str(tmp_path / "r.png")])
    assert rc == 0, out + err
    doc = _strict_json(tmp_path / "r.json")
    skip = [s for s in doc["skipped"] if s["step"] == "torch_step"]
    assert skip == [{"step": "torch_step", "scenarios": ["torch_step"], "size_bytes": None,
                     "reason": "torch is not installed (pip install 'gpu-backup[torch]')"}]
    assert doc["torch_step"] == {"config": None, "rows": [], "goals": []}
    assert doc["failures"] == []
    assert "torch_step (torch_step): torch is not installed" in out
    lines, _ = gpucheck.summary_lines(str(tmp_path), str(tmp_path / "r.json"), [], "host")
    assert "[n/a]    bench: torch_step not run: torch is not installed" in "\n".join(lines)
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC


def test_cuda_backend_with_a_torch_without_cuda_is_skipped(monkeypatch):
    fake_torch = types.SimpleNamespace(__version__="9.9+cpu",
                                       cuda=types.SimpleNamespace(is_available=lambda: False))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "torch" else real(name, *a))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    why = torchstep.unusable(types.SimpleNamespace(name="cuda"))
    assert why is not None and "torch 9.9+cpu has no usable CUDA" in why
    assert torchstep.unusable(types.SimpleNamespace(name="host")) is None   # CPU tensors


def test_a_torch_step_that_cannot_fit_is_skipped_with_the_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(torchstep, "unusable", lambda backend: None)
    monkeypatch.setattr(torchstep, "estimate_needs", lambda *a, **k: (0, 1 << 60))

    def never(*a, **k):
        raise AssertionError("torch_step ran although it cannot fit")

    monkeypatch.setattr(torchstep, "run", never)
    _no_sizes(monkeypatch)
    doc = run_bench(BenchConfig(device="host", sizes=(64 << 10,), repeat=1, budget_s=0,
                                host_limits=False))
    skip = [s for s in doc["skipped"] if s["step"] == "torch_step"]
    assert len(skip) == 1 and f"needs about {1 << 60:,} B of host memory" in skip[0]["reason"]
    assert doc["failures"] == [] and doc["torch_step"]["rows"] == []


# ----------------------------------------------------------------- failure
def test_a_failing_torch_step_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    seen = {}

    def boom(device, **kw):
        seen.update(kw, device=device)
        raise RuntimeError("injected torch failure")

    monkeypatch.setattr(torchstep, "unusable", lambda backend: None)
    monkeypatch.setattr(torchstep, "run", boom)
    rc, out, err = run_main(["bench", "--quick", *FAST, "--json", str(tmp_path / "r.json"),
                             "--plot", str(tmp_path / "r.png")])
    assert rc == 1                               # a step failed
    assert seen["device"] == "host" and seen["depth"] == torchstep.QUICK_SIZES["host"]["depth"]
    doc = _strict_json(tmp_path / "r.json")
    assert doc["failures"] == [{"step": "torch_step", "scenarios": ["torch_step"],
                                "size_bytes": None, "error_type": "RuntimeError",
                                "message": "injected torch failure"}]
    assert doc["summary"]["failed_steps"] == 1
    names = {r["scenario"] for r in doc["results"]}    # every other step's rows are there
    assert {"link_d2h", "evict", "restore", "evict_first", "evict_zero", "pageable"} <= names
    assert doc["torch_step"]["rows"] == []
    assert "FAILED torch_step (torch_step): RuntimeError: injected torch failure" in out
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC
    lines, rc = gpucheck.summary_lines(str(tmp_path), str(tmp_path / "r.json"),
                                       ["bench|1|5|60|"], "host")
    text = "\n".join(lines)
    assert rc == 1 and "torch_step: RuntimeError: injected torch failure" in text


# ------------------------------------------------------------------- goals
def _row(mode, step_ms, pinned=0, evictions=0, same=True, backend="cuda"):
    return {"mode": mode, "backend": backend, "step_s": step_ms / 1e3, "pinned_host_bytes": pinned,
            "evictions": evictions, "same_losses_as_none": same}


def test_goals_follow_the_numbers():
    ring, soc_pin = 64 << 20, 2 << 30
    rows = [_row("none", 100.0, same=True), _row("save_on_cpu", 300.0, pinned=soc_pin),
            _row("offload_fits", 105.0, pinned=ring), _row("offload", 200.0, pinned=ring,
                                                            evictions=40)]
    g = {x["goal"]: x for x in torchstep.goals(rows)}
    assert g["torch_offload_fits_vs_none"]["value"] == pytest.approx(1.05)
    assert g["torch_offload_fits_vs_none"]["met"] is True
    assert g["torch_offload_vs_save_on_cpu_time"]["value"] == pytest.approx(200 / 300)
    assert g["torch_offload_vs_save_on_cpu_time"]["met"] is True
    assert g["torch_offload_vs_save_on_cpu_pinned"]["value"] == pytest.approx(ring / soc_pin)
    assert g["torch_offload_vs_save_on_cpu_pinned"]["met"] is True
    assert g["torch_same_losses"]["met"] is True

    rows = [_row("none", 100.0), _row("save_on_cpu", 150.0, pinned=0),
            _row("offload_fits", 120.0, same=False), _row("offload", 160.0)]
    g = {x["goal"]: x for x in torchstep.goals(rows)}
    assert g["torch_offload_fits_vs_none"]["met"] is False            # 1.2x > 1.1x
    assert g["torch_offload_vs_save_on_cpu_time"]["met"] is False     # slower
    assert g["torch_offload_vs_save_on_cpu_pinned"]["met"] is None    # not reported
    assert "does not report" in g["torch_offload_vs_save_on_cpu_pinned"]["detail"]
    assert g["torch_same_losses"]["met"] is False
    assert "offload_fits" in g["torch_same_losses"]["detail"]

    g = {x["goal"]: x for x in torchstep.goals([_row("offload", 1.0, backend="host")])}
    assert all(x["met"] is None and "not evaluated" in x["detail"] for x in g.values())


# ------------------------------------------------------------ command line
@needs_torch
def test_bench_torch_script_is_the_same_measurement(tmp_path):
    out = tmp_path / "torch.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_torch.py"),
                        "--device", "host", "--batch", "32", "--width", "64", "--depth", "2",
                        "--steps", "2", "--warmup", "0", "--json", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "host figures, not GPU figures" in p.stdout and "[met] torch_step: same losses" \
        in p.stdout
    doc = _strict_json(out)
    assert doc["benchmark"] == "bench_torch" and doc["goals"] == torchstep.goals(doc["results"])
    assert [r["mode"] for r in doc["results"]] == list(torchstep.MODES)
    assert all(r["depth"] == 2 and len(r["step_times_s"]) == 2 for r in doc["results"])
    lines, _ = gpucheck.summary_lines(str(tmp_path), str(tmp_path / "none.json"), [], "host")
    text = "\n".join(lines)
    assert "bench_torch: torch_step: same losses as none, bit for bit" in text
    assert "bench_torch: host backend (CPU tensors): not GPU figures" in text


def test_bad_arguments_are_refused_before_any_work():
    with pytest.raises(ValueError, match="modes must be among"):
        torchstep.run("host", modes=("nope",))
    with pytest.raises(ValueError, match="width=0 must be >= 1"):
        torchstep.run("host", width=0)


def test_pinned_memory_counts_only_what_the_run_hands_out():
    """save_on_cpu's pinned figure: torch's pinned blocks in use during the run, above
    those earlier work still held; the allocator's cache does not count (a fake torch.cuda
    with torch's statistics names: the real one needs a GPU)."""
    stats = {"active_bytes.current": 3 << 20, "active_bytes.peak": 9 << 20,
             "allocated_bytes.peak": 64 << 20}

    def reset():
        stats["active_bytes.peak"] = stats["active_bytes.current"]

    cuda = types.SimpleNamespace(host_memory_stats=lambda: dict(stats),
                                 reset_peak_host_memory_stats=reset)
    fake = types.SimpleNamespace(cuda=cuda)
    start = torchstep._pinned_start(fake)
    assert start == 3 << 20 and stats["active_bytes.peak"] == 3 << 20    # peak was reset
    stats["active_bytes.peak"] = 40 << 20                                # the run pins 37 MiB
    assert torchstep._pinned_peak(fake, start) == 37 << 20
    old = types.SimpleNamespace(cuda=types.SimpleNamespace())           # no statistics
    assert torchstep._pinned_start(old) is None and torchstep._pinned_peak(old, None) is None


def test_summary_says_why_bench_torch_did_not_run(tmp_path):
    (tmp_path / "torch.json").write_text("{}")       # a stale file is not read
    lines, rc = gpucheck.summary_lines(str(tmp_path), str(tmp_path / "none.json"),
                                       ["bench_torch|-1|0|0|no benchmarks/bench_torch.py"],
                                       "gpu")
    text = "\n".join(lines)
    assert "[n/a]    bench_torch: not run: no benchmarks/bench_torch.py" in text
    assert "bench_torch: no rows" not in text


@needs_torch
def test_each_step_is_an_sgd_step():
    """The step the modes time updates the weights (p -= lr * grad), so equal losses in
    later steps mean equal gradients in earlier ones."""
    import contextlib

    import torch

    model = torchstep._model(torch, 8, 2, "cpu", seed=0)
    m = torchstep._Mode(torch, "none", model, contextlib.nullcontext, None)
    x, y = torch.randn(4, 8), torch.randint(0, 10, (4,))
    before = [p.detach().clone() for p in model.parameters()]
    m.step(x, y, cuda=False, timed=True)
    assert len(m.times) == 1 and len(m.losses) == 1
    for p, b in zip(model.parameters(), before):
        assert p.grad is not None
        assert torch.equal(p.detach(), b.add(p.grad, alpha=-torchstep.LR))
    m.step(x, y, cuda=False, timed=False)
    assert len(m.times) == 1 and m.losses[1] < m.losses[0]    # same batch: the loss fell

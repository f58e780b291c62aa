"""``benchmarks/gpu_check.sh``: its host mode runs here (CI runs it too), and its summary
states every part and every goal from the files the parts wrote."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import date

import pytest
from test_cli import PNG_MAGIC, ROOT, _strict_json

from gpu_backup.bench import gpucheck


def test_slug_follows_the_results_readme():
    assert gpucheck.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gpucheck.slug("NVIDIA H200") == "nvidia-h200"
    assert gpucheck.slug("  ") == "unknown-device"


def test_gpu_check_host_mode(tmp_path):
    from conftest import cuda_unusable_reason

    if cuda_unusable_reason() is None:
        pytest.skip("a GPU is usable: run benchmarks/gpu_check.sh itself (minutes)")
    out = tmp_path / "results"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out))
    env.pop("PYTHONPATH", None)
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=110)
    assert p.returncode == 0, p.stdout + p.stderr
    files = sorted(f.name for f in out.iterdir())
    assert all((out / f).is_file() for f in files) and len(files) <= 8    # flat, few
    stem = f"host-{date.today().isoformat()}"
    assert {f"{stem}.json", f"{stem}.png", "summary.txt", "gpu-check.log", "pipeline.json",
            "store.json"} <= set(files), files
    doc = _strict_json(out / f"{stem}.json")
    assert doc["backend"] == "host" and doc["failures"] == [] and doc["results"]
    assert (out / f"{stem}.png").read_bytes()[:8] == PNG_MAGIC
    summary = (out / "summary.txt").read_text()
    for part in ("pytest_gpu", "bench", "bench_pipeline", "bench_store", "bench_torch"):
        assert re.search(rf"^  {part} +(ok|skipped) +[0-9.]+ s", summary, re.M), part
    assert "HOST MODE" in summary and "bench: every step completed" in summary
    assert "bench_pipeline: 4 KiB pages" in summary and "bench_store: warm store" in summary
    assert summary == p.stdout[p.stdout.index("gpu_check: mode host;"):]


def _bench_doc(tmp_path, failures):
    doc = {"summary": {"goals": [{"text": "evict >= 0.9x link", "value": 0.5, "unit": "x",
                                  "met": False, "detail": "at 1G"}]},
           "failures": failures, "results": [], "skipped": []}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_summary_reports_failures_and_timeouts(tmp_path):
    bench = _bench_doc(tmp_path, [{"step": "oversubscribe", "size_bytes": 1 << 30,
                                   "error_type": "OutOfDeviceMemory", "message": "store full"}])
    lines, rc = gpucheck.summary_lines(str(tmp_path), bench,
                                       ["pytest_gpu|0|30.0|130|5 passed", "bench|124|200.5|200|"],
                                       "gpu")
    text = "\n".join(lines)
    assert rc == 1
    assert re.search(r"bench +TIMED OUT +200.5 s", text)
    assert "[MISSED] bench: evict >= 0.9x link: 0.5 x (at 1G)" in text
    assert "[MISSED] bench: every step completed: 1 failed" in text
    assert "oversubscribe at 1G: OutOfDeviceMemory: store full" in text
    assert "[met]    whole check under 480 s: 230 s" in text
    assert "[n/a]    bench_pipeline: no JSON" in text
    lines, rc = gpucheck.summary_lines(str(tmp_path), _bench_doc(tmp_path, []),
                                       ["bench|0|500|200|"], "gpu")
    assert rc == 0 and "[MISSED] whole check under 480 s: 500 s" in "\n".join(lines)

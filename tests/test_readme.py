"""The README's API tour runs as written (on whatever backend is present)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_tour_runs():
    text = (ROOT / "README.md").read_text()
    tour = re.search(r"## A quick tour\n\n```python\n(.*?)```", text, re.S)
    assert tour, "README lost its tour"
    out = subprocess.run([sys.executable, "-c", tour.group(1)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert "Residency.EVICTED" in out.stdout


def test_readme_pytorch_snippet_runs():
    """The PyTorch section's snippet runs as written (host backend and CPU tensors here)."""
    import pytest

    pytest.importorskip("torch", reason="torch is not installed")
    text = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(import torch\n.*?)```", text, re.S)
    assert snippet, "README lost its PyTorch snippet"
    out = subprocess.run([sys.executable, "-W", "ignore::UserWarning", "-c", snippet.group(1)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert "packed" in out.stdout

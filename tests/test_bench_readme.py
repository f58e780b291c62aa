"""The README's snippets run as written: every name they use is imported or defined in
the snippet, and the benchmark section names every scenario the bench produces."""

from __future__ import annotations

import ast
import builtins
import re

from test_cli import ROOT

from gpu_backup.bench import STEPS

README = (ROOT / "README.md").read_text()


def _undefined(code: str) -> set[str]:
    tree = ast.parse(code)
    bound, used = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Name):
            (bound if isinstance(node.ctx, ast.Store) else used).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return used - bound


def test_every_python_snippet_imports_what_it_uses():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 2
    for code in blocks:
        assert not _undefined(code), (_undefined(code), code)


def test_the_check_catches_a_missing_import():
    assert _undefined("x = cupy.empty(4)\nimport numpy as np\ny = np.zeros(1)") == {"cupy"}


def test_readme_names_every_scenario_and_the_access_default():
    bench = README[README.index("## The benchmark"):]
    for names in STEPS.values():
        for name in names:
            assert f"`{name}`" in bench, name
    assert "evict_cold" not in README        # renamed: evict_first / restore_first
    assert 'access(mode="rw", *, stream=None)' in README

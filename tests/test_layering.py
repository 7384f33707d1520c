"""Module layering: loading sits below inference/export/serving, inference does not need the trainer, config and
data import each other in one direction only (sizes sits below both), and no function in pixelseg/ is over 80 lines."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module, forbidden", [
    ("pixelseg.inference.loading", ["pixelseg.inference.predict", "pixelseg.inference.export", "pixelseg.training.train"]),
    ("pixelseg.inference.export", ["pixelseg.inference.predict", "pixelseg.training.train"]),
    ("pixelseg.inference.predict", ["pixelseg.inference.export", "pixelseg.training.train"]),
    ("pixelseg.training.config", ["torch"]),
    ("pixelseg.data", ["pixelseg.training.config"]),  # config -> data (registries) only; sizes is below both
    ("pixelseg.core.sizes", ["torch", "pixelseg.training.config", "pixelseg.data"]),
])
def test_import_does_not_pull_in(module, forbidden):
    code = f"import sys, {module}; print(' '.join(m for m in {forbidden!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {module} imported {out.stdout.strip()}"


MAX_FUNCTION_LINES = 80


def test_no_function_is_over_80_lines():
    long = []
    for path in sorted((ROOT / "pixelseg").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {lines} lines")
    assert not long, "functions over 80 lines: " + "; ".join(long)

"""Module layering: loading sits below inference/export/serving, and inference does not need the trainer."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module, forbidden", [
    ("pixelseg.loading", ["pixelseg.inference", "pixelseg.export", "pixelseg.train"]),
    ("pixelseg.export", ["pixelseg.inference", "pixelseg.train"]),
    ("pixelseg.inference", ["pixelseg.export", "pixelseg.train"]),
    ("pixelseg.config", ["torch"]),
])
def test_import_does_not_pull_in(module, forbidden):
    code = f"import sys, {module}; print(' '.join(m for m in {forbidden!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {module} imported {out.stdout.strip()}"

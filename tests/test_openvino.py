"""The OpenVINO cases (tests/openvino_cases.py) run in a child pytest process.

Why: OpenVINO's CPU plugin and torch each bring their own oneDNN/TBB. On some CI machines a full test
session that had used OpenVINO in-process died with SIGSEGV about forty tests later, inside plain-Python
code (a finaliser running late); a child process keeps that out of the rest of the suite, and a crash
of the child still fails this test with its output."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("openvino_cases.py")


def test_openvino_cases_pass_in_a_child_process(tmp_path):
    if importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino not installed: pip install 'pixelseg[openvino]'")
    cmd = [sys.executable, "-X", "faulthandler", "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "--basetemp", str(tmp_path / "t"), str(CASES)]
    r = subprocess.run(cmd, cwd=CASES.parents[1], capture_output=True, text=True, timeout=1800,
                       env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    out = r.stdout[-6000:] + "\n" + r.stderr[-3000:]
    assert r.returncode == 0, f"the OpenVINO cases failed (exit {r.returncode}):\n{out}"
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= 5, out
    assert "failed" not in r.stdout.splitlines()[-1], out

"""Checkpoint files: permissions like any other output, and clear words for files that are not checkpoints."""
import os
import stat

import pytest
import torch

from conftest import tiny_run
from pixelseg.core.checkpoint import atomic_save, load_checkpoint
from pixelseg.core.files import atomic_write_text
from pixelseg.core.errors import PixelsegError


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_respect_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_save({"x": torch.zeros(2)}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    for name in ("a.txt", "b.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint", b"PK\x03\x04 broken zip"])
def test_garbage_file_is_named_as_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(PixelsegError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: not a pixelseg checkpoint") and "corrupt, truncated" in msg
    assert "weights_only=False" not in msg and "\n" not in msg


def test_truncated_checkpoint_says_truncated_and_what_to_do(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"model": {"w": torch.randn(1000)}, "model_config": {}}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(PixelsegError, match=r"last\.pt: not a pixelseg checkpoint: .*truncated.*copy it again"):
        load_checkpoint(path)


def test_best_holds_the_model_only_and_resume_uses_last(tmp_path):
    from pixelseg.cli import main
    run = tmp_path / "run"
    tiny = tiny_run(limit=8)
    assert main(["train", *tiny, "--epochs", "1", "--run-dir", str(run)]) == 0
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert "optimizer" not in best and "rng" not in best and "optimizer" in last
    assert best["model"].keys() == last["model"].keys() and best["model_config"] == last["model_config"]
    assert best["epoch"] == 1 and 0 <= best["metrics"]["val_miou"] <= 1
    # Adam keeps two moments per parameter: the slim best.pt is well under half of last.pt
    assert (run / "best.pt").stat().st_size < 0.5 * (run / "last.pt").stat().st_size
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    # a weights-only file in last.pt's place cannot be resumed, and says so
    (run / "last.pt").write_bytes((run / "best.pt").read_bytes())
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 2


# ---- checkpoints of the flat layout (before the six wings) still load -----------------------------------
FLAT_LAYOUT = "e376111"  # the last commit with pixelseg/*.py side by side (train.py, inference.py, plan.py, ...)


def _flat_layout_code(dest):
    """pixelseg/ as it was at FLAT_LAYOUT, from this clone's history; skips where the history is not there."""
    import io
    import subprocess
    import tarfile
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout: the flat layout's code comes from the history")
    probe = subprocess.run(["git", "-C", str(root), "cat-file", "-e", f"{FLAT_LAYOUT}^{{commit}}"],
                           capture_output=True)
    if probe.returncode:
        pytest.skip(f"commit {FLAT_LAYOUT} is not in this clone (shallow?): cannot rebuild the flat layout")
    archive = subprocess.run(["git", "-C", str(root), "archive", FLAT_LAYOUT, "pixelseg"], capture_output=True,
                             check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        try:
            tar.extractall(dest, filter="data")
        except TypeError:  # Python before the extraction filters (3.10.11 and older): our own archive
            tar.extractall(dest)
    return dest


def test_a_run_of_the_flat_layout_evaluates_predicts_and_resumes(tmp_path):
    """A run written by the code before the restructuring (module paths train.py, inference.py, ...): its
    best.pt/last.pt hold no module paths (weights_only), so today's code evaluates, predicts and resumes it."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from pixelseg.cli import main
    from pixelseg.training import config
    old = _flat_layout_code(tmp_path / "old")
    run = tmp_path / "run"
    args = tiny_run(epochs=1, model="segformer", backbone="mobilenet_v2", device="cpu", run_dir=str(run))
    done = subprocess.run([sys.executable, "-m", "pixelseg", "train", *args], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(old)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (old / "pixelseg" / "training").exists() and (old / "pixelseg" / "train.py").exists()
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["model_config"]["arch"] == "segformer"
    assert main(["evaluate", str(run), "--limit", "4", "--device", "cpu", "--out", str(tmp_path / "eval")]) == 0
    img = tmp_path / "x.png"
    Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(img)
    assert main(["predict", str(run), str(img), "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    assert (tmp_path / "pred" / "x.png").is_file()
    recorded = load_checkpoint(run / "last.pt")["config"]
    cfg = config.resumed_config(recorded, {"epochs": 2}, run, "last.pt config")
    assert cfg.model == "segformer" and cfg.epochs == 2 and cfg.val_every == "auto"  # an option added since
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert load_checkpoint(run / "last.pt")["epoch"] == 2

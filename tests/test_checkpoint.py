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

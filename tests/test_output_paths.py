"""File-system mistakes in output paths: one line, exit 2, nothing half-made."""
import os

import pytest
from PIL import Image

from conftest import tiny_run
from pixelseg.cli import main

TINY = tiny_run(limit=8, epochs=1)


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize("where", ["file", "under_file", "proc", "sys"])
def test_run_dir_that_cannot_be_made(tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    run = {"file": blocker, "under_file": blocker / "run", "proc": "/proc/pixelseg-test/run",
           "sys": "/sys/pixelseg-test/run"}[where]
    assert main(["train", *TINY, "--run-dir", str(run)]) == 2
    _one_line_error(capsys, "--run-dir", str(run))
    assert blocker.read_text() == "x" and sorted(os.listdir(tmp_path)) == ["blocker"]
    assert not os.path.exists("/proc/pixelseg-test") and not os.path.exists("/sys/pixelseg-test")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in read-only directories")
def test_run_dir_without_permission(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    assert main(["train", *TINY, "--run-dir", str(ro / "a" / "run")]) == 2
    _one_line_error(capsys, "no permission")
    assert not (ro / "a").exists()


def test_predict_out_is_an_existing_file(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--run-dir", str(run)]) == 0
    capsys.readouterr()
    img = tmp_path / "p.png"
    Image.new("RGB", (20, 20)).save(img)
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    for cmd in (["predict", str(run), str(img), "--out", str(taken)], ["evaluate", str(run), "--out", str(taken)],
                ["export", str(run), "--out", str(taken / "m.onnx")]):
        assert main(cmd) == 2
        _one_line_error(capsys, "--out", str(taken))
        assert taken.read_text() == "keep me"


def test_ctrl_c_prints_the_resume_command(tmp_path, capsys, monkeypatch):
    import pixelseg.training.train as tr
    run = tmp_path / "run"
    real = tr._write_history
    calls = []

    def interrupt_after_first_epoch(run_dir, history):
        real(run_dir, history)
        calls.append(1)
        raise KeyboardInterrupt
    monkeypatch.setattr(tr, "_write_history", interrupt_after_first_epoch)
    assert main(["train", *TINY, "--epochs", "2", "--run-dir", str(run)]) == 130
    assert f"pixelseg train --resume {run}" in capsys.readouterr().err and calls
    monkeypatch.setattr(tr, "_write_history", real)
    assert main(["train", "--resume", str(run)]) == 0

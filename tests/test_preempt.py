"""Preemption: SIGTERM stops every rank at the next step, rank 0 saves last.pt there, the exit status asks
for a requeue, and --resume continues exactly."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pixelseg.train as tr
from pixelseg.checkpoint import load_checkpoint
from pixelseg.cli import main
from pixelseg.distributed import PREEMPTED_EXIT_CODE
from conftest import tiny_run

ARGS = ["train", *tiny_run(limit=32, precision="fp32", seed=0, deterministic=True, device="cpu", epochs=2,
                           workers=0)]


def _sigterm_at_step(monkeypatch, at: int):
    """SIGTERM to this very process after optimiser step `at` (counted over the run), as a scheduler would."""
    real, seen = tr.train_one_epoch, []

    def wrapped(*args, on_step=None, **kw):
        def hook(step):
            seen.append(step)
            if len(seen) == at:
                os.kill(os.getpid(), signal.SIGTERM)
            return on_step(step)
        return real(*args, on_step=hook, **kw)
    monkeypatch.setattr(tr, "train_one_epoch", wrapped)


def test_sigterm_saves_mid_epoch_and_resume_is_exact(tmp_path, monkeypatch, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main([*ARGS, "--run-dir", str(full)]) == 0
    with monkeypatch.context() as m:
        _sigterm_at_step(m, 6)  # epoch 2, step 2 of 4
        assert main([*ARGS, "--run-dir", str(part)]) == PREEMPTED_EXIT_CODE
    err = capsys.readouterr().err
    assert f"pixelseg train --resume {part}" in err
    stopped = load_checkpoint(part / "last.pt")
    assert (stopped["epoch"], stopped["step_in_epoch"], stopped["global_step"]) == (1, 2, 6)
    assert "SIGTERM: stopped at epoch 2, step 2 of 4" in (part / "train.log").read_text()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed after the run
    assert main(["train", "--resume", str(part)]) == 0
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(part / "last.pt")
    assert b["epoch"] == 2 and b["global_step"] == a["global_step"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [h["val_miou"] for h in b["history"]] == [h["val_miou"] for h in a["history"]]
    assert [h["train_loss"] for h in b["history"]][0] == a["history"][0]["train_loss"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _rank_pid(parent: int, rank: int) -> int | None:
    """The worker process torchrun started with RANK=rank."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (p / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(p.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_sigterm_to_one_rank_stops_both_with_workers(tmp_path):
    from pixelseg.data.synthetic import write_folder
    data, run = tmp_path / "data", tmp_path / "run"
    write_folder(data, 24, (32, 32), seed=1)
    args = tiny_run(dataset="folder", data_root=data, limit=None, cache="none", workers=1, epochs=2, device="cpu",
                    figure_samples=0, run_dir=run)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pixelseg",
           "train", *args]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not ((run / "train.log").is_file()
                                               and "optimiser steps per epoch" in (run / "train.log").read_text()):
            time.sleep(0.1)
        pid = _rank_pid(proc.pid, 1)
        assert pid is not None, "rank 1 not found"
        time.sleep(1.0)
        os.kill(pid, signal.SIGTERM)  # only rank 1 is told: rank 0 must stop with it, at the same step
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the ranks it started
    assert proc.returncode != 0
    log = (run / "train.log").read_text()
    assert "SIGTERM: stopped at epoch" in log and f"--resume {run}" in log, out[-3000:]
    stopped = load_checkpoint(run / "last.pt")
    assert (stopped["epoch"], stopped["step_in_epoch"]) < (2, 0)
    assert "Traceback" not in out.split("SIGTERM")[0]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "pixelseg", "train", "--resume", str(run)], env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    final = load_checkpoint(run / "last.pt")
    steps = int(log.split(" optimiser steps per epoch")[0].rsplit("; ", 1)[1])
    assert final["epoch"] == 2 and final["global_step"] == 2 * steps

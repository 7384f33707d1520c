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

import pixelseg.training.train as tr
from pixelseg.core.checkpoint import load_checkpoint
from pixelseg.cli import main
from pixelseg.core.distributed import PREEMPTED_EXIT_CODE
from conftest import kill_torchrun, rank_pid, tiny_run

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


def test_a_sigterm_during_the_vote_counts_at_the_next_step(monkeypatch):
    """Each step the ranks vote to stop with an all-reduce, and the sum alone decides: a SIGTERM that lands
    while the collective runs must not stop this rank a step before the others, which would then wait for it
    in the next step's collectives until the timeout (the hang CI once met under load)."""
    import pixelseg.core.distributed as d
    stop = d.StopSignal()

    def all_reduce(flag, op):  # the other rank votes 0; this rank's SIGTERM handler runs meanwhile
        stop._handle(signal.SIGTERM, None)

    monkeypatch.setattr(d.dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(d.dist, "all_reduce", all_reduce)
    two = d.DistInfo(rank=1, world_size=2)
    assert stop.agreed(two) is False  # what the other rank computed from the same sum: carry on
    assert stop.requested and stop.agreed(two) is True  # the next step's vote carries it: both stop there


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


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
        pid = rank_pid(proc.pid, 1)
        assert pid is not None, "rank 1 not found"
        time.sleep(1.0)
        os.kill(pid, signal.SIGTERM)  # only rank 1 is told: rank 0 must stop with it, at the same step
        out, _ = proc.communicate(timeout=300)
    finally:
        kill_torchrun(proc)  # torchrun and the ranks it started, if it still runs
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


def test_resume_auto_starts_or_continues_the_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    one = [a if a != "2" or prev != "--epochs" else "1" for prev, a in zip(["", *ARGS], ARGS)]  # --epochs 1
    assert main([*one, "--run-dir", str(run), "--resume", "auto"]) == 0  # nothing there yet: starts
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert main([*ARGS, "--run-dir", str(run), "--resume", "auto"]) == 0  # --epochs 2 may change: continues
    final = load_checkpoint(run / "last.pt")
    assert final["epoch"] == 2 and [h["epoch"] for h in final["history"]] == [1, 2]
    assert "(--resume auto: continued from its last.pt by itself)" in (run / "train.log").read_text()
    capsys.readouterr()
    assert main([*ARGS, "--run-dir", str(run), "--resume", "auto", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert f"--run-dir {run} holds a run started with other options (lr: run " in err and "given 0.5" in err
    assert main([*ARGS, "--resume", "auto"]) == 2
    assert "--resume auto needs --run-dir" in capsys.readouterr().err


def test_a_torchrun_restart_resumes_and_a_first_start_is_refused_as_before(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _sigterm_at_step(m, 6)  # a run that stopped mid-epoch 2, as a killed worker's would
        assert main([*ARGS, "--run-dir", str(run)]) == PREEMPTED_EXIT_CODE
    assert main([*ARGS, "--run-dir", str(run)]) == 2  # restart count 0: as today, the run dir is refused
    assert "already holds a run; continue it with --resume" in capsys.readouterr().err
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # what torchrun --max-restarts sets on a restart
    assert main([*ARGS, "--run-dir", str(run)]) == 0
    final = load_checkpoint(run / "last.pt")
    assert final["epoch"] == 2 and final["global_step"] == 8
    assert "resumed " + str(run) + " at epoch 2, step 2 of 4 (torchrun restart 1: continued from its last.pt by " \
           "itself)" in (run / "train.log").read_text()

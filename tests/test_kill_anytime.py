"""Kill at any moment, lose nothing: `convert`, `shards`, `export` and `train` are SIGKILLed at seeded random
times, then the output is checked and the same command run again.

Design (docs/reliability.md): each test first runs the command uninterrupted (the reference), noting its wall
time T and when its first (temporary) output appeared, W. Then, per seed, the same command runs in a fresh
process group and is SIGKILLed after a delay drawn from random.Random(seed): seed 0 at [0.15 T, 1.1 T] from
the start (start-up included; past the end the run finishes: also a valid outcome), the others at [0, T - W]
after this run's own first output appeared (the writing phase; start-up time varies most with load). The
property after the kill: the output either does not exist or is complete and equal to the reference, never
half-written; and running the same command again succeeds and gives the reference (train: resumed with
--resume auto; with --deterministic on CPU its final weights equal the uninterrupted run's). Kill times scale
with the measured W and T, so a slow machine moves them, not the test's verdict; nothing asserts how long anything
took.
"""
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _fakes import fake_checkpoint
from _labels_exports import write_coco
from conftest import tiny_run
from pixelseg.core.checkpoint import load_checkpoint

SEEDS = (0, 1, 2)
REPO = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pixelseg", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=900)


def timed_reference(args, cwd, started) -> tuple[float, float]:
    """Run the reference; (when `started()` first held, total wall time T), both in seconds from the start.
    `started` says the command is past start-up and writing (its temp output exists): kills are aimed there."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: nobody reads while it runs, a full pipe blocks it
        proc = subprocess.Popen([sys.executable, "-m", "pixelseg", *args], cwd=cwd, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=err, text=True)
        t_first = None
        while proc.poll() is None:
            if t_first is None and started():
                t_first = time.monotonic() - t0
            time.sleep(0.02)
        total = time.monotonic() - t0
        err.seek(0)
        assert proc.returncode == 0, err.read()[-2000:]
    return (t_first if t_first is not None else 0.15 * total), total


def run_and_kill(args, cwd, when: tuple[str, float], started) -> str:
    """Start `pixelseg args`; SIGKILL it (and what it forked) at `when`: ("start", s) s after it started, or
    ("writing", s) s after `started()` first held for this run. 'killed' or 'finished'."""
    proc = subprocess.Popen([sys.executable, "-m", "pixelseg", *args], cwd=cwd, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    how, delay = when
    try:
        while how == "writing" and proc.poll() is None and not started():
            time.sleep(0.01)
        proc.wait(delay)
        assert proc.returncode == 0, proc.returncode
        return "finished"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(60)
        return "killed"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)


def delays(t_first: float, t_ref: float, n=len(SEEDS)):
    """Seed 0: anywhere from start-up to past the end of the reference's time; the other seeds: inside the
    writing phase, counted from when this run's first output appears (start-up time varies most with load)
    over the length of the reference's writing phase: where a kill can half-write something."""
    out = []
    for seed in SEEDS[:n]:
        rng = random.Random(seed)
        out.append(("start", rng.uniform(0.15, 1.1) * t_ref) if seed == 0
                   else ("writing", rng.uniform(0, t_ref - t_first)))
    return out


def tree(root: Path) -> dict[str, bytes]:
    """Visible files under root (relative path -> bytes); hidden temp names are not part of an output."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---- convert ----------------------------------------------------------------------------------------------
def test_convert_killed_at_random_times(tmp_path):
    root = write_coco(tmp_path / "coco")
    ref = tmp_path / "ref"
    t_first, t_ref = timed_reference(["convert", "--dataset", "coco", "--data-root", str(root), "--out", str(ref)],
                                     tmp_path, lambda: any(tmp_path.glob(".ref.tmp-*")) or ref.exists())
    want = tree(ref)
    assert "convert_report.json" in want and any(k.startswith("masks/") for k in want)
    outcomes = []
    for i, delay in enumerate(delays(t_first, t_ref)):
        work = tmp_path / f"k{i}"
        work.mkdir()
        out = work / "out"
        args = ["convert", "--dataset", "coco", "--data-root", str(root), "--out", str(out)]
        outcome = run_and_kill(args, tmp_path, delay, lambda: bool(leftovers(work)) or out.exists())
        outcomes.append(f"{outcome} at {delay[0]}+{delay[1]:.1f}s: " + (
            "out complete" if out.exists() else f"no out, {len(leftovers(work))} temp folder(s)"))
        if out.exists():  # complete: the rename is the last step
            assert tree(out) == want
            again = run(args, tmp_path)  # refuses to overwrite, in one line, touching nothing
            assert again.returncode == 2 and "exists and is not empty" in again.stderr.strip().splitlines()[-1]
            assert tree(out) == want
        else:
            again = run(args, tmp_path)
            assert again.returncode == 0, again.stderr[-2000:]
            assert tree(out) == want
        assert leftovers(work) == [], leftovers(work)  # the killed run's temp folder is gone after the rerun
    print("convert outcomes:", outcomes, f"writing {t_first:.1f}-{t_ref:.1f}s")


# ---- shards -----------------------------------------------------------------------------------------------
def _shard_members(out: Path) -> dict:
    """{(shard, member name): bytes} of the shards the index lists, checked against its counts."""
    index = json.loads((out / "train.json").read_text())
    got = {}
    for s in index["shards"]:
        with tarfile.open(out / s["url"]) as tar:
            names = [m for m in tar.getmembers() if m.isfile()]
            keys = {m.name.split(".", 1)[0] for m in names} - {"__info__"}
            assert len(keys) == s["count"], (s, keys)
            for m in names:
                got[(s["url"], m.name)] = tar.extractfile(m).read()
    assert sum(s["count"] for s in index["shards"]) == index["count"]
    return got


def test_shards_killed_at_random_times(tmp_path):
    base = ["shards", "--dataset", "synthetic", "--split", "train", "--limit", "160", "--maxcount", "16"]
    ref = tmp_path / "ref"
    t_first, t_ref = timed_reference([*base, "--out", str(ref)], tmp_path,
                                     lambda: ref.is_dir() and any(ref.glob("*.tar*")))
    want = _shard_members(ref)
    outcomes = []
    for i, delay in enumerate(delays(t_first, t_ref)):
        out = tmp_path / f"k{i}"
        outcome = run_and_kill([*base, "--out", str(out)], tmp_path, delay,
                               lambda: out.is_dir() and any(out.glob("*.tar*")))
        outcomes.append(f"{outcome} at {delay[0]}+{delay[1]:.1f}s: " + (
                        "index + all shards" if (out / "train.json").exists() else
                        f"no index, {len(list(out.glob('*.tar')))} finished shard(s), "
                        f"{len(list(out.glob('.*.tmp')))} temp" if out.exists() else "no out"))
        if (out / "train.json").exists():  # the index is written last: when it is there, the set is complete
            assert _shard_members(out) == want
        for p in out.glob("*.tar") if out.exists() else []:  # a shard under its final name is whole
            with tarfile.open(p) as tar:
                assert tar.getmembers()
        again = run([*base, "--out", str(out)], tmp_path)
        assert again.returncode == 0, again.stderr[-2000:]
        assert _shard_members(out) == want
        assert not [n for n in leftovers(out) if n.endswith(".tmp")], leftovers(out)
    print("shards outcomes:", outcomes, f"writing {t_first:.1f}-{t_ref:.1f}s")


# ---- export -----------------------------------------------------------------------------------------------
def _onnx_outputs(path: Path) -> np.ndarray:
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_export_killed_at_random_times(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "model.pt")
    ref = tmp_path / "ref.onnx"
    t_first, t_ref = timed_reference(["export", str(ckpt), "--format", "onnx", "--out", str(ref)], tmp_path,
                                     lambda: (tmp_path / ".ref.onnx.partial").exists() or ref.exists())
    want = _onnx_outputs(ref)
    outcomes = []
    for i, delay in enumerate(delays(t_first, t_ref)):
        work = tmp_path / f"k{i}"
        work.mkdir()
        out = work / "m.onnx"
        args = ["export", str(ckpt), "--format", "onnx", "--out", str(out)]
        outcome = run_and_kill(args, tmp_path, delay, lambda: (work / ".m.onnx.partial").exists() or out.exists())
        outcomes.append(f"{outcome} at {delay[0]}+{delay[1]:.1f}s: " + ("out complete" if out.exists() else "no out")
                        + (", .partial left" if (work / ".m.onnx.partial").exists() else ""))
        if out.exists():
            np.testing.assert_array_equal(_onnx_outputs(out), want)
        again = run(args, tmp_path)
        assert again.returncode == 0, again.stderr[-2000:]
        np.testing.assert_array_equal(_onnx_outputs(out), want)
        assert leftovers(work) == [], leftovers(work)
    print("export outcomes:", outcomes, f"writing {t_first:.1f}-{t_ref:.1f}s")


# ---- train ------------------------------------------------------------------------------------------------
TRAIN = ["train", *tiny_run(precision="fp32", seed=0, deterministic=True, device="cpu", epochs=2, workers=0,
                            checkpoint_every=1, figure_samples=0)]


def test_train_killed_at_random_times_resumes_to_the_same_weights(tmp_path):
    ref = tmp_path / "ref"
    t_first, t_ref = timed_reference([*TRAIN, "--run-dir", str(ref), "--resume", "auto"], tmp_path,
                                     lambda: (ref / "config.yaml").exists())
    want = load_checkpoint(ref / "last.pt")
    outcomes = []
    for i, delay in enumerate(delays(t_first, t_ref)):
        rd = tmp_path / f"k{i}"
        args = [*TRAIN, "--run-dir", str(rd), "--resume", "auto"]
        outcome = run_and_kill(args, tmp_path, delay, lambda: (rd / "config.yaml").exists())
        last = load_checkpoint(rd / "last.pt") if (rd / "last.pt").exists() else None
        outcomes.append(f"{outcome} at {delay[0]}+{delay[1]:.1f}s: " + (f"last.pt at step {last['global_step']}" if last else
                                                          "no last.pt" if rd.exists() else "no run dir"))
        if rd.exists():
            for pt in rd.glob("*.pt"):  # every checkpoint left behind loads
                load_checkpoint(pt)
            for js in rd.glob("*.json"):
                json.loads(js.read_text())
        again = run(args, tmp_path)
        assert again.returncode == 0, again.stderr[-2000:]
        got = load_checkpoint(rd / "last.pt")
        assert got["epoch"] == want["epoch"] == 2 and got["global_step"] == want["global_step"]
        assert all(torch.equal(want["model"][k], got["model"][k]) for k in want["model"])
        assert [h["epoch"] for h in got["history"]] == [1, 2]
        assert json.loads((rd / "summary.json").read_text())["best_val_miou"] == pytest.approx(
            json.loads((ref / "summary.json").read_text())["best_val_miou"])
        assert not list(rd.glob(".*.tmp"))
    print("train outcomes:", outcomes, f"writing {t_first:.1f}-{t_ref:.1f}s")


# ---- regression: temp leftovers of a killed writer ---------------------------------------------------------
def test_a_killed_shards_unfinished_shard_is_removed_by_the_next_run(tmp_path):
    """Found by test_shards_killed_at_random_times' design: a shards run SIGKILLed mid-shard left its
    .train-*.tar.tmp in --out for good; the next run to that --out removes it (its writer's pid is gone).
    (convert's temp folder: removed by main's convert._clean_stale, checked by test_convert_killed_at_random_times.)"""
    from pixelseg.data.shards_write import write_shards
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".train-{dead.pid}-abc.tar.tmp"
    stale.write_bytes(b"half a tar")
    write_shards("synthetic", None, "train", out, maxcount=8, limit=8, progress=False)
    assert not stale.exists() and (out / "train.json").is_file()

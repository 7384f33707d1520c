"""torchrun/DDP on CPU with gloo, and runs that survive SIGKILL.

Source of differences between 1 and 2 processes: BatchNorm in training mode normalises with the
statistics of the per-process batch (4 images instead of 8), so without --freeze-bn (and SyncBN is
GPU-only in PyTorch) the runs differ slightly. With --freeze-bn the only difference is the order of
floating-point sums (gradient all-reduce, and oneDNN picking other kernels for a batch of 4 than of 8),
so losses agree to ~2e-4 relative. The exact comparison uses SGD: Adam divides by sqrt(v), which turns
near-zero gradients (deep BN biases) into ±lr steps whose sign follows rounding noise.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_run
from pixelseg.core.checkpoint import load_checkpoint
from pixelseg.data import collate_batch, load_split
from pixelseg.inference.loading import load_model
from pixelseg.training.loop import RunContext, evaluate_loader

TINY = tiny_run(precision="fp32", seed=0, deterministic=True, device="cpu")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _torchrun(nproc, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def _run(cmd, timeout=600):
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _weights(run):
    return load_checkpoint(Path(run) / "last.pt")


def _max_rel_diff(a, b):
    """||a - b|| / ||b|| over all floating-point tensors together (per tensor, near-zero biases make
    the ratio meaningless)."""
    keys = [k for k in a if a[k].is_floating_point()]
    num = sum(float((a[k] - b[k]).double().norm() ** 2) for k in keys) ** 0.5
    return num / sum(float(b[k].double().norm() ** 2) for k in keys) ** 0.5


@pytest.fixture(scope="module")
def one_vs_two(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    runs = {}
    exact = ["--freeze-bn", "--optimizer", "sgd", "--lr", "0.05"]
    for name, nproc, extra in [("one", 1, exact), ("two", 2, exact), ("two_bn", 2, [])]:
        runs[name] = d / name
        _run(_torchrun(nproc, "-m", "pixelseg", "train", *TINY, "--epochs", "2", "--run-dir", str(runs[name]), *extra))
    runs["one_bn"] = d / "one_bn"
    _run([sys.executable, "-m", "pixelseg", "train", *TINY, "--epochs", "2", "--run-dir", str(runs["one_bn"])])
    return runs


def test_two_processes_match_one_at_the_same_global_batch(one_vs_two):
    a, b = _weights(one_vs_two["one"]), _weights(one_vs_two["two"])
    assert b["config"]["batch_size"] == 8
    log = (one_vs_two["two"] / "train.log").read_text()
    assert "global 8 = 4 per rank × 2 ranks" in log
    la = [h["train_loss"] for h in a["history"]]
    lb = [h["train_loss"] for h in b["history"]]
    assert lb == pytest.approx(la, rel=1e-3)
    assert _max_rel_diff(a["model"], b["model"]) < 1e-4
    # without frozen BN the per-rank batch statistics differ: close, but not equal
    c, d = _weights(one_vs_two["one_bn"]), _weights(one_vs_two["two_bn"])
    assert [h["train_loss"] for h in d["history"]] == pytest.approx([h["train_loss"] for h in c["history"]], rel=0.1)
    params_c = {k: v for k, v in c["model"].items() if "running_" not in k}  # BN buffers differ by design
    params_d = {k: v for k, v in d["model"].items() if "running_" not in k}
    assert 1e-6 < _max_rel_diff(params_c, params_d) < 0.2


def test_only_rank_zero_writes(one_vs_two):
    run = one_vs_two["two"]
    assert len((run / "metrics.json").read_text()) > 0
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in one_vs_two["one"].iterdir())


def test_sharded_validation_equals_single_process_exactly(one_vs_two, tmp_path):
    ckpt_path = one_vs_two["one"] / "last.pt"
    n_val = 13  # odd: a padding sampler would count one image twice
    out = tmp_path / "cm.json"
    _run(_torchrun(2, str(Path(__file__).with_name("_ddp_eval.py")), str(ckpt_path), str(n_val), str(out)))
    two = json.loads(out.read_text())
    ds = load_split("synthetic", None, "val", 32, limit=n_val)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=collate_batch)
    cm, _ = evaluate_loader(load_model(load_checkpoint(ckpt_path), torch.device("cpu")), loader,
                            RunContext(torch.device("cpu"), None, True), ds.info, progress=False)
    assert two["world"] == 2 and two["local"] == 7
    assert two["cm"] == cm.mat.tolist()
    assert sum(map(sum, two["cm"])) == n_val * 32 * 32


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    _run([sys.executable, "-m", "pixelseg", "train", *TINY, "--epochs", "2", "--run-dir", str(full)])
    _run([sys.executable, "-m", "pixelseg", "train", *TINY, "--epochs", "1", "--run-dir", str(part)])
    _run([sys.executable, "-m", "pixelseg", "train", "--resume", str(part), "--epochs", "2"])
    a, b = _weights(full), _weights(part)
    assert b["epoch"] == 2 and [h["epoch"] for h in b["history"]] == [1, 2]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (part / "figures" / "epoch_002.png").is_file()
    assert len((part / "metrics.csv").read_text().strip().splitlines()) == 3


def test_sigkill_mid_epoch_then_resume(tmp_path):
    run = tmp_path / "run"
    args = ["--dataset", "synthetic", "--limit", "64", "--image-size", "32", "--batch-size", "8", "--weights", "none",
            "--epochs", "3", "--checkpoint-every", "1", "--device", "cpu", "--run-dir", str(run)]
    proc = subprocess.Popen([sys.executable, "-m", "pixelseg", "train", *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if (run / "last.pt").is_file():
                try:
                    c = load_checkpoint(run / "last.pt")
                except Exception:
                    c = None
                if c and c["step_in_epoch"] >= 2:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("no mid-epoch checkpoint appeared")
        time.sleep(0.3)  # let it get into the middle of something
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    for pt in run.glob("*.pt"):   # every checkpoint left behind is complete
        load_checkpoint(pt)
    killed_at = load_checkpoint(run / "last.pt")
    assert killed_at["epoch"] < 3
    _run([sys.executable, "-m", "pixelseg", "train", "--resume", str(run)])
    final = load_checkpoint(run / "last.pt")
    assert final["epoch"] == 3 and final["step_in_epoch"] == 0
    assert [h["epoch"] for h in final["history"]] == [1, 2, 3]
    assert not list(run.glob(".*.tmp"))
    assert "resumed" in (run / "train.log").read_text()


def test_a_lost_peer_is_one_line_saying_how_to_continue(tmp_path):
    from pixelseg.core.distributed import DistInfo
    from pixelseg.training.train import lost_peers
    gloo = RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
                        "10000ms for recv operation to complete")
    err = lost_peers(gloo, DistInfo(0, 2, 0), tmp_path, 10.0)
    assert str(err) == (f"rank 0: lost the other processes of this run (Timed out waiting 10000ms for recv operation "
                        f"to complete); a node died, was stopped or did not answer within --dist-timeout 10 s; restart "
                        f"every node with: pixelseg train --resume {tmp_path} (or let torchrun --max-restarts, or "
                        "--resume auto, continue it)")
    reset = RuntimeError("[../pair.cc:545] Read error [127.0.0.1]:22454: Connection reset by peer. This is ...")
    assert "(Read error [127.0.0.1]:22454: Connection reset by peer. This" in str(lost_peers(reset, DistInfo(1, 2, 0),
                                                                                            None, None))
    assert lost_peers(RuntimeError("CUDA out of memory"), DistInfo(0, 2, 0), tmp_path, None) is None
    assert lost_peers(gloo, DistInfo(), tmp_path, None) is None  # one process: not a lost peer

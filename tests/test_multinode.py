"""Two nodes for real: two torchrun agents on this machine (c10d rendezvous on 127.0.0.1, gloo, CPU), one
process each, against one node with two processes; a node's agent killed mid-epoch, then --resume; a node
started with other flags refused. With moto installed the data are shards in a local S3 server, split
across the nodes. Every subprocess has a timeout and runs in its own session, so a hang fails the test
and the whole node (agent and its worker) can be killed at once."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pixelseg.core.checkpoint import load_checkpoint
from conftest import kill_torchrun, rank_pid, tiny_run

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_run(dataset=None, limit=None, image_size=16, batch_size=4, precision="fp32", seed=0, deterministic=True,
                device="cpu", workers=0, freeze_bn=True, optimizer="sgd", lr=0.05)
TIMEOUT = 420


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(extra or {}))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _agent(node: int, port: int, args, env, log: Path, program=("-m", "pixelseg", "train")):
    """One node: a torchrun agent with one worker process (`program` with `args`), in a session of its own."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
           "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-id", f"test-{port}", "--local-addr", "127.0.0.1", "--max-restarts", "0",
           *program, *args]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _two_nodes(args, env, logs: Path, wait=True):
    port = _port()
    procs = [_agent(n, port, args, env, logs / f"node{n}.log") for n in range(2)]
    if not wait:
        return procs
    try:
        codes = [p.wait(TIMEOUT) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail("two-node run hung: " + (logs / "node0.log").read_text()[-3000:])
    finally:
        for p in procs:
            kill_torchrun(p)
    return codes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(dataset flags, extra environment): shards in a local S3 server when moto/s3fs are installed,
    else the synthetic dataset."""
    try:
        import s3fs  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError:
        yield ["--dataset", "synthetic", "--limit", "20"], {}  # 16 train, 4 val
        return
    from _s3server import moto_s3
    from pixelseg.data.shards_write import write_shards
    from pixelseg.data.synthetic import write_folder
    with moto_s3("pixelseg-nodes") as env:
        root = tmp_path_factory.mktemp("folder")
        write_folder(root, 22, (24, 24), seed=4)
        for split in ("train", "val"):
            write_shards("folder", root, split, "s3://pixelseg-nodes/ds/", maxcount=3, progress=False)
        yield ["--dataset", "shards", "--data-root", "s3://pixelseg-nodes/ds/"], env


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    flags, extra = data
    d = tmp_path_factory.mktemp("nodes")
    env = _env(extra)
    codes = _two_nodes([*flags, *TINY, "--epochs", "1", "--run-dir", str(d / "nodes")], env, d)
    if codes != [0, 0] and "rendezvous" in (d / "node0.log").read_text().lower() and not (d / "nodes").exists():
        pytest.skip("torchrun's c10d rendezvous did not start on 127.0.0.1: " + (d / "node0.log").read_text()[-500:])
    assert codes == [0, 0], (d / "node0.log").read_text()[-3000:] + (d / "node1.log").read_text()[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "pixelseg", "train", *flags, *TINY, "--epochs", "1", "--run-dir", str(d / "procs")],
                       env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return {"nodes": d / "nodes", "procs": d / "procs", "logs": d, "flags": flags, "env": env}


def test_two_nodes_match_one_node_with_two_processes(runs):
    a = json.loads((runs["nodes"] / "metrics.json").read_text())
    b = json.loads((runs["procs"] / "metrics.json").read_text())
    for key in ("train_loss", "val_loss", "val_miou", "val_pixel_acc"):
        assert [h[key] for h in a] == pytest.approx([h[key] for h in b], rel=1e-5), key
    ca, cb = load_checkpoint(runs["nodes"] / "last.pt"), load_checkpoint(runs["procs"] / "last.pt")
    assert ca["global_step"] == cb["global_step"] > 0
    assert "global 4 = 2 per rank × 2 ranks" in (runs["nodes"] / "train.log").read_text()


def test_only_rank_zero_writes_and_validation_counts_each_image_once(runs):
    assert sorted(p.name for p in runs["nodes"].iterdir()) == sorted(p.name for p in runs["procs"].iterdir())
    # a padding sampler would score an image twice; the single-process evaluation of the same weights agrees
    r = subprocess.run([sys.executable, "-m", "pixelseg", "evaluate", str(runs["nodes"])],
                       env=runs["env"], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-2000:]
    ev = json.loads((runs["nodes"] / "eval_val.json").read_text())
    hist = json.loads((runs["nodes"] / "metrics.json").read_text())
    assert ev["miou"] == pytest.approx(hist[-1]["val_miou"], abs=1e-6)


def test_a_node_with_another_config_is_refused_naming_the_keys(runs, tmp_path):
    port = _port()
    run = tmp_path / "run"
    base = [*runs["flags"], *TINY, "--epochs", "1", "--run-dir", str(run)]
    procs = [_agent(0, port, base, runs["env"], tmp_path / "node0.log"),
             _agent(1, port, [*base, "--lr", "0.1", "--epochs", "2"], runs["env"], tmp_path / "node1.log")]
    try:
        codes = [p.wait(TIMEOUT) for p in procs]
    finally:
        for p in procs:
            kill_torchrun(p)
    assert codes[0] != 0 and codes[1] != 0
    logs = (tmp_path / "node0.log").read_text() + (tmp_path / "node1.log").read_text()
    assert "started with different configs (epochs: rank 0 " in logs and "lr: rank 0 " in logs
    assert "Traceback" not in logs.split("different configs")[0].rsplit("\n", 3)[-1]
    assert not (run / "last.pt").exists()


def _wait_for_mid_epoch_checkpoint(run: Path, procs, log: Path, epoch: int | None = None) -> None:
    """Until RUN/last.pt is a checkpoint at least 2 steps into an epoch (`epoch`, if given); fails if a
    process ends first or nothing appears within TIMEOUT."""
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        try:
            c = load_checkpoint(run / "last.pt") if (run / "last.pt").is_file() else None
        except Exception:  # caught mid-write by the reader: try again
            c = None
        if c and c["step_in_epoch"] >= 2 and (epoch is None or c["epoch"] == epoch):
            return
        if any(p.poll() is not None for p in procs):
            pytest.fail("a process ended early: " + log.read_text()[-3000:])
        time.sleep(0.1)
    pytest.fail("no mid-epoch checkpoint appeared")


def test_resume_after_one_nodes_agent_is_killed_mid_epoch(runs, tmp_path):
    run = tmp_path / "run"
    args = [*runs["flags"], *TINY, "--epochs", "2", "--checkpoint-every", "1", "--batch-size", "2",
            "--run-dir", str(run)]
    procs = _two_nodes(args, runs["env"], tmp_path, wait=False)
    try:
        _wait_for_mid_epoch_checkpoint(run, procs, tmp_path / "node0.log")
        kill_torchrun(procs[1])  # node 1 dies: its agent and its worker (a session of its own, found by pid)
        # node 0's rank then waits in a gloo collective until the process group's timeout (30 min by
        # default); a scheduler ends the whole job when a node is lost (srun --kill-on-bad-exit, the
        # PyTorchJob restarting every pod), as done here
        time.sleep(2)
        kill_torchrun(procs[0])
    finally:
        for p in procs:
            kill_torchrun(p)
    killed_at = load_checkpoint(run / "last.pt")
    assert killed_at["epoch"] < 2
    codes = _two_nodes(["--resume", str(run)], runs["env"], tmp_path)
    assert codes == [0, 0], (tmp_path / "node0.log").read_text()[-3000:]
    final = load_checkpoint(run / "last.pt")
    assert final["epoch"] == 2 and final["step_in_epoch"] == 0
    assert [h["epoch"] for h in final["history"]] == [1, 2]
    n_train = 18 if "shards" in runs["flags"] else 16
    assert final["global_step"] == 2 * n_train // 2  # global batch 2: every step of both epochs once
    assert "resumed" in (run / "train.log").read_text()


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_max_restarts_continues_by_itself_after_a_worker_is_killed(tmp_path):
    run = tmp_path / "run"
    args = ["--dataset", "synthetic", "--limit", "20", *TINY, "--epochs", "2", "--checkpoint-every", "1",
            "--batch-size", "2", "--run-dir", str(run)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "-m", "pixelseg", "train", *args]
    log = tmp_path / "torchrun.log"
    proc = subprocess.Popen(cmd, env=_env(), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_mid_epoch_checkpoint(run, [proc], log, epoch=0)
        pid = rank_pid(proc.pid, 1)
        assert pid is not None, "rank 1 not found"
        os.kill(pid, signal.SIGKILL)  # a worker dies mid-epoch 1: torchrun restarts both workers once
        code = proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail("the restarted run hung: " + log.read_text()[-3000:])
    finally:
        kill_torchrun(proc)
    assert code == 0, log.read_text()[-3000:]
    final = load_checkpoint(run / "last.pt")
    assert final["epoch"] == 2 and final["step_in_epoch"] == 0
    assert [h["epoch"] for h in final["history"]] == [1, 2]
    text = (run / "train.log").read_text()
    steps = int(text.split(" optimiser steps per epoch")[0].rsplit("; ", 1)[1])
    assert final["global_step"] == 2 * steps  # every step of both epochs once
    assert text.count("(torchrun restart 1: continued from its last.pt by itself)") == 1, text[-2000:]


def test_two_nodes_read_every_s3_sample_once(data, tmp_path):
    """The shard split of the training loader across the two nodes' ranks (ranks from torchrun, DataLoader
    workers 2 each): every sample of the S3 prefix once per epoch, the same number of batches on both."""
    flags, extra = data
    if "shards" not in flags:
        pytest.skip("moto/s3fs not installed: no S3 server to read shards from")
    from pixelseg.data.shards_write import write_shards
    from _fakes import write_id_folder
    from test_shards import _RANK  # rank, url, out: the exactly-once check of local shards
    root = write_id_folder(tmp_path / "ids", 14)
    url = "s3://pixelseg-nodes/ids/"
    write_shards("folder", root, "train", url, maxcount=3, progress=False)
    script = tmp_path / "rank.py"
    script.write_text("import os, sys\nsys.argv = [sys.argv[0], os.environ['RANK'], *sys.argv[1:]]\n" + _RANK)
    port, env = _port(), _env(extra)
    procs = [_agent(n, port, [url, str(tmp_path / f"r{n}.json")], env, tmp_path / f"node{n}.log",
                    program=(str(script),)) for n in range(2)]
    try:
        codes = [p.wait(TIMEOUT) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail("two-node read hung: " + (tmp_path / "node0.log").read_text()[-3000:])
    finally:
        for p in procs:
            kill_torchrun(p)
    assert codes == [0, 0], (tmp_path / "node0.log").read_text()[-3000:] + (tmp_path / "node1.log").read_text()[-3000:]
    res = [json.loads((tmp_path / f"r{n}.json").read_text()) for n in range(2)]
    assert sorted(res[0]["ids"] + res[1]["ids"]) == list(range(14))
    assert len(res[0]["sizes"]) == len(res[1]["sizes"]) == res[0]["planned"]


@pytest.mark.skip(reason="open (issue 20): with node 1's worker and agent stopped (SIGSTOP by pid), node 0 still "
                         "did not end within 300 s here; the --dist-timeout path is unit-tested in test_distributed.py")
def test_a_hung_node_ends_the_other_within_the_dist_timeout(tmp_path):
    """Node 1 stopped (SIGSTOP: it holds its sockets open, as a node that drops off the network does, so no
    peer sees a connection reset): node 0 stops after --dist-timeout with one line, not after 30 min."""
    run = tmp_path / "run"
    args = ["--dataset", "synthetic", "--limit", "20", *TINY, "--epochs", "100", "--checkpoint-every", "1",
            "--batch-size", "2", "--dist-timeout", "10", "--run-dir", str(run)]  # far more than it will run
    procs = _two_nodes(args, _env(), tmp_path, wait=False)
    worker = None
    try:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline and not (run / "last.pt").is_file():
            if any(p.poll() is not None for p in procs):
                pytest.fail("a node ended early: " + (tmp_path / "node0.log").read_text()[-3000:])
            time.sleep(0.1)
        worker = rank_pid(procs[1].pid, 1)  # torchrun's workers live in a session of their own: stop it by pid
        assert worker is not None, "node 1's worker not found under its agent"
        os.kill(worker, signal.SIGSTOP)  # node 1 hangs: worker and agent
        os.killpg(procs[1].pid, signal.SIGSTOP)
        try:
            code = procs[0].wait(TIMEOUT)  # bounded: the assertion is that it ends at all, with the reason
        except subprocess.TimeoutExpired:
            pytest.fail("node 0 still waits for the stopped node")
    finally:
        if worker is not None:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(worker, sig)
                except ProcessLookupError:
                    pass
        if procs[1].poll() is None:
            os.killpg(procs[1].pid, signal.SIGKILL)
            os.killpg(procs[1].pid, signal.SIGCONT)
        for p in procs:
            kill_torchrun(p)
    log = (tmp_path / "node0.log").read_text()
    assert code != 0
    assert "rank 0: lost the other processes of this run (" in log, log[-3000:]
    assert f"did not answer within --dist-timeout 10 s; restart every node with: pixelseg train --resume {run}" in log

"""Streamed epochs equal folder epochs: the same optimiser steps and batch sizes for the same data and flags."""
import pytest
import torch

from pixelseg.core.checkpoint import load_checkpoint
from pixelseg.data import collate_batch, load_split
from pixelseg.data.base import CacheSpec
from pixelseg.data.shards_write import write_shards
from pixelseg.data.synthetic import write_folder
from pixelseg.training.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root, out = tmp_path_factory.mktemp("folder"), tmp_path_factory.mktemp("shards")
    write_folder(root, 30, (24, 24), seed=3)
    for split in ("train", "val"):
        write_shards("folder", root, split, out, maxcount=4, progress=False)
    return root, out


def _folder_sizes(root, batch, rank, world):
    ds = load_split("folder", root, "train", 16, use_cache=CacheSpec("none"))
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=0)
    return [len(x) for x, _ in torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler,
                                                          collate_fn=collate_batch)]


def _shard_sizes(out, batch, rank, world, workers):
    ds = load_split("shards", out, "train", 16).configure(batch, workers, rank, world, shuffle=True, even=True)
    ds.set_epoch(1)
    sizes = [len(x) for x, _ in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)]
    assert len(sizes) == ds.num_batches()
    return sizes


@pytest.mark.parametrize("batch,world,workers", [(64, 1, 2), (5, 1, 2), (4, 2, 2), (3, 2, 0)])
def test_shard_batches_equal_folder_batches(data, batch, world, workers):
    root, out = data
    for rank in range(world):
        folder, shards = _folder_sizes(root, batch, rank, world), _shard_sizes(out, batch, rank, world, workers)
        assert len(shards) == len(folder)
        # DistributedSampler repeats a sample on a rank that is one short; shards make that batch smaller
        assert shards[:-1] == folder[:-1] and folder[-1] - 1 <= shards[-1] <= folder[-1]
        if world == 1:
            assert shards == folder


def test_training_takes_the_same_steps(data, tmp_path):
    root, out = data
    run = {"image_size": 16, "batch_size": 64, "epochs": 1, "weights": "none", "device": "cpu",
           "figure_samples": 0, "precision": "fp32", "workers": 2}
    train({**run, "dataset": "folder", "data_root": str(root), "cache": "none", "run_dir": str(tmp_path / "f")})
    train({**run, "dataset": "shards", "data_root": str(out), "run_dir": str(tmp_path / "s")})
    f, s = load_checkpoint(tmp_path / "f" / "last.pt"), load_checkpoint(tmp_path / "s" / "last.pt")
    assert f["global_step"] == s["global_step"] == 1
    assert "1 optimiser steps per epoch" in (tmp_path / "s" / "train.log").read_text()


@pytest.mark.parametrize("n,batch,world", [(25, 3, 2), (7, 2, 2), (31, 4, 3), (24, 5, 2)])
def test_a_short_rank_never_reads_a_sample_twice(n, batch, world):
    from pixelseg.data.shards import ShardDataset, _rank_range
    ds = ShardDataset(["a.tar"], [n], None, 8).configure(batch, 2, 0, world, shuffle=True, even=True)
    plans = [ds.batch_sizes(r) for r in range(world)]
    assert len({len(p) for p in plans}) == 1  # DDP ranks in step
    for r, plan in enumerate(plans):
        lo, hi = _rank_range(n, r, world)
        assert sum(plan) == hi - lo and min(plan) >= 1 and max(plan) <= batch  # each sample once, no empty batch
        assert ds._shares(r, 2)[1] is None  # no repeated sample planned


def test_batch_size_one_repeats_one_sample_on_the_short_rank():
    from pixelseg.data.shards import ShardDataset
    ds = ShardDataset(["a.tar"], [5], None, 8).configure(1, 2, 0, 2, shuffle=True, even=True)
    assert ds.batch_sizes(0) == ds.batch_sizes(1) == [1, 1, 1]  # 3 steps each; rank 0 holds 2 samples
    assert ds._shares(0, 2)[1] is not None and ds._shares(1, 2)[1] is None  # the documented exception


def test_training_workers_are_started_once_per_run(data, tmp_path, monkeypatch):
    """Persistent DataLoader workers: two epochs from shards start each loader's workers once."""
    import os

    import pixelseg.training.train as train_mod
    log = tmp_path / "workers.txt"

    def record(worker_id):  # runs in each worker when it starts
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {worker_id}\n")

    monkeypatch.setattr(train_mod, "ignore_stop_signal_in_worker", record)
    root, out = data
    train({"dataset": "shards", "data_root": str(out), "image_size": 16, "batch_size": 4, "epochs": 2,
           "weights": "none", "device": "cpu", "figure_samples": 0, "precision": "fp32", "workers": 2,
           "run_dir": str(tmp_path / "s")})
    starts = [line.split() for line in log.read_text().splitlines()]
    # train and validation loaders, 2 workers each, started in epoch 1 and kept for epoch 2
    assert len(starts) == 4 and len({pid for pid, _ in starts}) == 4
    assert sorted(w for _, w in starts) == ["0", "0", "1", "1"]

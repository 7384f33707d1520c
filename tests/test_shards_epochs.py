"""Streamed epochs equal folder epochs: the same optimiser steps and batch sizes for the same data and flags."""
import pytest
import torch

from pixelseg.checkpoint import load_checkpoint
from pixelseg.data import collate_batch, load_split
from pixelseg.data.base import CacheSpec
from pixelseg.data.shards import write_shards
from pixelseg.data.synthetic import write_folder
from pixelseg.train import train


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

"""`make_loader()`: the one place a DataLoader is built over a split (as timm's `create_loader`).

Training and evaluation, in-memory arrays, file-backed datasets and streamed shards alike: train and
inference both call it, so batching, splitting over ranks and worker settings are decided here.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core.distributed import DistInfo, RankSampler
from ..core.errors import PixelsegError
from .base import collate_batch


def make_loader(
    ds,
    batch_size: int,
    *,
    train: bool = False,
    workers: int = 0,
    dist: DistInfo | None = None,
    seed: int = 0,
    pin_memory: bool = False,
    worker_init_fn=None,
    repeat: np.ndarray | None = None,
):
    """(DataLoader, sampler) over ``ds``.

    ``train``: shuffled by (seed, epoch) - a ``DistributedSampler`` over the ranks, or for streamed shards
    every rank and worker streams its own share with the same number of batches everywhere; the sampler
    is what ``set_epoch`` is called on. Otherwise every sample exactly once, in order, split over the
    ranks without padding (the sampler is None for streamed shards). ``repeat``: per-sample repeat
    factors for training (`repeat_factors`), drawn by `RepeatFactorSampler`.
    """
    dist = dist or DistInfo()
    # Persistent for streamed shards too: they read the epoch (their shuffle seed) from shared memory.
    kw = dict(
        collate_fn=collate_batch,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        worker_init_fn=worker_init_fn,
    )
    if ds.streamed:  # shards (data.protocol.SplitDataset): batches are formed by the stream
        if repeat is not None and train:
            raise PixelsegError("--oversample-rare needs random access to the samples; shards are streamed in order")
        sampler = ds.configure(batch_size, workers, dist.rank, dist.world_size, shuffle=train, even=train, seed=seed)
        return torch.utils.data.DataLoader(ds, batch_size=None, **kw), (sampler if train else None)
    if train and repeat is not None:
        sampler = RepeatFactorSampler(repeat, dist, seed=seed)
    elif train:
        sampler = torch.utils.data.DistributedSampler(
            ds, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed
        )
    else:
        sampler = RankSampler(len(ds), dist)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, **kw), sampler


def repeat_factors(present: np.ndarray, share: float) -> tuple[np.ndarray, np.ndarray]:
    """(per image, per class) repeat factors of repeat-factor sampling (Gupta et al., LVIS, CVPR 2019;
    detectron2's `RepeatFactorTrainingSampler`): class c, found in a share f_c of the images, gets
    r_c = max(1, sqrt(share / f_c)); an image gets the largest r_c of the classes it holds.
    ``present`` is a boolean (images, classes) matrix; a class in no image gets 1."""
    present = np.asarray(present, dtype=bool)
    freq = present.mean(axis=0)
    per_class = np.ones(present.shape[1])
    seen = freq > 0
    per_class[seen] = np.maximum(1.0, np.sqrt(share / freq[seen]))
    per_image = np.where(present, per_class[None, :], 1.0).max(axis=1, initial=1.0)
    return per_image, per_class


class RepeatFactorSampler(torch.utils.data.Sampler):
    """Training order that draws sample i in proportion to its repeat factor, split over ranks.

    Every epoch has the length of the split (so budgets, schedules and progress bars are unchanged):
    systematic resampling along the cumulative factors gives sample i the floor or the ceiling of its
    expected count, then the draw is shuffled by (seed, epoch) and dealt to the ranks as
    `DistributedSampler` deals (padded to a multiple of the world size). detectron2 instead lengthens the
    epoch by stochastic rounding; here an epoch must stay the unit the planner budgets in.
    """

    def __init__(self, factors, dist: DistInfo, seed: int = 0):
        factors = np.asarray(factors, dtype=np.float64)
        if factors.ndim != 1 or len(factors) == 0 or not np.isfinite(factors).all() or (factors <= 0).any():
            raise PixelsegError("repeat factors must be a non-empty vector of positive numbers")
        self.dist, self.seed, self.epoch = dist, seed, 0
        self.num_samples = math.ceil(len(factors) / dist.world_size)
        self.total = self.num_samples * dist.world_size
        self.cum = torch.as_tensor(np.cumsum(factors) / factors.sum() * self.total)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        points = torch.rand(1, generator=g, dtype=torch.float64) + torch.arange(self.total, dtype=torch.float64)
        idx = torch.searchsorted(self.cum, points, right=True).clamp(max=len(self.cum) - 1)
        idx = idx[torch.randperm(self.total, generator=g)]
        return iter(idx[self.dist.rank : self.total : self.dist.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples


__all__ = ["RepeatFactorSampler", "make_loader", "repeat_factors"]

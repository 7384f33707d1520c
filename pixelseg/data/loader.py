"""`make_loader()`: the one place a DataLoader is built over a split (as timm's `create_loader`).

Training and evaluation, in-memory arrays, file-backed datasets and streamed shards alike: train and
inference both call it, so batching, splitting over ranks and worker settings are decided here.
"""

from __future__ import annotations

import torch

from ..core.distributed import DistInfo, RankSampler
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
):
    """(DataLoader, sampler) over ``ds``.

    ``train``: shuffled by (seed, epoch) - a ``DistributedSampler`` over the ranks, or for streamed shards
    every rank and worker streams its own share with the same number of batches everywhere; the sampler
    is what ``set_epoch`` is called on. Otherwise every sample exactly once, in order, split over the
    ranks without padding (the sampler is None for streamed shards).
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
        sampler = ds.configure(batch_size, workers, dist.rank, dist.world_size, shuffle=train, even=train, seed=seed)
        return torch.utils.data.DataLoader(ds, batch_size=None, **kw), (sampler if train else None)
    if train:
        sampler = torch.utils.data.DistributedSampler(
            ds, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed
        )
    else:
        sampler = RankSampler(len(ds), dist)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, **kw), sampler


__all__ = ["make_loader"]

"""torchrun/DDP plumbing without a framework: read the env torchrun sets, pick nccl or gloo."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import PixelsegError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name != "cpu"
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation sharding without padding: rank r gets indices r, r+W, r+2W, ... so every sample is
    scored exactly once (DistributedSampler pads with duplicates, which would bias the metrics)."""

    def __init__(self, n: int, info: DistInfo):
        self.indices = list(range(info.rank, n, info.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def check_batch(batch_size: int, world: int, accumulate: int) -> int:
    """--batch-size is the global batch; return the per-rank micro-batch."""
    if accumulate < 1:
        raise PixelsegError(f"--accumulate {accumulate}: must be >= 1")
    denom = world * accumulate
    if batch_size % denom:
        raise PixelsegError(f"--batch-size {batch_size} is the global batch and must divide by world size "
                            f"{world} × --accumulate {accumulate} = {denom}; try {max(denom, batch_size // denom * denom)}")
    return batch_size // denom

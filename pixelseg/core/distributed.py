"""torchrun/DDP plumbing without a framework: read the env torchrun sets, pick nccl or gloo."""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

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


def _elastic_store(timeout: timedelta):
    """The store of this attempt under torchrun: the agent's TCPStore with a prefix naming the restart.

    torchrun's workers join the process group through the agent's store (TORCHELASTIC_USE_AGENT_STORE),
    and with c10d rendezvous that store outlives a restart (--max-restarts): the restarted workers would
    read the gloo addresses their dead predecessors published there and fail ("connectFullMesh ...
    Connection refused"). A prefix per TORCHELASTIC_RESTART_COUNT keeps the attempts apart."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in os.environ:
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"/pixelseg/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_distributed(device_name: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise single process.
    `timeout_s` (--dist-timeout) bounds every collective: a rank whose peers stopped answering (a lost
    node) fails after it instead of torch's default (30 min for gloo, 10 for nccl)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name != "cpu"
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        kw: dict[str, Any] = {} if timeout_s is None else {"timeout": timedelta(seconds=float(timeout_s))}
        store = _elastic_store(kw.get("timeout", timedelta(minutes=10)))
        if store is not None:
            kw.update(store=store, rank=int(os.environ["RANK"]), world_size=world)
        dist.init_process_group(backend=backend, **kw)
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


# Keys a node may set for itself: they change how fast it runs, not what is trained.
NODE_LOCAL_KEYS = frozenset({"workers", "device", "dist_timeout"})


def check_same_config(cfg: dict, info: DistInfo) -> None:
    """Refuse to train when the processes were started with different configs (a node with other flags
    or another config file would silently train something else, or hang in a collective): every rank
    gathers every rank's config and all stop with the same message naming the differing keys."""
    if not info.enabled:
        return
    mine = {k: repr(v) for k, v in cfg.items() if k not in NODE_LOCAL_KEYS}
    everyone: list = [None] * info.world_size
    dist.all_gather_object(everyone, mine)
    diffs: list[tuple[str, object, int, object]] = []  # (key, rank 0's value, rank, its value)
    for rank, other in enumerate(everyone[1:], 1):
        for key in sorted(set(other) | set(everyone[0])):
            if other.get(key) != everyone[0].get(key) and key not in {d[0] for d in diffs}:
                diffs.append((key, everyone[0].get(key), rank, other.get(key)))
    if diffs:
        said = "; ".join(f"{k}: rank 0 {a}, rank {r} {b}" for k, a, r, b in diffs[:6])
        raise PixelsegError(
            f"the processes of this run were started with different configs ({said}); start "
            "every node with the same flags, config file and --data-root"
        )


class RankSampler(torch.utils.data.Sampler):
    """Evaluation split over ranks without padding: rank r gets indices r, r+W, r+2W, ... so every sample is
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
        raise PixelsegError(
            f"--batch-size {batch_size} is the global batch and must divide by world size "
            f"{world} × --accumulate {accumulate} = {denom}; "
            f"try {max(denom, batch_size // denom * denom)}"
        )
    return batch_size // denom


# Exit status of a run stopped by SIGTERM: 128 + 15, what a shell reports for a process the signal ended,
# and in the retryable range (128-255) of the Kubeflow PyTorchJob `restartPolicy: ExitCode`.
PREEMPTED_EXIT_CODE = 143


class StopSignal:
    """SIGTERM (cluster preemption: Slurm, Kubernetes) asks the run to stop at the next optimiser step.

    The handler only sets a flag: the training loop polls ``agreed()`` once per step, which under DDP
    sums the flag over ranks, so every rank stops at the same step even when only one got the signal.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, info: DistInfo) -> bool:
        if not info.enabled:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        # Only the sum decides: it is what every other rank sees. The handler may set `requested` while the
        # collective runs; counting that here would stop this rank one step before the others, which then
        # wait for it in the next step's collectives until the timeout. That signal counts at the next step.
        agreed = bool(flag.item() > 0)
        self.requested = self.requested or agreed
        return agreed


def ignore_stop_signal_in_worker(_worker_id: int) -> None:
    """DataLoader worker_init_fn: Slurm signals every process of the job, and a worker ended by SIGTERM
    would abort the main process before it can checkpoint; the main process stops the workers itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

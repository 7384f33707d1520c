"""The training loop: one training step, one epoch of training, evaluation over a loader, PreciseBN
(torchvision references' engine.py; named loop here because `serving.Engine` is a loaded model).

The functions take the model and a ``RunContext`` (device, autocast dtype, memory layout,
distributed info) instead of those four as loose arguments, and the dataset's ``DatasetInfo``
instead of ``num_classes`` / ``ignore_index`` scalars. ``train.train`` orchestrates them;
``inference.evaluate`` (the `pixelseg evaluate` command) runs ``evaluate_loader`` too.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field

import torch

from ..core.distributed import DistInfo, all_reduce_sum
from ..core.metrics import ConfusionMatrix, class_ids
from ..core.progress import progress as progress_bar
from ..core.runtime import autocast, to_model_input
from ..data import DatasetInfo


@dataclass(frozen=True)
class RunContext:
    """Where and how the model runs."""

    device: torch.device
    amp_dtype: torch.dtype | None = None  # autocast dtype; None = plain fp32
    channels_last: bool = True
    dist: DistInfo = field(default_factory=DistInfo)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        return to_model_input(images, self.device, self.channels_last)

    def to_target(self, masks: torch.Tensor) -> torch.Tensor:
        return masks.to(self.device, non_blocking=True)


def set_train_mode(model: torch.nn.Module, freeze_bn: bool = False) -> None:
    """Training mode; with ``freeze_bn`` every BatchNorm stays on its running statistics."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def _flip_batch(images: torch.Tensor, masks: torch.Tensor, gen: torch.Generator):
    """The tutorial's augmentation: the same random horizontal flip for image and mask, per sample. On
    the whole batch inside the loop, so the default recipe costs no per-sample Python in the loader."""
    flip = torch.rand(images.shape[0], generator=gen) < 0.5
    if flip.any():
        images, masks = images.clone(), masks.clone()
        images[flip] = images[flip].flip(-1)
        masks[flip] = masks[flip].flip(-1)
    return images, masks


def _batches(loader) -> int:
    """Batches the loader yields: len() of a loader over streamed shards counts samples, not batches."""
    ds = getattr(loader, "dataset", None)
    if ds is not None and getattr(ds, "streamed", False):
        return ds.num_batches()
    return len(loader)  # any loader: benchmarks' too


@dataclass
class EpochResult:
    loss: float  # mean training loss over the epoch's samples (all ranks)
    confusion: ConfusionMatrix  # training predictions vs masks (all ranks)
    images: int  # samples seen (all ranks)
    train_time: float
    data_time: float


def train_step(
    forward,
    criterion,
    optimizer,
    scaler,
    x: torch.Tensor,
    y: torch.Tensor,
    ctx: RunContext,
    *,
    accumulate: int = 1,
    optimizer_step: bool = True,
    sync=None,
):
    """One training step on a batch already on the device: autocast forward -> fp32 loss -> (GradScaler-)
    scaled backward of loss / ``accumulate``, then, with ``optimizer_step``, the optimiser step and
    zeroed gradients. ``sync``: a context for the backward (DDP's ``no_sync`` between accumulated
    micro-batches). Returns (logits, loss). The step ``train_one_epoch`` runs and the benchmarks measure."""
    with sync or contextlib.nullcontext():
        with ctx.autocast():
            logits = forward(x)
        loss = criterion(logits.float(), y)
        scaler.scale(loss / accumulate).backward()
    if optimizer_step:
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return logits, loss


def train_one_epoch(
    model,
    criterion,
    optimizer,
    scheduler,
    scaler,
    loader,
    ctx: RunContext,
    info: DatasetInfo,
    *,
    epoch: int,
    epochs: int,
    accumulate: int = 1,
    steps_done: int = 0,
    flip_seed: int | None = None,
    forward=None,
    on_step=None,
) -> EpochResult:
    """One pass over ``loader`` with gradient accumulation.

    ``model`` is what trains (the DDP wrapper under torchrun, for ``no_sync``); ``forward`` is what
    runs the batch (a compiled ``model``; default ``model``). ``steps_done`` optimiser steps are
    skipped (mid-epoch resume: the sampler order depends only on (seed, epoch)). ``flip_seed`` turns
    on the in-loop horizontal flip; ``on_step(step_in_epoch)`` runs after each optimiser step, and a
    true return value ends the epoch there (``--iterations`` reached).
    """
    forward = forward or model
    micro_per_epoch = _batches(loader)
    steps_per_epoch = -(-micro_per_epoch // accumulate)
    t_epoch, data_time, seen = time.time(), 0.0, 0
    loss_sum = torch.zeros(2, dtype=torch.float64)
    confusion = ConfusionMatrix(info.num_classes, info.ignore_index, device=ctx.device)
    it = iter(loader)
    step_in_epoch = 0
    bar = progress_bar(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", unit="step", enabled=ctx.is_main)
    if steps_done:
        for _ in range(min(steps_done * accumulate, micro_per_epoch)):
            next(it)
        step_in_epoch = steps_done
        bar.update(steps_done)
    micro = step_in_epoch * accumulate
    t_data = time.time()
    stop = False
    for images, masks in it:
        data_time += time.time() - t_data
        if flip_seed is not None:
            gen = torch.Generator().manual_seed(hash((flip_seed, epoch, micro, ctx.dist.rank)) % 2**63)
            images, masks = _flip_batch(images, masks, gen)
        x, y = ctx.to_input(images), ctx.to_target(masks)
        last_micro = (micro + 1) % accumulate == 0 or micro + 1 == micro_per_epoch
        sync = model.no_sync() if ctx.dist.enabled and not last_micro else contextlib.nullcontext()
        step = functools.partial(train_step, accumulate=accumulate, optimizer_step=last_micro, sync=sync)
        logits, loss = step(forward, criterion, optimizer, scaler, x, y, ctx)
        if last_micro:
            scheduler.step()
            step_in_epoch += 1
            bar.update(1)
            if on_step is not None:
                stop = bool(on_step(step_in_epoch))
        loss_sum += torch.tensor([loss.item() * x.shape[0], x.shape[0]], dtype=torch.float64)
        confusion.update(class_ids(logits.detach()), y)
        seen += x.shape[0]
        micro += 1
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)  # redraw on tqdm's interval (log files)
        if stop:
            break
        t_data = time.time()
    bar.close()
    return _epoch_result(confusion, loss_sum, seen, ctx, time.time() - t_epoch, data_time)


def _epoch_result(
    confusion, loss_sum: torch.Tensor, seen: int, ctx: RunContext, train_time: float, data_time: float
) -> EpochResult:
    """The epoch's loss, confusion and image count summed over the ranks."""
    all_reduce_sum(confusion.mat, ctx.dist)
    loss_sum = all_reduce_sum(loss_sum.to(ctx.device), ctx.dist).cpu()
    seen_t = all_reduce_sum(torch.tensor([seen], dtype=torch.float64, device=ctx.device), ctx.dist)
    return EpochResult(
        loss=float(loss_sum[0] / loss_sum[1].clamp(min=1)),
        confusion=confusion,
        images=int(seen_t.item()),
        train_time=train_time,
        data_time=data_time,
    )


@torch.no_grad()
def evaluate_loader(
    model,
    loader,
    ctx: RunContext,
    info: DatasetInfo,
    criterion=None,
    progress: bool = True,
    desc: str = "val",
    on_batch=None,
) -> tuple[ConfusionMatrix, float]:
    """Confusion matrix (and mean per-pixel loss, NaN without ``criterion``) over the whole loader,
    summed across ranks before scoring. ``on_batch(x, y, logits)`` sees each batch on the device with its
    fp32 logits (the uncertainty report of `pixelseg evaluate --uncertainty` is gathered so)."""
    model.eval()
    cm = ConfusionMatrix(info.num_classes, info.ignore_index, device=ctx.device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # (sum of per-pixel losses, pixels)
    for images, masks in progress_bar(
        loader, total=_batches(loader), desc=desc, unit="batch", enabled=progress and ctx.is_main
    ):
        x, y = ctx.to_input(images), ctx.to_target(masks)
        with ctx.autocast():
            logits = model(x)
        logits = logits.float()
        if on_batch is not None:
            on_batch(x, y, logits)
        if criterion is not None:
            valid = (y != info.ignore_index).sum()
            loss_sum[0] += criterion(logits, y).double() * valid
            loss_sum[1] += valid
        cm.update(class_ids(logits), y)
    all_reduce_sum(cm.mat, ctx.dist)
    all_reduce_sum(loss_sum, ctx.dist)
    mean_loss = float(loss_sum[0] / loss_sum[1].clamp(min=1)) if criterion is not None else float("nan")
    return cm, mean_loss


@torch.no_grad()
def precise_bn(model, loader, n_batches: int, ctx: RunContext) -> None:
    """Recompute BatchNorm running statistics for the current weights (PreciseBN, as in pycls/Detectron2).

    With few steps per epoch (the tutorial's pets run has 5) the exponential running averages lag far
    behind weights that Adam moves quickly, and eval-mode predictions collapse to one class while
    train-mode ones are fine. A forward-only pass over a few training batches fixes that for a fraction
    of an epoch's cost. Call it with the model in its training configuration: BatchNorm layers kept in
    eval mode (frozen encoder, --freeze-bn) are left untouched.
    """
    bns = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    for i, (images, _) in enumerate(loader):
        if i >= n_batches:
            break
        with ctx.autocast():
            model(ctx.to_input(images))
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
        if ctx.dist.enabled:  # every rank evaluates with the same statistics
            for buf in (m.running_mean, m.running_var):
                assert buf is not None  # track_running_stats (filtered above) keeps both
                all_reduce_sum(buf, ctx.dist).div_(ctx.dist.world_size)


@torch.no_grad()
def predict_batch(model, images: torch.Tensor, ctx: RunContext) -> torch.Tensor:
    """Class ids (N×H×W, on CPU) for a uint8 batch, in eval mode."""
    model.eval()
    with ctx.autocast():
        return class_ids(model(ctx.to_input(images)).float()).cpu()


__all__ = [
    "EpochResult",
    "RunContext",
    "evaluate_loader",
    "precise_bn",
    "predict_batch",
    "set_train_mode",
    "train_one_epoch",
    "train_step",
]

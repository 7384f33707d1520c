"""Optimisers and learning-rate schedules.

`build_optimizer` splits the trainable parameters into two groups: weights of convs/linears get weight
decay; biases and normalisation parameters (every tensor with ndim <= 1) do not, because decaying a
BatchNorm scale or a bias only fights the normalisation and does not regularise (the convention of timm's
`param_groups_weight_decay` and the DeepLab/ResNet training recipes). Frozen parameters
(``requires_grad=False``, e.g. a frozen encoder) are left out.

`build_scheduler` returns a `LambdaLR` stepped once per optimiser step, so its state_dict (``last_epoch``)
checkpoints and resumes with the optimiser's. Its lr function is an `LrSchedule` object, whose attributes
LambdaLR saves in that state_dict: `set_total_steps` can re-span the schedule mid-run (--time-budget
re-estimates how many steps fit) and --resume restores the span the run had. Schedules: ``constant``, ``poly`` (DeepLab:
``(1 − t/T)^power``) and ``cosine``, each with an optional linear warm-up.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from ..core.errors import PixelsegError

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "LrSchedule",
    "build_optimizer",
    "build_scheduler",
    "lr_factor",
    "param_groups",
    "set_total_steps",
]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("constant", "poly", "cosine")


def param_groups(
    model: torch.nn.Module, weight_decay: float, encoder_lr_mult: float = 1.0, lr: float | None = None
) -> list[dict]:
    """Trainable parameters as decay / no-decay groups, empty groups dropped. With ``encoder_lr_mult`` != 1
    the encoder's parameters get groups of their own at ``lr * encoder_lr_mult`` (discriminative fine-tuning:
    a pretrained encoder moves slower than the new decoder, ULMFiT / MMSegmentation's ``lr_mult``)."""
    encoder = getattr(model, "encoder", None)
    in_encoder = {id(p) for p in encoder.parameters()} if encoder_lr_mult != 1.0 and encoder is not None else set()
    buckets: dict[tuple[bool, bool], list] = {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        buckets.setdefault((id(param) in in_encoder, param.ndim <= 1), []).append(param)
    groups = []
    for is_encoder in (False, True):
        for no_decay in (False, True):
            params = buckets.get((is_encoder, no_decay))
            if not params:
                continue
            group = {"params": params, "weight_decay": 0.0 if no_decay else weight_decay}
            if is_encoder and lr is not None:
                group["lr"] = lr * encoder_lr_mult
            groups.append(group)
    return groups


def build_optimizer(
    model: torch.nn.Module,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    encoder_lr_mult: float = 1.0,
) -> Optimizer:
    """``adam`` (L2-coupled decay), ``adamw`` (decoupled decay) or ``sgd`` (momentum, no Nesterov)."""
    name = name.lower() if isinstance(name, str) else name
    if name not in OPTIMIZERS:
        raise PixelsegError(f"unknown optimizer {name!r} for --optimizer; choose one of: {', '.join(OPTIMIZERS)}")
    if not lr > 0:
        raise PixelsegError(f"--lr must be positive, got {lr}")
    if weight_decay < 0:
        raise PixelsegError(f"--weight-decay must be >= 0, got {weight_decay}")
    if not encoder_lr_mult > 0:
        raise PixelsegError(f"--encoder-lr-mult must be positive, got {encoder_lr_mult}")
    groups = param_groups(model, weight_decay, encoder_lr_mult, lr)
    if not groups:
        raise PixelsegError("the model has no trainable parameters; unfreeze at least part of it")
    # On CUDA the per-tensor Adam update was a large share of the tutorial model's step time (torch.profiler
    # on an H200, docs/benchmarks.md, "Numbers behind choices in the code"); the fused kernel does all tensors in
    # one launch.
    fused = all(p.is_cuda for g in groups for p in g["params"])
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, fused=fused or None)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused or None)
    if not 0 <= momentum < 1:
        raise PixelsegError(f"--momentum must be in [0, 1), got {momentum}")
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=False)


def lr_factor(step: int, *, name: str, total_steps: int, warmup_steps: int, power: float, min_lr_ratio: float) -> float:
    """Multiplier of the base lr for the optimiser step with index ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (the first step already moves,
    with lr/warmup_steps, and the last warm-up step reaches the full lr). After it, with
    ``p = (step − warmup_steps) / (total_steps − warmup_steps)`` clamped to [0, 1]:
    constant 1; poly ``m + (1 − m)(1 − p)^power``; cosine ``m + (1 − m)(1 + cos πp)/2``, m = min_lr_ratio.
    The decay spans the steps after warm-up, so it reaches ``m`` exactly after the last step.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    progress = min(max((step - warmup_steps) / (total_steps - warmup_steps), 0.0), 1.0)
    decay = (1.0 - progress) ** power if name == "poly" else 0.5 * (1.0 + math.cos(math.pi * progress))  # else cosine
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_scheduler(
    optimizer: Optimizer,
    name: str,
    total_steps: int,
    warmup_steps: int = 0,
    power: float = 0.9,
    min_lr_ratio: float = 0.0,
) -> LRScheduler:
    """A `LambdaLR` over ``total_steps`` optimiser steps (warm-up included); call ``.step()`` after each
    ``optimizer.step()``. Beyond ``total_steps`` the lr stays at its final value."""
    name = name.lower() if isinstance(name, str) else name
    if name not in SCHEDULERS:
        raise PixelsegError(f"unknown schedule {name!r} for --schedule; choose one of: {', '.join(SCHEDULERS)}")
    if warmup_steps < 0:
        raise PixelsegError(f"warm-up must be >= 0 steps (--warmup-epochs), got {warmup_steps}")
    if total_steps <= warmup_steps:
        raise PixelsegError(
            f"total steps ({total_steps}) must exceed the warm-up steps ({warmup_steps}, from --warmup-epochs); "
            "train for more --epochs or shorten the warm-up"
        )
    if not power > 0:
        raise PixelsegError(f"poly power must be positive, got {power}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise PixelsegError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    factor = LrSchedule(name, int(total_steps), int(warmup_steps), float(power), float(min_lr_ratio))
    return LambdaLR(optimizer, lr_lambda=factor)


class LrSchedule:
    """`lr_factor` with its arguments as plain attributes: LambdaLR.state_dict() saves a callable object's
    ``__dict__`` (plain numbers and a name, so checkpoints load with weights_only=True) and load_state_dict()
    restores it, so a re-spanned schedule resumes exactly. A module-level class, not a lambda: it pickles."""

    def __init__(self, name: str, total_steps: int, warmup_steps: int, power: float, min_lr_ratio: float):
        self.name, self.total_steps, self.warmup_steps = name, total_steps, warmup_steps
        self.power, self.min_lr_ratio = power, min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(
            step,
            name=self.name,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            power=self.power,
            min_lr_ratio=self.min_lr_ratio,
        )


def set_total_steps(scheduler: LambdaLR, total_steps: int) -> None:
    """Re-span the schedule over ``total_steps`` optimiser steps (warm-up unchanged) and set the lr of the
    next step to the new curve. A total at or below the warm-up keeps one decay step after it."""
    for fn in scheduler.lr_lambdas:
        assert isinstance(fn, LrSchedule)  # build_scheduler's
        fn.total_steps = max(int(total_steps), fn.warmup_steps + 1)
    step = max(scheduler.last_epoch, 0)
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * fn(step)


def build_ema(model: torch.nn.Module, decay: float):
    """An exponential moving average of `model`'s weights (and BatchNorm buffers), or None when `decay` is 0.

    timm's ModelEmaV3 with its warm-up: the decay grows as 1 - (1 + step)^(-2/3) up to `decay`, so a run of
    a thousand steps averages its last hundred or so (decay ~0.99) instead of dragging its random start
    along, as a fixed 0.999 would. Update it with the step count after each optimiser step."""
    if not decay:
        return None
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=decay, use_warmup=True)
    ema.module.requires_grad_(False)
    return ema

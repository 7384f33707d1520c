"""`pixelseg train`: builds the run from its config and drives the epoch loop (loop.py), top to bottom.

Defaults are the TensorFlow tutorial's recipe (Adam 1e-3, cross-entropy on logits, batch 64,
20 epochs, 128×128, random horizontal flip) on the fast path (channels_last, bf16 autocast where
the hardware has it). Runs under torchrun unchanged; only rank 0 writes. The options live in
config.py, the epoch loop in loop.py.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import functools
import io
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import yaml

from .._version import __version__
from ..core import sizes, viz
from ..core.checkpoint import atomic_save, load_checkpoint, model_checkpoint
from ..core.distributed import (
    PREEMPTED_EXIT_CODE,
    DistInfo,
    StopSignal,
    barrier,
    check_batch,
    check_same_config,
    cleanup,
    ignore_stop_signal_in_worker,
    init_distributed,
)
from ..core.errors import PixelsegError
from ..core.files import atomic_write_text, check_output_dir, make_output_dir
from ..core.logs import logger as log
from ..core.logs import run_log
from ..core.runtime import resolve_precision, seed_everything, select_device, tune_malloc
from ..data import dataset_options, load_split
from ..data.base import CacheSpec
from ..data.loader import make_loader
from ..models import create_model
from ..models.rewrites import optimize_for_training
from . import config
from .budget import Pacer
from .config import TrainConfig
from .loop import RunContext, _batches, evaluate_loader, precise_bn, predict_batch, set_train_mode, train_one_epoch
from .losses import build_loss, class_weights
from .optim import build_ema, build_optimizer, build_scheduler
from .plan import plan_from_options, to_yaml, warn_recipe
from .probe import Machine
from .tracking import open_tracker

if TYPE_CHECKING:
    from ..data.protocol import SplitDataset

    class _Split(SplitDataset, Protocol):
        """What train reads of a split beyond data.protocol.SplitDataset (ArrayDataset, FileDataset, ShardDataset,
        folds.FoldSubset)."""

        transform: Any  # a per-sample transform, set on the training split
        images: Any  # indexable: --in-channels other than 3 take their statistics from them
        masks: Any  # indexable, where not streamed: the epoch figures' samples

        def iter_masks(self) -> Iterator[np.ndarray]: ...


def channel_stats(images) -> dict:
    """Per-channel mean and std of float [0, 1] N x H x W x C images (float64 sums: no drift)."""
    c = images[0].shape[-1]
    total = np.zeros(c)
    sq = np.zeros(c)
    n = 0
    for im in images:  # a stacked array or a list of arrays of different sizes
        flat = np.asarray(im, np.float64).reshape(-1, c)
        total += flat.sum(0)
        sq += (flat**2).sum(0)
        n += flat.shape[0]
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean**2, 0))
    return {"mean": [float(v) for v in mean], "std": [float(max(v, 1e-6)) for v in std]}


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: carries the command that continues it."""

    def __init__(self, run_dir: Path | None):
        super().__init__()
        self.run_dir = run_dir

    def advice(self) -> str:
        if self.run_dir is not None and (self.run_dir / "last.pt").is_file():
            return f"interrupted; continue the run with: pixelseg train --resume {self.run_dir}"
        if self.run_dir is not None:
            return (
                f"interrupted before the first checkpoint of {self.run_dir}; run the same command again "
                "(--checkpoint-every N also saves within epochs)"
            )
        return "interrupted"


class TrainingPreempted(TrainingInterrupted):
    """SIGTERM (a scheduler preempting the job): stopped at a step boundary with last.pt written there.
    The exit status asks the scheduler to requeue (see distributed.PREEMPTED_EXIT_CODE)."""

    exit_code = PREEMPTED_EXIT_CODE

    def advice(self) -> str:
        return (
            f"stopped by SIGTERM (preempted); checkpoint saved; continue the run with: "
            f"pixelseg train --resume {self.run_dir}"
        )


def train(overrides: dict, spent_s: float = 0.0) -> dict:
    """Train from a config dict (CLI flags / YAML); returns the run summary. ``spent_s``: seconds this run
    already used before it started (`train --auto`'s planning), counted against --time-budget and kept in
    summary.json's time_s as ``planning`` (with --folds, by the first fold, which it delays)."""
    from .folds import train_folds, wants_folds

    if wants_folds(overrides):  # --folds K: K runs RUN/fold_I, each through this function (folds.py)
        unpaid = [spent_s]

        def fold_train(opts: dict) -> dict:
            spent, unpaid[0] = unpaid[0], 0.0
            return train(opts, spent)

        return train_folds(overrides, fold_train)
    dist_info = init_distributed(
        overrides.get("device") or "auto",
        config.parse_value("dist_timeout", overrides["dist_timeout"])
        if overrides.get("dist_timeout") is not None
        else None,
    )
    status: dict = {}
    try:
        with StopSignal() as status["stop"]:
            return _train(overrides, dist_info, status, spent_s)
    except TrainingPreempted:
        raise
    except KeyboardInterrupt:
        raise TrainingInterrupted(status.get("run_dir")) from None
    except RuntimeError as exc:
        lost = lost_peers(exc, dist_info, status.get("run_dir"), overrides.get("dist_timeout"))
        if lost is None:
            raise
        raise lost from None
    finally:
        cleanup(dist_info)


# What gloo/nccl/c10d say when a peer process is gone (killed, its node lost) or stopped answering.
_PEER_LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Timed out waiting",
    "timed out",
    "Socket Timeout",
    "Broken pipe",
    "NCCL communicator was aborted",
    "Watchdog caught collective",
)


def lost_peers(exc: BaseException, info: DistInfo, run_dir, timeout_s) -> PixelsegError | None:
    """A collective that failed because another rank is gone, as one line that says what to do; None for
    any other error."""
    text = str(exc)
    if not info.enabled or not any(k in text for k in _PEER_LOST):
        return None
    first = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
    first = first.split("] ", 1)[-1][:160]  # gloo's "[.../pair.cc:545] " source location dropped
    wait = f"--dist-timeout {float(timeout_s):g} s" if timeout_s else "the process group's timeout (--dist-timeout)"
    again = (
        f"restart every node with: pixelseg train --resume {run_dir}"
        if run_dir is not None
        else "run the same command again on every node"
    )
    return PixelsegError(
        f"rank {info.rank}: lost the other processes of this run ({first}); a node died, was "
        f"stopped or did not answer within {wait}; {again} (or let torchrun --max-restarts, or "
        "--resume auto, continue it)"
    )


@dataclass
class TrainState:
    """What a checkpoint restores, besides the weights and optimiser."""

    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # optimiser steps done inside `epoch` (0 at epoch end)
    global_step: int = 0
    history: list = field(default_factory=list)
    best_miou: float = -1.0
    time_used_s: float = 0.0  # wall time of the run so far, all sessions (--time-budget)
    timing: dict = field(default_factory=dict)  # where it went: setup, train, validation, ...


def _train(overrides: dict, dist_info: DistInfo, status: dict | None = None, spent_s: float = 0.0) -> dict:
    t_start = time.time()
    stop = (status or {}).get("stop") or StopSignal()  # SIGTERM handler installed by train()
    cfg, ckpt, run_dir = _resolve_run(overrides)
    check_same_config(cfg.to_dict(), dist_info)  # before anything collective: a node with other flags is refused
    if cfg.time_budget and dist_info.enabled:  # ranks would time, and so stop, differently
        raise PixelsegError("--time-budget runs in one process for now; under torchrun give --epochs or --iterations")
    device = select_device(cfg.device)
    ctx = RunContext(device, resolve_precision(cfg.precision, device), cfg.channels_last, dist_info)
    per_rank_batch = check_batch(cfg.batch_size, dist_info.world_size, cfg.accumulate)
    seed_everything(cfg.seed, cfg.deterministic)
    data = _build_data(cfg, ctx, per_rank_batch)
    model_without_ddp, model, forward, model_notes = _build_model(cfg, data.info, ctx, _input_norm(cfg, data, ckpt))
    _open_run_dir(run_dir, ctx, resuming=ckpt is not None)  # only now: bad config, data or model leave nothing
    if status is not None:
        status["run_dir"] = run_dir
    with run_log(run_dir, ctx.is_main):
        for note in data.notes + model_notes:
            log.info(note)
        loop = _make_loop(
            cfg, ckpt, run_dir, ctx, data, model, model_without_ddp, forward, per_rank_batch, stop, spent_s, t_start
        )
        try:
            epoch = loop.run()
        finally:
            loop.tracker.close()
        if ctx.is_main:  # last.pt records the time of the whole run, validation and figures included
            loop.save("last.pt", epoch, 0)
        return _finish(run_dir, cfg, loop.state, data, dist_info, t_start, loop.pacer, epoch)


def _make_loop(
    cfg: TrainConfig,
    ckpt: dict | None,
    run_dir: Path,
    ctx: RunContext,
    data: RunData,
    model,
    model_without_ddp,
    forward,
    per_rank_batch: int,
    stop: StopSignal,
    spent_s: float,
    t_start: float,
) -> EpochLoop:
    """Loss, optimiser, pacer, schedule and scaler (restored from `ckpt` on --resume), config.yaml and the run
    header written: the epoch loop ready to run."""
    criterion = _build_criterion(cfg, data, ctx)
    optimizer = build_optimizer(
        model_without_ddp, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, cfg.encoder_lr_mult
    )
    steps_per_epoch = math.ceil(data.micro_per_epoch / cfg.accumulate)
    state = TrainState() if ckpt is None else _train_state(ckpt)
    if ckpt is None and spent_s > 0:  # train --auto's planning: part of the run's time (and budget)
        state.time_used_s, state.timing = spent_s, {"planning": spent_s}
    pacer = Pacer(cfg, steps_per_epoch, len(data.val_ds), per_rank_batch, state.time_used_s, state.timing, t_start)
    pacer.last_val_epoch = state.history[-1]["epoch"] if state.history else 0
    scheduler = build_scheduler(
        optimizer, cfg.schedule, total_steps=pacer.total, warmup_steps=int(cfg.warmup_epochs * steps_per_epoch)
    )
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.amp_dtype == torch.float16)
    ema = build_ema(model_without_ddp, cfg.ema)
    if ckpt is not None:
        _restore(ckpt, model_without_ddp, optimizer, scheduler, scaler, ema)
        pacer.resumed(scheduler, state, run_dir)
        why = ckpt.get("_resumed_because")
        log.info(
            f"resumed {run_dir} at epoch {state.epoch + 1}, step {state.step_in_epoch} of {steps_per_epoch}"
            + (f" ({why}: continued from its last.pt by itself)" if why else "")
        )
    if ctx.is_main:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        _log_header(cfg, model_without_ddp, data, ctx, per_rank_batch, steps_per_epoch)
        if ema is not None:
            log.info(f"weights averaged (--ema {cfg.ema:g}, warmed up): validation, best.pt and figures use it")
        warn_recipe(cfg, data, steps_per_epoch)  # recipes that cannot work (1 step per epoch, ...)
    tracker = open_tracker(cfg.logger if ctx.is_main else "none", run_dir, cfg.to_dict())
    pacer.add("setup", time.time() - t_start)  # data decode and cache, model build
    parts = (model, model_without_ddp, forward, criterion, optimizer, scheduler, scaler)
    return EpochLoop(cfg, ctx, data, *parts, run_dir, steps_per_epoch, state, pacer, stop, tracker, ema)


@dataclass
class EpochLoop:
    """One run's epoch loop and everything it works with: the config, the data, the model and what trains it,
    the state a checkpoint restores, the pacer (steps, budget, validations), SIGTERM, saving and the tracker."""

    cfg: TrainConfig
    ctx: RunContext
    data: RunData
    model: torch.nn.Module  # DDP-wrapped under torchrun
    model_without_ddp: torch.nn.Module
    forward: Callable
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    run_dir: Path
    steps_per_epoch: int
    state: TrainState
    pacer: Pacer
    stop: StopSignal
    tracker: Any
    ema: Any = None  # timm ModelEmaV3 with --ema: what validation, best.pt and the figures use

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights validation scores: the moving average with --ema, else the trained model."""
        return self.ema.module if self.ema is not None else self.model_without_ddp

    def save(self, name: str, epoch: int, step_in_epoch: int) -> None:
        """best.pt (the validated model: the average with --ema) or last.pt (everything --resume needs, the
        average included), with the time used so far."""
        t_save = time.time()
        state, pacer = self.state, self.pacer
        state.time_used_s, state.timing = pacer.elapsed(), pacer.timing
        best = name == "best.pt"
        parts = (self.eval_model if best else self.model_without_ddp, self.optimizer, self.scheduler, self.scaler)
        extra = {"ema": self.ema.module.state_dict()} if self.ema is not None and not best else None
        _checkpoint(self.run_dir / name, *parts, self.cfg, self.data.info, epoch, step_in_epoch, state, not best, extra)
        pacer.add("checkpoints", time.time() - t_save)

    def run(self) -> int:
        """Train and validate epoch by epoch until the plan, the budget, early stopping or a SIGTERM ends the
        run; the epoch it ended at."""
        cfg, state, pacer = self.cfg, self.state, self.pacer
        epoch = state.epoch
        while epoch < pacer.planned_epochs:
            self.data.train_sampler.set_epoch(epoch)
            set_train_mode(self.model, cfg.freeze_bn)
            t_epoch, steps_before = time.time(), state.global_step
            stats = train_one_epoch(
                self.model,
                self.criterion,
                self.optimizer,
                self.scheduler,
                self.scaler,
                self.data.train_loader,
                self.ctx,
                self.data.info,
                epoch=epoch,
                epochs=pacer.planned_epochs,
                accumulate=cfg.accumulate,
                steps_done=state.step_in_epoch,
                forward=self.forward,
                on_step=functools.partial(self._on_step, epoch),
                flip_seed=cfg.seed if self.data.flip_in_loop else None,
            )
            pacer.add("train", stats.train_time)
            state.step_in_epoch = 0
            validated = pacer.validation_due(epoch + 1, state.global_step)  # --val-every; the last epoch always
            if validated:
                self._validate(epoch, stats, t_epoch)
            else:
                self._skip_validation(epoch, stats, t_epoch)
            epoch += 1
            pacer.end_of_epoch(
                self.scheduler,
                state.global_step,
                stats.train_time,
                state.global_step - steps_before,
                time.time() - t_epoch,
                validated,
                epoch,
            )
            warning = pacer.cannot_hold_epoch() if epoch == 1 else None
            if warning:
                log.warning(warning)
            if pacer.should_stop(state.global_step, state.history, cfg.early_stop, cfg.early_stop_delta):
                if not validated:  # an estimate moved: the run still ends on a validated epoch
                    self._validate(epoch - 1, stats, t_epoch)
                    pacer.last_val_epoch = epoch
                break
            if epoch < pacer.planned_epochs and self.stop.agreed(self.ctx.dist):  # SIGTERM during validation
                _preempted(None, self.run_dir, self.ctx, epoch, 0, self.steps_per_epoch)
        return epoch

    def _on_step(self, epoch: int, step_in_epoch: int) -> bool:
        """After each optimiser step: count it, write last.pt every --checkpoint-every steps, and stop inside the
        epoch when --iterations or the budget are reached or a SIGTERM arrived (then saved here)."""
        state, ctx, cfg = self.state, self.ctx, self.cfg
        state.global_step += 1
        if self.ema is not None:
            self.ema.update(self.model_without_ddp, step=state.global_step)
        if (
            ctx.is_main
            and cfg.checkpoint_every
            and state.global_step % cfg.checkpoint_every == 0
            and step_in_epoch < self.steps_per_epoch
        ):
            self.save("last.pt", epoch, step_in_epoch)
        stop_now = self.stop.agreed(ctx.dist)  # every rank, every step: a collective under DDP
        done = self.pacer.on_step(self.scheduler, state.global_step, step_in_epoch)
        if stop_now and not done and step_in_epoch < self.steps_per_epoch:  # preempted: save here
            _preempted(self.save, self.run_dir, ctx, epoch, step_in_epoch, self.steps_per_epoch)
        return done

    def _validate(self, epoch: int, stats, t_epoch: float) -> None:
        pacer, ctx, data = self.pacer, self.ctx, self.data
        t_val = time.time()
        if self.cfg.precise_bn:
            if self.ema is not None:  # statistics for the averaged weights, not an average of statistics
                set_train_mode(self.ema.module, self.cfg.freeze_bn)
            precise_bn(self.eval_model, data.train_loader, self.cfg.precise_bn, ctx)
        forward = self.forward if self.ema is None else self.ema.module
        val_cm, val_loss = evaluate_loader(forward, data.val_loader, ctx, data.info, self.criterion)
        pacer.add("validation", time.time() - t_val)
        row = _epoch_row(epoch, stats, val_cm, val_loss, self.optimizer, data.info, time.time() - t_epoch)
        self.state.history.append(row)
        if ctx.is_main:
            t_end, saved = time.time(), pacer.timing.get("checkpoints", 0.0)
            _end_of_epoch(
                row,
                self.state,
                self.save,
                self.run_dir,
                self.cfg,
                self.eval_model,
                data,
                ctx,
                self.tracker,
                pacer.planned_epochs,
            )
            pacer.add("figures_and_logs", time.time() - t_end - (pacer.timing["checkpoints"] - saved))
        barrier(ctx.dist)

    def _skip_validation(self, epoch: int, stats, t_epoch: float) -> None:
        """An epoch --val-every leaves unvalidated: last.pt and one log line."""
        if self.ctx.is_main:
            self.save("last.pt", epoch + 1, 0)
            log.info(
                f"epoch {epoch + 1}/{self.pacer.planned_epochs}: train loss {stats.loss:.4f} | "
                f"{stats.images / stats.train_time:.1f} img/s | {time.time() - t_epoch:.1f}s | "
                f"not validated (every {self.pacer.val_every()} epochs)"
            )
        barrier(self.ctx.dist)


def _preempted(save, run_dir: Path, ctx: RunContext, epoch: int, step_in_epoch: int, steps_per_epoch: int):
    """Every rank agreed to stop (SIGTERM): rank 0 writes last.pt at this step (atomically, as always),
    all ranks wait for it, then the run ends with the requeue exit status."""
    if save is not None and ctx.is_main:
        save("last.pt", epoch, step_in_epoch)
    barrier(ctx.dist)
    log.warning(
        f"SIGTERM: stopped at epoch {epoch + 1}, step {step_in_epoch} of {steps_per_epoch}; last.pt saved; "
        f"continue with: pixelseg train --resume {run_dir} (exit status {PREEMPTED_EXIT_CODE}: requeue)"
    )
    raise TrainingPreempted(run_dir)


# ---- the steps of a run, in the order train() calls them ---------------------------------------------
def restart_count() -> int:
    """How often torchrun has restarted this run's workers (--max-restarts): 0 on the first start."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def _auto_resume(overrides: dict) -> tuple[dict, str | None]:
    """`--resume auto` (resume --run-dir when it holds last.pt, else start it), and a torchrun restart
    (TORCHELASTIC_RESTART_COUNT > 0: the workers run their first command line again) continuing the run
    in --run-dir from its last.pt, as --resume does. Returns the overrides to use and why they resume."""
    restarts = restart_count()
    auto = str(overrides.get("resume") or "") == "auto"
    if not auto and (restarts == 0 or overrides.get("resume")):
        return overrides, None
    given = {k: v for k, v in overrides.items() if k != "resume"}
    if not given.get("run_dir"):
        if auto:
            raise PixelsegError("--resume auto needs --run-dir: the run to continue when it holds last.pt")
        log.warning(
            f"torchrun restart {restarts} without --run-dir: a new run starts; give --run-dir so that a "
            "restart continues the run"
        )
        return given, None
    run_dir = Path(given["run_dir"])
    if not (run_dir / "last.pt").is_file():
        return given, None  # nothing saved yet: start (again) from the beginning
    cfg = config.resolve_config(given).to_dict()
    recorded = load_checkpoint(run_dir / "last.pt").get("config", {})
    fixed = [
        k
        for k in given
        if k not in (*config.RESUMABLE, "run_dir", "resume")
        and k in recorded
        and repr(config.parse_value(k, recorded[k], "last.pt config")) != repr(cfg[k])
    ]
    if fixed:
        said = ", ".join(f"{k}: run {recorded[k]!r}, given {cfg[k]!r}" for k in fixed[:6])
        raise PixelsegError(
            f"--run-dir {run_dir} holds a run started with other options ({said}); continue it with "
            f"the same ones (only {', '.join(config.RESUMABLE)} may change) or choose another "
            "--run-dir"
        )
    why = f"torchrun restart {restarts}" if restarts else "--resume auto"
    return {**{k: v for k, v in given.items() if k in config.RESUMABLE}, "resume": str(run_dir)}, why


def _resolve_run(overrides: dict) -> tuple[TrainConfig, dict | None, Path]:
    """(config, checkpoint to resume or None, run directory); nothing is created here."""
    overrides, why = _auto_resume(overrides)
    if overrides.get("resume"):
        run_dir = Path(overrides["resume"])
        last = run_dir / "last.pt"
        if not last.is_file():
            raise PixelsegError(f"--resume {run_dir}: no last.pt there; nothing to resume")
        ckpt = load_checkpoint(last)
        if "optimizer" not in ckpt:
            raise PixelsegError(
                f"{last}: holds only model weights (like best.pt), not the optimiser state that "
                "--resume needs; start a new run with --weights or copy back the run's own last.pt"
            )
        cfg = config.resumed_config(ckpt["config"], overrides, run_dir, f"{last} config")
        if why:
            ckpt["_resumed_because"] = why
        return cfg, ckpt, run_dir
    cfg = config.resolve_config(overrides)
    run_dir = check_output_dir(cfg.run_dir, "--run-dir")
    if (run_dir / "last.pt").exists():
        raise PixelsegError(
            f"--run-dir {run_dir} already holds a run; continue it with --resume {run_dir} or choose another --run-dir"
        )
    return cfg, None, run_dir


@dataclass
class RunData:
    train_ds: _Split
    val_ds: _Split
    train_sampler: torch.utils.data.DistributedSampler
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    flip_in_loop: bool
    full_res: bool  # training samples are crops of the (cached) source resolution
    workers: int  # training DataLoader workers
    figure_idx: list = field(default_factory=list)  # validation samples shown in the epoch figures
    micro_per_epoch: int = 0  # training batches per rank per epoch (streamed shards: from their index)
    pixel_counts: np.ndarray | None = None  # (images, classes) of the training masks, where something needs them
    notes: list[str] = field(default_factory=list)  # logged once the run's log file is open

    @property
    def info(self):
        return self.train_ds.info


def _build_data(cfg: TrainConfig, ctx: RunContext, per_rank_batch: int) -> RunData:
    size, mode = cfg.image_size, cfg.cache
    # Random crops are taken from the source resolution (optionally capped), so --image-size is the crop;
    # without them every sample is cached at --image-size and batches are whole-array reads.
    full_res = bool(cfg.crop or cfg.cache_max_side)
    channels = cfg.in_channels
    train_spec, val_spec = CacheSpec(mode, full_res, cfg.cache_max_side), CacheSpec(mode)

    def load(split: str, spec: CacheSpec):
        return load_split(
            cfg.dataset,
            cfg.data_root,
            split,
            size,
            cfg.limit,
            spec,
            channels=channels,
            **dataset_options(cfg.to_dict()),
        )

    train_ds: _Split
    val_ds: _Split
    if cfg.fold is not None:  # one fold of --folds K: the other folds train, this one validates
        from .folds import fold_datasets

        train_ds, val_ds = fold_datasets(cfg, load, train_spec, val_spec)
    else:
        assert cfg.train_split is not None and cfg.val_split is not None  # resolve_config names them
        train_ds, val_ds = load(cfg.train_split, train_spec), load(cfg.val_split, val_spec)
    flip_in_loop = _set_train_transform(cfg, train_ds, size)
    counts = _pixel_counts(train_ds) if cfg.oversample_rare or cfg.class_weighting != "none" else None
    dist_info = ctx.dist
    # data.protocol.SplitDataset: every split answers these, whichever class holds it
    workers = resolve_workers(cfg.workers, train_ds.transform is not None or train_ds.reads_files)
    val_workers = resolve_workers(cfg.workers, val_ds.reads_files)
    for ds, n in ((train_ds, workers), (val_ds, val_workers)):
        if n > 0:  # files are read in the workers: they report skips
            ds.open_skip_channel()
    loader = functools.partial(
        make_loader, dist=dist_info, pin_memory=ctx.device.type == "cuda", worker_init_fn=ignore_stop_signal_in_worker
    )
    repeat, notes = _repeat_factors(cfg, counts, train_ds.info) if cfg.oversample_rare else (None, [])
    train_loader, train_sampler = loader(
        train_ds, per_rank_batch, train=True, workers=workers, seed=cfg.seed, repeat=repeat
    )
    val_loader, _ = loader(val_ds, max(per_rank_batch, 16), workers=val_workers)  # each sample once
    # Spread over the split and its classes (the first images are often one breed or consecutive frames);
    # streamed shards have no random access: their first samples.
    if not cfg.figure_samples:
        figure_idx = []
    elif not val_ds.streamed:
        figure_idx = viz.pick_samples(val_ds.masks, cfg.figure_samples, val_ds.info.num_classes)
    else:
        figure_idx = list(range(min(cfg.figure_samples, len(val_ds))))
    micro_per_epoch = _batches(train_loader)  # streamed shards: from their index
    return RunData(
        train_ds,
        val_ds,
        train_sampler,
        train_loader,
        val_loader,
        flip_in_loop,
        full_res,
        workers,
        figure_idx,
        micro_per_epoch,
        counts,
        notes,
    )


def _set_train_transform(cfg: TrainConfig, train_ds, size) -> bool:
    """Give the training split its augmentation; True where the flip is left to the loop instead: the
    tutorial's flip runs on the whole batch there (no per-sample Python), anything richer goes through
    the per-sample torchvision.transforms.v2 pipeline."""
    if not (cfg.scale_range or cfg.crop or cfg.vflip or cfg.color_jitter or train_ds.full_res):
        return cfg.hflip
    from ..data.augment import build_train_transform

    train_ds.transform = build_train_transform(
        sizes.size_hw(size),
        scale=tuple(cfg.scale_range) if cfg.scale_range else None,
        crop=cfg.crop,
        hflip=cfg.hflip,
        vflip=cfg.vflip,
        color_jitter=cfg.color_jitter,
        ignore_index=train_ds.info.ignore_index,
    )
    return False


def _pixel_counts(train_ds) -> np.ndarray:
    """(images, classes) pixel counts of the training masks: class weights and oversampling read them."""
    n = train_ds.info.num_classes
    return np.stack([np.bincount(m.ravel(), minlength=256)[:n] for m in train_ds.iter_masks()])


def _repeat_factors(cfg: TrainConfig, counts, info) -> tuple[np.ndarray, list[str]]:
    from ..data.loader import repeat_factors

    present = counts > 0  # a class in nearly every image (a background) gets factor 1: it never makes one rare
    factors, per_class = repeat_factors(present, cfg.oversample_rare)
    boosted = [
        f"{name} in {present[:, c].sum()} images x{per_class[c]:.2f}"
        for c, name in enumerate(info.class_names)
        if per_class[c] > 1.005
    ]
    note = f"oversampling rare classes (--oversample-rare {cfg.oversample_rare:g}): " + (
        ", ".join(boosted) if boosted else "no class is that rare; every image once per epoch"
    )
    return factors, [note]


def resolve_workers(workers, per_sample_work: bool) -> int:
    """--workers auto: none when batches are whole-array reads (a worker would only add a copy), else one
    per core this process may use (cores divided among torchrun's local ranks), at most 8."""
    if workers != "auto":
        return int(workers)
    if not per_sample_work:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


def _input_norm(cfg: TrainConfig, data: RunData, ckpt: dict | None) -> dict:
    """Per-channel mean/std for inputs other than RGB: no encoder has statistics for these bands, so they
    come from the training split and live in the model config (and so in every checkpoint, export and
    prediction); a resumed run keeps its own."""
    if ckpt is not None and "mean" in ckpt.get("model_config", {}):
        return {k: ckpt["model_config"][k] for k in ("mean", "std")}
    if cfg.in_channels == 3:
        return {}
    return channel_stats(data.train_ds.images)


def _build_model(cfg: TrainConfig, info, ctx: RunContext, norm: dict | None = None):
    """(model_without_ddp, model (DDP-wrapped under torchrun), forward (compiled with --compile), log notes)."""
    notes = []
    arch_options: dict[str, Any] = {} if cfg.output_stride is None else {"output_stride": cfg.output_stride}
    model = create_model(
        cfg.model,
        backbone=cfg.backbone,
        num_classes=info.num_classes,
        weights=cfg.weights,
        in_channels=cfg.in_channels,
        **(norm or {}),
        **arch_options,
    )
    if norm and cfg.in_channels != 3:
        notes.append(
            "input normalisation from the training split: mean "
            + ", ".join(f"{v:.4f}" for v in norm["mean"])
            + " | std "
            + ", ".join(f"{v:.4f}" for v in norm["std"])
        )
    freeze = cfg.freeze_encoder  # "auto", True or False (config.parse_tristate)
    if freeze == "auto":
        freeze = bool(model.pretrained)
        if not model.pretrained:
            notes.append(
                "encoder: random init (no pretrained weights), so it is trained, not frozen "
                "(freezing a random encoder is pointless; pass --freeze-encoder yes to force it)"
            )
    model.set_encoder_frozen(bool(freeze))
    if cfg.freeze_encoder_bn and not freeze:
        model.encoder_bn_frozen = True
        model.train(model.training)
    if not freeze and model.pretrained and (cfg.encoder_lr_mult != 1.0 or cfg.freeze_encoder_bn):
        notes.append(
            f"pretrained encoder trained at {cfg.encoder_lr_mult:g} x lr"
            + (", its BatchNorm on the pretrained statistics" if cfg.freeze_encoder_bn else "")
        )
    model.to(ctx.device)
    if ctx.channels_last:
        model.to(memory_format=torch.channels_last)
    kernel_note = optimize_for_training(model, ctx.device, ctx.amp_dtype)
    if kernel_note != "none":
        notes.append(f"kernels: {kernel_note}")
    notes.append(f"allocator: {tune_malloc()}")
    if cfg.sync_bn:
        if not ctx.dist.enabled:
            raise PixelsegError(
                "--sync-bn needs several processes (launch with torchrun --nproc_per_node=N); "
                "with one process plain BatchNorm is already exact"
            )
        if ctx.device.type != "cuda":
            raise PixelsegError(
                "--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm is GPU-only); on CPU use "
                "--freeze-bn or a larger per-process batch"
            )
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model_without_ddp = model
    wrapped: torch.nn.Module = model
    if ctx.dist.enabled:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    forward = torch.compile(wrapped) if cfg.compile else wrapped
    return model_without_ddp, wrapped, forward, notes


def _open_run_dir(run_dir: Path, ctx: RunContext, resuming: bool = False) -> None:
    if ctx.is_main:
        make_output_dir(run_dir, "--resume" if resuming else "--run-dir")
        (run_dir / "figures").mkdir(exist_ok=True)
        for stale in run_dir.glob(".*.tmp"):  # left by a run killed in the middle of a write
            stale.unlink(missing_ok=True)
    barrier(ctx.dist)


def _build_criterion(cfg: TrainConfig, data: RunData, ctx: RunContext):
    info, weight = data.info, None
    if cfg.class_weighting != "none":
        weight = class_weights(data.pixel_counts, cfg.class_weighting).to(ctx.device)
        log.info(
            f"class weights ({cfg.class_weighting}): "
            + ", ".join(f"{n}={w:.3f}" for n, w in zip(info.class_names, weight.tolist(), strict=True))
        )
    return build_loss(cfg.loss, info.num_classes, ignore_index=info.ignore_index, weight=weight)


def _log_header(cfg, model, data: RunData, ctx: RunContext, per_rank_batch: int, steps_per_epoch: int) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = model.encoder_frozen
    world = ctx.dist.world_size
    log.info(
        f"pixelseg {__version__} | {cfg.model}/{model.backbone} | {n_params / 1e6:.2f}M params "
        f"({n_train / 1e6:.2f}M trainable, encoder {'frozen' if frozen else 'trained'}) | device {ctx.device} | "
        f"precision {ctx.amp_dtype or torch.float32} | channels_last {cfg.channels_last} | world {world}"
    )
    skipped = len(data.train_ds.skipped) + len(data.val_ds.skipped)
    log.info(
        f"data: {data.info.name} train={getattr(data.train_ds, 'split_name', cfg.train_split)} "
        f"({len(data.train_ds)} images) val={getattr(data.val_ds, 'split_name', cfg.val_split)} "
        f"({len(data.val_ds)} images) at "
        f"{'×'.join(map(str, sizes.size_hw(cfg.image_size)))}"
        f"{' (crops of the source resolution)' if data.full_res else ''}; cache {cfg.cache}; DataLoader "
        f"workers {data.workers}; unreadable files skipped: {skipped}"
    )
    log.info(
        f"batch: global {cfg.batch_size} = {per_rank_batch} per rank × {world} ranks × "
        f"{cfg.accumulate} accumulation steps; {steps_per_epoch} optimiser steps per epoch"
    )


def _epoch_row(epoch: int, stats, val_cm, val_loss: float, optimizer, info, epoch_time: float) -> dict:
    scores, train_scores = val_cm.compute(), stats.confusion.compute()
    return {
        "epoch": epoch + 1,
        "train_loss": stats.loss,
        "val_loss": val_loss,
        "train_miou": train_scores["miou"],
        "val_miou": scores["miou"],
        "val_pixel_acc": scores["pixel_acc"],
        "val_mean_class_acc": scores["mean_class_acc"],
        "lr": optimizer.param_groups[0]["lr"],
        "train_images_per_s": stats.images / stats.train_time,
        "data_time_frac": stats.data_time / stats.train_time,
        "epoch_time_s": epoch_time,  # training, PreciseBN and validation
        "val_iou": dict(zip(info.class_names, scores["iou"], strict=True)),
        "val_dice": dict(zip(info.class_names, scores["dice"], strict=True)),
    }


def _end_of_epoch(
    row: dict,
    state: TrainState,
    save,
    run_dir: Path,
    cfg: TrainConfig,
    model,
    data: RunData,
    ctx: RunContext,
    tracker,
    epochs: int,
) -> None:
    """Rank 0: checkpoints, metrics files, curves, the prediction figure, the log line, the tracker."""
    epoch = row["epoch"]
    is_best = row["val_miou"] > state.best_miou
    state.best_miou = max(state.best_miou, row["val_miou"])
    save("last.pt", epoch, 0)
    if is_best:
        save("best.pt", epoch, 0)
    _write_history(run_dir, state.history)
    viz.training_curves(state.history, run_dir / "curves.png")
    figure = run_dir / "figures" / f"epoch_{epoch:03d}.png"
    _epoch_figure(
        model,
        data.val_ds,
        data.figure_idx,
        ctx,
        figure,
        f"epoch {epoch}: val mIoU {row['val_miou']:.3f}",
        cfg.rgb_bands,
    )
    log.info(
        f"epoch {epoch}/{epochs}: train loss {row['train_loss']:.4f} | val loss {row['val_loss']:.4f} | "
        f"val mIoU {row['val_miou']:.4f} | pixel acc {row['val_pixel_acc']:.4f} | "
        f"{row['train_images_per_s']:.1f} img/s | data {100 * row['data_time_frac']:.1f}% | "
        f"{row['epoch_time_s']:.1f}s" + (" | best" if is_best else "")
    )
    tracker.log_epoch(row, epoch)
    if figure.is_file():
        tracker.log_figure("predictions", figure, epoch)


def _skipped_files(data: RunData, dist_info: DistInfo) -> list[str]:
    """Unreadable samples met anywhere: this process, its DataLoader workers, every rank; each once."""
    mine = []
    for ds in (data.train_ds, data.val_ds):
        mine += ds.collect_skipped()
    if dist_info.enabled:
        everyone: list[list[str]] = [[] for _ in range(dist_info.world_size)]  # filled by all_gather_object
        torch.distributed.all_gather_object(everyone, mine)
        mine = [name for part in everyone for name in part]
    return list(dict.fromkeys(mine))


def _finish(
    run_dir: Path,
    cfg: TrainConfig,
    state: TrainState,
    data: RunData,
    dist_info: DistInfo,
    t_start: float,
    pacer: Pacer,
    epochs_done: int | None = None,
) -> dict:
    history = state.history
    skipped = _skipped_files(data, dist_info)
    summary = {
        "run_dir": str(run_dir),
        "epochs": pacer.epoch_cap,
        "best_val_miou": max((h["val_miou"] for h in history), default=float("nan")),
        "final": dict(history[-1]) if history else {},
        "skipped_files": skipped,
        "wall_time_s": time.time() - t_start,
        "world_size": dist_info.world_size,
        **pacer.summary(len(history) if epochs_done is None else epochs_done),
    }
    if dist_info.is_main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
        spent = ", ".join(f"{k} {v:.1f}s" for k, v in summary["time_s"].items())
        log.info(f"stopped after {summary['epochs_done']} epochs: {summary['stop_reason']}; time: {spent}")
        if skipped:
            log.warning(
                f"{len(skipped)} unreadable sample(s) skipped during the run (listed in summary.json): "
                + ", ".join(skipped[:3])
                + (" ..." if len(skipped) > 3 else "")
            )
        log.info(f"done: best val mIoU {summary['best_val_miou']:.4f}; run directory {run_dir}")
    return summary


# ---- checkpoints, files and figures ------------------------------------------------------------------
def _rng_state() -> dict:
    np_state = np.random.get_state(legacy=True)  # the default: the MT19937 tuple
    assert isinstance(np_state, tuple)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoint(
    path,
    model,
    optimizer,
    scheduler,
    scaler,
    cfg,
    info,
    epoch,
    step_in_epoch,
    state: TrainState,
    full: bool = True,
    extra: dict | None = None,
):
    """last.pt (``full``) holds everything --resume needs; best.pt only the model and what describes it: the
    optimiser state (Adam's two moments) would triple its size for no use at inference."""
    out = model_checkpoint(
        model,
        info,
        cfg.to_dict(),
        epoch=epoch,  # completed epochs
        global_step=state.global_step,
        best_miou=state.best_miou,
        metrics=state.history[-1] if state.history else None,
        time_used_s=state.time_used_s,
        timing=dict(state.timing),
    )
    if full:
        out.update(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "step_in_epoch": step_in_epoch,  # optimiser steps done inside `epoch` (0 at epoch end)
                "history": state.history,
                "rng": _rng_state(),
                **(extra or {}),
            }
        )
    atomic_save(out, path)


def _train_state(ckpt: dict) -> TrainState:
    return TrainState(
        ckpt["epoch"],
        ckpt["step_in_epoch"],
        ckpt["global_step"],
        ckpt["history"],
        ckpt["best_miou"],
        ckpt.get("time_used_s", 0.0),
        dict(ckpt.get("timing", {})),
    )


def _restore(ckpt: dict, model, optimizer, scheduler, scaler, ema=None) -> None:
    model.load_state_dict(ckpt["model"])
    if ema is not None:  # a run that had no average starts one from the weights it resumes
        ema.module.load_state_dict(ckpt.get("ema", ckpt["model"]))
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    _set_rng_state(ckpt["rng"])


def _write_history(run_dir: Path, history: list[dict]) -> None:
    atomic_write_text(run_dir / "metrics.json", json.dumps(history, indent=1))

    def flat(row: dict) -> dict:  # per-class dicts become columns: val_iou_<class>, val_dice_<class>
        out = {}
        for k, v in row.items():
            if isinstance(v, dict):
                out.update({f"{k}_{name}": x for name, x in v.items()})
            elif not isinstance(v, list):
                out[k] = v
        return out

    rows = [flat(r) for r in history]
    keys = list(rows[-1])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow({k: (f"{row[k]:.6g}" if isinstance(row.get(k), float) else row.get(k, "")) for k in keys})
    atomic_write_text(run_dir / "metrics.csv", buf.getvalue())


def _epoch_figure(model, ds, idx: list, ctx: RunContext, path: Path, title: str, rgb_bands=None) -> None:
    if not idx:
        return
    images, masks = ds.__getitems__(idx)
    pred = predict_batch(model, images, ctx).numpy()
    shown = np.stack([viz.rgb_view(im, rgb_bands) for im in images.permute(0, 2, 3, 1).numpy()])
    viz.prediction_grid(shown, masks.numpy(), pred, ds.info.palette, path, title, ds.info.class_names)


# ---- train --auto -------------------------------------------------------------------------------------
def train_auto(options: dict, probe: Machine | None = None) -> dict:
    """`train --auto`: plan, save the plan as RUN/plan.yaml, train it with the user's options on top."""
    if options.get("resume"):
        raise PixelsegError(
            f"--auto with --resume: the run {options['resume']} already holds its recipe "
            "(config.yaml, plan.yaml); drop --auto to continue it"
        )
    t_plan = time.time()  # the fingerprint and the speed probe are part of the run's time and --time-budget
    plan = plan_from_options(options, probe)
    overrides = {**plan.overrides(), **options}  # the user's options win (the plan has recorded them)
    if not overrides.get("run_dir"):
        overrides["run_dir"] = config.default_run_dir(overrides["model"], overrides["dataset"], kind="auto")
    run_dir = Path(overrides["run_dir"])
    created = not run_dir.exists()
    text = to_yaml(plan, "the plan `pixelseg train --auto` trained; this run's config.yaml is the resolved recipe")
    for line in text.splitlines():
        if not line.startswith("#"):
            continue
        log.info(line[2:])
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "plan.yaml", text)  # written first: a user can read it while the run trains
    try:
        return train(overrides, spent_s=time.time() - t_plan)
    except BaseException:
        if created and not (run_dir / "config.yaml").exists():  # the run never started: leave nothing behind
            (run_dir / "plan.yaml").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise

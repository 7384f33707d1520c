"""The training loop, top to bottom in one file (torchvision references style).

Defaults are the TensorFlow tutorial's recipe (Adam 1e-3, cross-entropy on logits, batch 64,
20 epochs, 128×128, random horizontal flip) on the fast path (channels_last, bf16 autocast where
the hardware has it). Runs under torchrun unchanged; only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import random
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from . import __version__
from .checkpoint import atomic_save, atomic_write_text, check_output_dir, load_checkpoint, make_output_dir
from .data import collate_batch, dataset_options, default_split, load_split
from .data.base import CacheSpec, FileDataset, cache_spec
from .distributed import DistInfo, ShardSampler, all_reduce_sum, barrier, check_batch, cleanup, init_distributed
from .errors import PixelsegError
from .losses import build_loss, class_weights
from .metrics import ConfusionMatrix
from .models import create_model
from .optim import build_optimizer, build_scheduler
from .runtime import (autocast, optimize_for_training, resolve_precision, seed_everything, select_device,
                      to_model_input)
from . import viz
from .progress import progress as progress_bar

# Single source of truth for training options; the CLI builds its flags from this dict.
DEFAULTS = {
    "dataset": "oxford-pet",
    "data_root": None,
    "images_dir": None,           # folder dataset: images sub-folder (default images)
    "masks_dir": None,            # folder dataset: masks sub-folder (default masks)
    "mask_suffix": None,          # folder dataset: mask stem = image stem + suffix (one-folder layouts)
    "val_fraction": None,         # folder dataset without a val split: share of pairs held out (default 0.2)
    "val_group": None,            # folder dataset: regex (or "prefix") grouping stems that stay on one side
    "classes": None,              # folder dataset: classes.csv path (default DATA_ROOT/classes.csv)
    "class_names": None,          # folder dataset: names of the classes in id order, "a,b"
    "train_split": None,          # dataset default (pets: trainval)
    "val_split": None,            # dataset default (pets: test)
    "model": "unet",
    "backbone": None,             # architecture default; or timm:NAME
    "output_stride": None,        # encoder output stride for dilated models (deeplabv3: 8 or 16); None: the arch's
    "in_channels": 3,             # image channels; != 3 reads 8/16-bit multi-band images (folder dataset)
    "rgb_bands": None,            # which bands the figures show as RGB, e.g. "3,2,1" (default first three)
    "weights": "imagenet",
    "freeze_encoder": "auto",     # auto: freeze iff pretrained weights were loaded (the tutorial freezes)
    "epochs": 20,
    "iterations": None,           # optimiser steps in all (overrides epochs; the schedule spans them), as papers give it
    "batch_size": 64,             # global batch, across ranks and accumulation steps
    "accumulate": 1,
    "image_size": 128,
    "lr": 1e-3,
    "optimizer": "adam",
    "weight_decay": 0.0,
    "momentum": 0.9,
    "schedule": "constant",
    "warmup_epochs": 0.0,
    "loss": "ce",
    "class_weighting": "none",    # none | uniform | inverse | median
    "hflip": True,
    "scale_range": None,          # e.g. "0.5,2.0": random rescale of image and mask (needs --crop to restore size)
    "crop": False,                # random crop back to --image-size, padding the mask with ignore_index
    "vflip": False,
    "color_jitter": 0.0,          # brightness/contrast/saturation strength, image only
    "seed": 0,
    "deterministic": False,
    "limit": None,
    "device": "auto",
    "precision": "auto",          # auto: bf16 on CPUs with native bf16 and on CUDA, else fp32
    "channels_last": True,
    "compile": False,
    "sync_bn": False,
    "freeze_bn": False,           # keep every BatchNorm on its running statistics (small per-device batches)
    "precise_bn": 4,              # before validating, re-estimate BatchNorm statistics over N training batches
    "workers": "auto",            # auto: 0 for whole-batch reads of resized samples, else one per core
    "checkpoint_every": 0,        # also checkpoint every N optimiser steps (0: per epoch only)
    "figure_samples": 3,
    "run_dir": None,
    "resume": None,
    "cache": "mmap",              # mmap: decode once to a disk store read via the page cache | memory | none
    "cache_max_side": None,       # with --crop: cache source resolution capped to this longer side
}


def resolve_config(overrides: dict) -> dict:
    cfg = dict(DEFAULTS)
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise PixelsegError(f"unknown config keys: {', '.join(sorted(unknown))}")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    cfg["train_split"] = cfg["train_split"] or default_split(cfg["dataset"], "train")
    cfg["val_split"] = cfg["val_split"] or default_split(cfg["dataset"], "val")
    if cfg["run_dir"] is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg["run_dir"] = str(Path("runs") / f"{cfg['model']}-{cfg['backbone'] or 'default'}-{cfg['dataset']}-{stamp}")
    for key in ("data_root", "run_dir", "resume"):
        if cfg[key] is not None:
            cfg[key] = str(cfg[key])
    if isinstance(cfg["weights"], str) and cfg["weights"].lower() in ("none", "null", ""):
        cfg["weights"] = None
    # Paths of inputs are recorded absolute, so `evaluate RUN` and `--config RUN/config.yaml` work from any
    # directory (os.path.abspath, not resolve(): a symlinked data folder keeps the name the user gave).
    for key in ("data_root", "classes"):
        if cfg[key] is not None:
            cfg[key] = os.path.abspath(os.path.expanduser(str(cfg[key])))
    if isinstance(cfg["weights"], str) and cfg["weights"] != "imagenet" and Path(cfg["weights"]).expanduser().is_file():
        cfg["weights"] = os.path.abspath(os.path.expanduser(cfg["weights"]))
    cfg["image_size"] = parse_size(cfg["image_size"])
    cfg["cache"] = cache_spec(cfg["cache"]).mode
    cfg["workers"] = _parse_workers(cfg["workers"])
    if cfg["cache_max_side"] is not None:
        try:
            cfg["cache_max_side"] = int(cfg["cache_max_side"])
        except (TypeError, ValueError):
            cfg["cache_max_side"] = 0
        if cfg["cache_max_side"] < 8:
            raise PixelsegError(f"--cache-max-side {overrides.get('cache_max_side')!r}: give the longest side in "
                                "pixels the cache keeps, e.g. 2048")
    if cfg["scale_range"] is not None:
        cfg["scale_range"] = _parse_floats(cfg["scale_range"], "--scale-range", 2)
    if cfg["rgb_bands"] is not None:
        try:
            cfg["rgb_bands"] = [int(v) for v in (cfg["rgb_bands"].split(",") if isinstance(cfg["rgb_bands"], str)
                                                 else cfg["rgb_bands"])]
        except (TypeError, ValueError):
            raise PixelsegError(f"--rgb-bands {cfg['rgb_bands']!r}: give 1 or 3 band indices, e.g. 3,2,1") from None
    for key in ("epochs", "batch_size", "in_channels") + (("iterations",) if cfg["iterations"] is not None else ()):
        if int(cfg[key]) < 1:
            raise PixelsegError(f"--{key.replace('_', '-')} {cfg[key]}: must be >= 1")
    return cfg


def _parse_workers(value):
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if n < 0:
        raise PixelsegError(f"--workers {value!r}: give a number of DataLoader worker processes (0: none) or auto")
    return n


def resolve_workers(workers, per_sample_work: bool) -> int:
    """--workers auto: none when batches are whole-array reads (a worker would only add a copy), else one
    per core this process may use (cores divided among torchrun's local ranks), at most 8."""
    if workers != "auto":
        return int(workers)
    if not per_sample_work:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


def parse_size(value) -> int | list[int]:
    """128, "128", "360x480" or [360, 480] -> int (square) or [h, w]."""
    try:
        if isinstance(value, str):
            parts = [int(v) for v in value.lower().replace("×", "x").split("x")]
        elif isinstance(value, (list, tuple)):
            parts = [int(v) for v in value]
        else:
            parts = [int(value)]
    except ValueError:
        raise PixelsegError(f"--image-size {value!r}: give N or HxW, e.g. 128 or 360x480") from None
    if len(parts) not in (1, 2) or min(parts) < 8:
        raise PixelsegError(f"--image-size {value!r}: give N or HxW with sides >= 8, e.g. 128 or 360x480")
    return parts[0] if len(parts) == 1 or parts[0] == parts[1] else parts


def _parse_floats(value, flag, n):
    try:
        vals = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        vals = []
    if len(vals) != n:
        raise PixelsegError(f"{flag} {value!r}: expected {n} comma-separated numbers, e.g. 0.5,2.0")
    return vals


def _size_hw(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class Logger:
    def __init__(self, run_dir: Path | None):
        self.file = open(run_dir / "train.log", "a", encoding="utf-8") if run_dir else None

    def __call__(self, msg: str) -> None:
        if self.file is None:
            return
        tqdm.write(msg)
        self.file.write(msg + "\n")
        self.file.flush()


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2]), "python": repr(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    import ast
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flip_batch(images: torch.Tensor, masks: torch.Tensor, gen: torch.Generator):
    """The tutorial's augmentation: the same random horizontal flip for image and mask, per sample."""
    flip = torch.rand(images.shape[0], generator=gen) < 0.5
    if flip.any():
        images, masks = images.clone(), masks.clone()
        images[flip] = images[flip].flip(-1)
        masks[flip] = masks[flip].flip(-1)
    return images, masks


@torch.no_grad()
def precise_bn(model, loader, n_batches: int, device, amp_dtype, channels_last: bool, dist_info: DistInfo) -> None:
    """Recompute BatchNorm running statistics for the current weights (PreciseBN, as in pycls/Detectron2).

    With few steps per epoch (the tutorial's pets run has 5) the exponential running averages lag far
    behind weights that Adam moves quickly, and eval-mode predictions collapse to one class while
    train-mode ones are fine. A forward-only pass over a few training batches fixes that for a fraction
    of an epoch's cost. Call it with the model in its training configuration: BatchNorm layers kept in
    eval mode (frozen encoder, --freeze-bn) are left untouched.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
           and m.track_running_stats]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    for i, (images, _) in enumerate(loader):
        if i >= n_batches:
            break
        with autocast(device, amp_dtype):
            model(to_model_input(images, device, channels_last))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
        if dist_info.enabled:  # every rank evaluates with the same statistics
            for buf in (m.running_mean, m.running_var):
                all_reduce_sum(buf, dist_info).div_(dist_info.world_size)


@torch.no_grad()
def evaluate_model(model, loader, device, amp_dtype, num_classes, ignore_index, channels_last=True,
                   loss_fn=None, dist_info: DistInfo | None = None, progress: bool = True, desc: str = "val"):
    """Confusion matrix (and mean loss) over the whole loader; summed across ranks before scoring."""
    dist_info = dist_info or DistInfo()
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of per-pixel losses, pixels)
    for images, masks in progress_bar(loader, desc=desc, unit="batch", enabled=progress and dist_info.is_main):
        x = to_model_input(images, device, channels_last)
        y = masks.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        if loss_fn is not None:
            valid = (y != ignore_index).sum()
            loss_sum[0] += loss_fn(logits, y).double() * valid
            loss_sum[1] += valid
        cm.update(logits.argmax(1), y)
    all_reduce_sum(cm.mat, dist_info)
    all_reduce_sum(loss_sum, dist_info)
    mean_loss = float(loss_sum[0] / loss_sum[1].clamp(min=1)) if loss_fn is not None else float("nan")
    return cm, mean_loss


def channel_stats(images) -> dict:
    """Per-channel mean and std of float [0, 1] N x H x W x C images (float64 sums: no drift)."""
    c = images[0].shape[-1]
    total = np.zeros(c)
    sq = np.zeros(c)
    n = 0
    for im in images:  # a stacked array or a list of arrays of different sizes
        flat = np.asarray(im, np.float64).reshape(-1, c)
        total += flat.sum(0)
        sq += (flat ** 2).sum(0)
        n += flat.shape[0]
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean ** 2, 0))
    return {"mean": [float(v) for v in mean], "std": [float(max(v, 1e-6)) for v in std]}


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


def _checkpoint(path, model, optimizer, scheduler, scaler, cfg, info, epoch, step_in_epoch, global_step,
                history, best_miou, full=True):
    """last.pt (``full``) holds everything --resume needs; best.pt only the model and what describes it: the
    optimiser state (Adam's two moments) would triple its size for no use at inference."""
    state = {
        "pixelseg_version": __version__,
        "model": model.state_dict(),
        "model_config": model.config,
        "dataset": info.to_dict(),
        "config": cfg,
        "epoch": epoch,                  # completed epochs
        "global_step": global_step,
        "best_miou": best_miou,
        "metrics": history[-1] if history else None,
    }
    if full:
        state.update({
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "step_in_epoch": step_in_epoch,  # optimiser steps done inside `epoch` (0 at epoch end)
            "history": history,
            "rng": _rng_state(),
        })
    atomic_save(state, path)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: carries the command that continues it."""

    def __init__(self, run_dir: Path | None):
        super().__init__()
        self.run_dir = run_dir

    def advice(self) -> str:
        if self.run_dir is not None and (self.run_dir / "last.pt").is_file():
            return f"interrupted; continue the run with: pixelseg train --resume {self.run_dir}"
        if self.run_dir is not None:
            return (f"interrupted before the first checkpoint of {self.run_dir}; run the same command again "
                    "(--checkpoint-every N also saves within epochs)")
        return "interrupted"


def train(overrides: dict) -> dict:
    """Train from a config dict (CLI flags / YAML); returns the run summary."""
    dist_info = init_distributed(overrides.get("device") or "auto")
    status: dict = {}
    try:
        return _train(overrides, dist_info, status)
    except KeyboardInterrupt:
        raise TrainingInterrupted(status.get("run_dir")) from None
    finally:
        cleanup(dist_info)


def _train(overrides: dict, dist_info: DistInfo, status: dict | None = None) -> dict:
    t_start = time.time()
    ckpt = None
    if overrides.get("resume"):
        run_dir = Path(overrides["resume"])
        last = run_dir / "last.pt"
        if not last.is_file():
            raise PixelsegError(f"--resume {run_dir}: no last.pt there; nothing to resume")
        ckpt = load_checkpoint(last)
        if "optimizer" not in ckpt:
            raise PixelsegError(f"{last}: holds only model weights (like best.pt), not the optimiser state that "
                                "--resume needs; start a new run with --weights or copy back the run's own last.pt")
        cfg = dict(ckpt["config"])
        for key in ("epochs", "device", "workers", "checkpoint_every"):  # safe to change on resume
            if overrides.get(key) is not None:
                cfg[key] = overrides[key]
        cfg["resume"] = str(run_dir)
    else:
        cfg = resolve_config(overrides)
        run_dir = check_output_dir(cfg["run_dir"], "--run-dir")
        if (run_dir / "last.pt").exists():
            raise PixelsegError(f"--run-dir {run_dir} already holds a run; continue it with --resume {run_dir} "
                                "or choose another --run-dir")

    main = dist_info.is_main
    if main:
        make_output_dir(run_dir, "--resume" if ckpt is not None else "--run-dir")
        (run_dir / "figures").mkdir(exist_ok=True)
        for stale in run_dir.glob(".*.tmp"):  # left by a run killed in the middle of a write
            stale.unlink(missing_ok=True)
    barrier(dist_info)
    if status is not None:
        status["run_dir"] = run_dir
    log = Logger(run_dir if main else None)
    device = select_device(cfg["device"])
    amp_dtype = resolve_precision(cfg["precision"], device)
    per_rank_batch = check_batch(cfg["batch_size"], dist_info.world_size, cfg["accumulate"])
    seed_everything(cfg["seed"], cfg["deterministic"])

    # ---- data -------------------------------------------------------------------------------
    size = cfg["image_size"]
    # Random crops are taken from the source resolution (optionally capped), so --image-size is the crop;
    # without them every sample is cached at --image-size and batches are whole-array reads.
    mode = cache_spec(cfg.get("cache", "mmap")).mode
    full_res = bool(cfg["crop"] or cfg.get("cache_max_side"))
    channels = int(cfg["in_channels"])
    train_ds = load_split(cfg["dataset"], cfg["data_root"], cfg["train_split"], size, cfg["limit"],
                          CacheSpec(mode, full_res, cfg.get("cache_max_side")), channels=channels,
                          **dataset_options(cfg))
    val_ds = load_split(cfg["dataset"], cfg["data_root"], cfg["val_split"], size, cfg["limit"], CacheSpec(mode),
                        channels=channels, **dataset_options(cfg))
    if channels != 3 and cfg["color_jitter"]:
        raise PixelsegError(f"--color-jitter works on RGB images, not on {channels}-channel inputs; drop it")
    info = train_ds.info
    # The tutorial's flip runs on the whole batch inside the loop (no per-sample Python); anything
    # richer goes through the per-sample torchvision.transforms.v2 pipeline.
    flip_in_loop = cfg["hflip"]
    if cfg["scale_range"] or cfg["crop"] or cfg["vflip"] or cfg["color_jitter"] or getattr(train_ds, "full_res", False):
        from .data.augment import build_train_transform
        train_ds.transform = build_train_transform(
            _size_hw(size), scale=tuple(cfg["scale_range"]) if cfg["scale_range"] else None, crop=cfg["crop"],
            hflip=cfg["hflip"], vflip=cfg["vflip"], color_jitter=cfg["color_jitter"], ignore_index=info.ignore_index)
        flip_in_loop = False
    streamed = isinstance(train_ds, torch.utils.data.IterableDataset)  # shards
    workers = resolve_workers(cfg.get("workers", "auto"),
                              train_ds.transform is not None or isinstance(train_ds, FileDataset) or streamed)
    val_workers = resolve_workers(cfg.get("workers", "auto"),
                                  isinstance(val_ds, (FileDataset, torch.utils.data.IterableDataset)))

    def loader_kw(n, persistent=True):
        # Streamed datasets get fresh workers each epoch: they must see the new epoch's shuffle seed.
        return dict(collate_fn=collate_batch, num_workers=n, pin_memory=device.type == "cuda",
                    persistent_workers=n > 0 and persistent)
    if streamed:  # every rank and worker streams its own share, the same number of batches everywhere
        train_sampler = train_ds.configure(per_rank_batch, workers, dist_info.rank, dist_info.world_size,
                                           shuffle=True, even=True, seed=cfg["seed"])
        train_loader = torch.utils.data.DataLoader(train_ds, batch_size=None, **loader_kw(workers, False))
    else:
        train_sampler = torch.utils.data.DistributedSampler(
            train_ds, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True, seed=cfg["seed"])
        train_loader = torch.utils.data.DataLoader(train_ds, batch_size=per_rank_batch, sampler=train_sampler,
                                                   **loader_kw(workers))
    if isinstance(val_ds, torch.utils.data.IterableDataset):  # every sample scored exactly once
        val_ds.configure(max(per_rank_batch, 16), val_workers, dist_info.rank, dist_info.world_size,
                         shuffle=False, even=False)
        val_loader = torch.utils.data.DataLoader(val_ds, batch_size=None, **loader_kw(val_workers, False))
    else:
        val_loader = torch.utils.data.DataLoader(val_ds, batch_size=max(per_rank_batch, 16),
                                                 sampler=ShardSampler(len(val_ds), dist_info),
                                                 **loader_kw(val_workers))

    # ---- model ------------------------------------------------------------------------------
    arch_options = {} if cfg.get("output_stride") is None else {"output_stride": int(cfg["output_stride"])}
    norm = {}
    if channels != 3:
        # No encoder has statistics for these bands: per-channel mean/std of the training split, stored
        # in the model config (and so in every checkpoint, export and prediction).
        norm = channel_stats(train_ds.images)
        log("input normalisation from the training split: mean " + ", ".join(f"{v:.4f}" for v in norm["mean"])
            + " | std " + ", ".join(f"{v:.4f}" for v in norm["std"]))
    if ckpt is not None and "mean" in ckpt.get("model_config", {}):
        norm = {k: ckpt["model_config"][k] for k in ("mean", "std")}
    model = create_model(cfg["model"], backbone=cfg["backbone"], num_classes=info.num_classes, weights=cfg["weights"],
                         in_channels=channels, **norm, **arch_options)
    freeze = cfg["freeze_encoder"]
    if freeze == "auto":
        freeze = bool(model.pretrained)
        if not model.pretrained:
            log("encoder: random init (no pretrained weights), so it is trained, not frozen "
                "(freezing a random encoder is pointless; pass --freeze-encoder yes to force it)")
    elif isinstance(freeze, str):
        freeze = freeze.lower() in ("yes", "true", "1")
    model.set_encoder_frozen(bool(freeze))
    cfg["backbone"] = model.backbone
    model.to(device)
    if cfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    kernel_note = optimize_for_training(model, device, amp_dtype)
    if cfg["sync_bn"]:
        if not dist_info.enabled:
            raise PixelsegError("--sync-bn needs several processes (launch with torchrun --nproc_per_node=N); "
                                "with one process plain BatchNorm is already exact")
        if device.type != "cuda":
            raise PixelsegError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm is GPU-only); on CPU use "
                                "--freeze-bn or a larger per-process batch")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    core = model
    if dist_info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    fwd = torch.compile(model) if cfg["compile"] else model

    weight = None
    if cfg["class_weighting"] not in (None, "none"):
        counts = np.stack([np.bincount(m.ravel(), minlength=256)[: info.num_classes] for m in train_ds.iter_masks()])
        weight = class_weights(counts, cfg["class_weighting"]).to(device)
        log(f"class weights ({cfg['class_weighting']}): " + ", ".join(
            f"{n}={w:.3f}" for n, w in zip(info.class_names, weight.tolist())))
    loss_fn = build_loss(cfg["loss"], info.num_classes, ignore_index=info.ignore_index, weight=weight)
    optimizer = build_optimizer(core, cfg["optimizer"], cfg["lr"], cfg["weight_decay"], cfg["momentum"])
    micro_per_epoch = train_ds.num_batches() if streamed else len(train_loader)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg["accumulate"])
    total_steps = cfg["epochs"] * steps_per_epoch
    if cfg.get("iterations"):  # papers give schedules in iterations: run that many steps, validate per epoch
        total_steps = int(cfg["iterations"])
        cfg["epochs"] = math.ceil(total_steps / steps_per_epoch)
    scheduler = build_scheduler(optimizer, cfg["schedule"], total_steps=total_steps,
                                warmup_steps=int(cfg["warmup_epochs"] * steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, skip_steps, global_step, history, best_miou = 0, 0, 0, [], -1.0
    if ckpt is not None:
        core.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, skip_steps = ckpt["epoch"], ckpt["step_in_epoch"]
        global_step, history, best_miou = ckpt["global_step"], ckpt["history"], ckpt["best_miou"]
        _set_rng_state(ckpt["rng"])
        log(f"resumed {run_dir} at epoch {start_epoch + 1}, step {skip_steps} of {steps_per_epoch}")

    if main:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
        n_params = sum(p.numel() for p in core.parameters())
        n_train = sum(p.numel() for p in core.parameters() if p.requires_grad)
        log(f"pixelseg {__version__} | {cfg['model']}/{core.backbone} | {n_params / 1e6:.2f}M params "
            f"({n_train / 1e6:.2f}M trainable, encoder {'frozen' if freeze else 'trained'}) | device {device} | "
            f"precision {amp_dtype or torch.float32} | channels_last {cfg['channels_last']} | world {dist_info.world_size}")
        if kernel_note != "none":
            log(f"kernels: {kernel_note}")
        log(f"data: {info.name} train={cfg['train_split']} ({len(train_ds)} images) val={cfg['val_split']} "
            f"({len(val_ds)} images) at {'×'.join(map(str, _size_hw(size)))}"
            f"{' (crops of the source resolution)' if full_res else ''}; cache {mode}; DataLoader workers "
            f"{workers}; unreadable files skipped: {len(train_ds.skipped) + len(val_ds.skipped)}")
        log(f"batch: global {cfg['batch_size']} = {per_rank_batch} per rank × {dist_info.world_size} ranks × "
            f"{cfg['accumulate']} accumulation steps; {steps_per_epoch} optimiser steps per epoch")
    fig_idx = (viz.pick_samples(val_ds.masks, cfg["figure_samples"], info.num_classes) if hasattr(val_ds, "masks")
               else list(range(min(cfg["figure_samples"], len(val_ds)))))  # streamed shards: no random access

    for epoch in range(start_epoch, cfg["epochs"]):
        train_sampler.set_epoch(epoch)
        model.train()
        if cfg["freeze_bn"]:
            for m in core.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        t_epoch, data_time, seen = time.time(), 0.0, 0
        loss_sum = torch.zeros(2, dtype=torch.float64)
        train_cm = ConfusionMatrix(info.num_classes, info.ignore_index, device=device)
        it = iter(train_loader)
        step_in_epoch = 0
        bar = progress_bar(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg['epochs']}", unit="step",
                           enabled=main)
        if skip_steps:  # mid-epoch resume: the sampler order is a function of (seed, epoch), so skip ahead
            for _ in range(min(skip_steps * cfg["accumulate"], micro_per_epoch)):
                next(it)
            step_in_epoch = skip_steps
            bar.update(skip_steps)
            skip_steps = 0
        micro = step_in_epoch * cfg["accumulate"]
        t_data = time.time()
        for images, masks in it:
            data_time += time.time() - t_data
            if flip_in_loop:
                gen = torch.Generator().manual_seed(hash((cfg["seed"], epoch, micro, dist_info.rank)) % 2**63)
                images, masks = _flip_batch(images, masks, gen)
            x = to_model_input(images, device, cfg["channels_last"])
            y = masks.to(device, non_blocking=True)
            last_micro = (micro + 1) % cfg["accumulate"] == 0 or micro + 1 == micro_per_epoch
            sync_ctx = model.no_sync() if dist_info.enabled and not last_micro else contextlib.nullcontext()
            with sync_ctx:
                with autocast(device, amp_dtype):
                    logits = fwd(x)
                loss = loss_fn(logits.float(), y)
                scaler.scale(loss / cfg["accumulate"]).backward()
            if last_micro:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                global_step += 1
                step_in_epoch += 1
                bar.update(1)
                if main and cfg["checkpoint_every"] and global_step % cfg["checkpoint_every"] == 0 \
                        and step_in_epoch < steps_per_epoch:
                    _checkpoint(run_dir / "last.pt", core, optimizer, scheduler, scaler, cfg, info, epoch,
                                step_in_epoch, global_step, history, best_miou)
            loss_sum += torch.tensor([loss.item() * x.shape[0], x.shape[0]], dtype=torch.float64)
            train_cm.update(logits.detach().argmax(1), y)
            seen += x.shape[0]
            micro += 1
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)  # redraw on tqdm's own interval, not every step (log files)
            if global_step >= total_steps:  # --iterations reached inside the last epoch
                break
            t_data = time.time()
        bar.close()
        train_time = time.time() - t_epoch
        all_reduce_sum(train_cm.mat, dist_info)
        loss_sum = all_reduce_sum(loss_sum.to(device), dist_info).cpu()
        seen_t = all_reduce_sum(torch.tensor([seen], dtype=torch.float64, device=device), dist_info)

        if cfg["precise_bn"]:
            precise_bn(core, train_loader, cfg["precise_bn"], device, amp_dtype, cfg["channels_last"], dist_info)
        val_cm, val_loss = evaluate_model(fwd, val_loader, device, amp_dtype, info.num_classes, info.ignore_index,
                                          cfg["channels_last"], loss_fn, dist_info)
        scores, train_scores = val_cm.compute(), train_cm.compute()
        row = {
            "epoch": epoch + 1,
            "train_loss": float(loss_sum[0] / loss_sum[1].clamp(min=1)),
            "val_loss": val_loss,
            "train_miou": train_scores["miou"],
            "val_miou": scores["miou"],
            "val_pixel_acc": scores["pixel_acc"],
            "val_mean_class_acc": scores["mean_class_acc"],
            "lr": optimizer.param_groups[0]["lr"],
            "train_images_per_s": float(seen_t.item()) / train_time,
            "data_time_frac": data_time / train_time,
            "epoch_time_s": time.time() - t_epoch,
            "val_iou": dict(zip(info.class_names, scores["iou"])),
            "val_dice": dict(zip(info.class_names, scores["dice"])),
        }
        history.append(row)
        if main:
            is_best = row["val_miou"] > best_miou
            best_miou = max(best_miou, row["val_miou"])
            _checkpoint(run_dir / "last.pt", core, optimizer, scheduler, scaler, cfg, info, epoch + 1, 0,
                        global_step, history, best_miou)
            if is_best:
                _checkpoint(run_dir / "best.pt", core, optimizer, scheduler, scaler, cfg, info, epoch + 1, 0,
                            global_step, history, best_miou, full=False)
            _write_history(run_dir, history)
            viz.training_curves(history, run_dir / "curves.png")
            _epoch_figure(core, val_ds, fig_idx, device, amp_dtype, cfg, run_dir / "figures" / f"epoch_{epoch + 1:03d}.png",
                          f"epoch {epoch + 1}: val mIoU {row['val_miou']:.3f}")
            log(f"epoch {epoch + 1}/{cfg['epochs']}: train loss {row['train_loss']:.4f} | val loss {val_loss:.4f} | "
                f"val mIoU {row['val_miou']:.4f} | pixel acc {row['val_pixel_acc']:.4f} | "
                f"{row['train_images_per_s']:.1f} img/s | data {100 * row['data_time_frac']:.1f}% | "
                f"{row['epoch_time_s']:.1f}s" + (" | best" if is_best else ""))
        barrier(dist_info)

    summary = {
        "run_dir": str(run_dir),
        "epochs": cfg["epochs"],
        "best_val_miou": max((h["val_miou"] for h in history), default=float("nan")),
        "final": {k: v for k, v in history[-1].items()} if history else {},
        "skipped_files": list(train_ds.skipped) + list(val_ds.skipped),
        "wall_time_s": time.time() - t_start,
        "world_size": dist_info.world_size,
    }
    if main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
        log(f"done: best val mIoU {summary['best_val_miou']:.4f}; run directory {run_dir}")
    return summary


@torch.no_grad()
def _epoch_figure(model, ds, idx, device, amp_dtype, cfg, path, title):
    if not idx:
        return
    model.eval()
    images, masks = ds.__getitems__(idx)
    with autocast(device, amp_dtype):
        pred = model(to_model_input(images, device, cfg["channels_last"])).float().argmax(1).cpu().numpy()
    shown = np.stack([viz.rgb_view(im, cfg.get("rgb_bands")) for im in images.permute(0, 2, 3, 1).numpy()])
    viz.prediction_grid(shown, masks.numpy(), pred, ds.info.palette, path, title, ds.info.class_names)

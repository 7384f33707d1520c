"""`pixelseg train --folds K`: K-fold cross-validation, then the K fold models as one ensemble.

The pool is the labelled training data: the ``--train-split``, plus the val split where the dataset has
none of its own and folder's seeded ``--val-fraction`` carved it out of train (folder, coco, cvat,
labelstudio, labelme, yolo without a val split): then every pair is in the pool. An official val or
test split (pets' test, CamVid's val, a folder's val/ or val.txt) stays out of the pool: nothing is
chosen on it, and ``evaluate RUN`` scores the ensemble on it afterwards.

Folds are made of groups, as the val split is: ``--val-group`` (sequence, tile, slice stack) where the
dataset has that option, else each image is its own group. Groups are dealt, largest first and in a
seeded sha1 order, to the fold holding the fewest images so far: deterministic for a dataset and
``--seed``, independent of file order, every image held out exactly once, fold sizes within one group.

Each fold is an ordinary run, RUN/fold_I (``--folds K --fold I``: train on the other folds, validate on
fold I), so best.pt, metrics, figures, summary.json and ``--resume`` are the usual ones. RUN/folds.json
records the options; RUN/folds.csv which image is in which fold; RUN/cv.json and RUN/cv.png the result.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import yaml

from ..core.checkpoint import MANIFEST
from ..core.errors import PixelsegError
from ..core.files import atomic_write_text, check_output_dir, file_sha256, make_output_dir
from ..core.logs import logger as log
from ..core.logs import run_log
from .config import TrainConfig

if TYPE_CHECKING:
    from ..data.protocol import SplitDataset

    class _Part(SplitDataset, Protocol):
        """A loaded split that a FoldSubset reads from: one with random access (ArrayDataset, FileDataset)."""

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]: ...

        def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]: ...

        def read_sample(self, i: int) -> tuple | None: ...  # (image, mask), or None when its files are unreadable

# What every member of an ensemble must share: its classes and what it takes as input.


# ---- the pool and its folds ------------------------------------------------------------------------
def pool_splits(cfg: TrainConfig) -> list[str]:
    """The splits the folds are made from: train, and val too where --val-fraction carved val out of it."""
    if cfg.dataset == "shards":
        raise PixelsegError(
            "--folds needs random access to the training pool; shards stream, so give the "
            "dataset itself (e.g. --dataset folder) for cross-validation"
        )
    assert cfg.train_split is not None  # resolve_config names it
    if cfg.val_split != "val" or not _val_is_carved(cfg):
        return [cfg.train_split]
    return list(dict.fromkeys([cfg.train_split, "val"]))


def _val_is_carved(cfg: TrainConfig) -> bool:
    """Whether the val split is folder's --val-fraction share of train rather than the dataset's own."""
    from ..data import dataset_options, folder, get_dataset_module, labelled

    module = get_dataset_module(cfg.dataset)
    opts = dataset_options(cfg.to_dict())
    if cfg.dataset == "folder":
        o = folder._options(opts)
        layout = folder.discover(
            Path(cfg.data_root) if cfg.data_root else None,
            o["images_dir"],
            o["masks_dir"],
            o["val_fraction"],
            o["mask_suffix"],
            o["val_group"],
        )
        return "--val-fraction" in layout.source
    if isinstance(module, labelled.AnnotationFormat):
        o = labelled.options(module.OPTIONS, opts)
        root = Path(cfg.data_root) if cfg.data_root is not None else None
        return "val" not in labelled.parse(cfg.dataset, module.read, root, o).splits()
    return False


def grouping(cfg: TrainConfig) -> tuple:
    """(name -> group, description): --val-group where the dataset takes it, else one group per image."""
    from ..data import get_dataset_module
    from ..data.folder import group_key

    pattern = cfg.val_group
    if pattern and "val_group" in getattr(get_dataset_module(cfg.dataset), "OPTIONS", {}):
        return group_key(pattern), f"grouped by --val-group {pattern}"
    return (lambda name: name), "one group per image"


def assign_folds(names: list[str], k: int, seed: int, key=lambda n: n) -> list[int]:
    """The fold of each name: whole groups, largest first (ties in seeded sha1 order), each to the fold with
    the fewest images so far. Raises when there are fewer groups than folds."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(key(name), []).append(i)
    if len(groups) < k:
        raise ValueError(len(groups))
    order = sorted(groups, key=lambda g: (-len(groups[g]), hashlib.sha1(f"{seed}:{g}".encode()).hexdigest()))
    sizes, out = [0] * k, [0] * len(names)
    for g in order:
        f = min(range(k), key=lambda j: (sizes[j], j))
        sizes[f] += len(groups[g])
        for i in groups[g]:
            out[i] = f
    return out


def pool_folds(cfg: TrainConfig, load) -> tuple[dict, dict]:
    """({(split, name): fold}, a description of the pool) for cfg's --folds; `load(split, CacheSpec)` reads
    a split (listed, not decoded). A pool too small for K folds is a one-line error."""
    from ..data.base import CacheSpec

    k, splits = cfg.folds, pool_splits(cfg)
    assert k is not None  # called for --folds K only
    keys = [(s, n) for s in splits for n in load(s, CacheSpec("none")).names]
    key, how = grouping(cfg)
    n_groups = len({key(n) for _, n in keys})
    about = {
        "dataset": cfg.dataset,
        "splits": splits,
        "images": len(keys),
        "groups": n_groups,
        "grouping": how,
        "seed": cfg.seed,
    }
    where = f"{cfg.dataset} {'+'.join(splits)}" + (f" at {cfg.data_root}" if cfg.data_root else "")
    try:
        folds = assign_folds([n for _, n in keys], k, cfg.seed, key)
    except ValueError:
        what = f"{len(keys)} image(s)" + (f" in {n_groups} group(s), {how}" if n_groups != len(keys) else "")
        raise PixelsegError(
            f"--folds {k}: the training pool ({where}) has {what}; {k} folds need at least {k} "
            f"{'groups' if n_groups != len(keys) else 'images'} (each fold holds out one or more): "
            "lower --folds or add data"
        ) from None
    about["fold_images"] = [folds.count(f) for f in range(k)]
    return dict(zip(keys, folds, strict=True)), about


class FoldSubset(torch.utils.data.Dataset):
    """Some samples of one or more loaded splits, seen as one dataset: a fold's training side (the other
    folds) or its held-out side. The parts are read untransformed; this subset applies its own
    `transform`, so the training side's augmentation never reaches the held-out side. A
    data.protocol.SplitDataset over parts that are."""

    streamed = False

    split_name: str  # what train.log calls it; set by fold_datasets

    def __init__(self, parts: list[tuple[_Part, list[int]]]):
        self.parts = [(ds, idx) for ds, idx in parts if idx]
        self.index = [(p, i) for p, (_, idx) in enumerate(self.parts) for i in idx]
        self.info = parts[0][0].info
        self.names = [self.parts[p][0].names[i] for p, i in self.index]
        self.full_res = any(ds.full_res for ds, _ in self.parts)
        self.reads_files = any(ds.reads_files for ds, _ in self.parts)
        self.transform: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
        self.images = _View(self, "images")
        self.masks = _View(self, "masks")

    def __len__(self) -> int:
        return len(self.index)

    @property
    def skipped(self) -> list[str]:
        return [n for ds, _ in self.parts for n in ds.skipped]

    def collect_skipped(self) -> list[str]:
        return [n for ds, _ in self.parts for n in ds.collect_skipped()]

    def open_skip_channel(self) -> None:
        for ds, _ in self.parts:
            ds.open_skip_channel()

    def __getitem__(self, i):
        p, j = self.index[int(i)]
        img, mask = self.parts[p][0][j]
        return self.transform(img, mask) if self.transform is not None else (img, mask)

    def __getitems__(self, indices):
        if self.transform is None:  # each part's own batch read (whole-array fast paths), then joined
            by_part: dict[int, list[int]] = {}
            for i in indices:
                p, j = self.index[int(i)]
                by_part.setdefault(p, []).append(j)
            batches = [self.parts[p][0].__getitems__(js) for p, js in by_part.items()]
            return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        items = []
        for i in indices:  # --cache none: an unreadable file drops out of its batch, as in FileDataset
            p, j = self.index[int(i)]
            ds = self.parts[p][0]
            item = ds.read_sample(j)
            if item is not None:
                items.append(self.transform(*item) if self.transform is not None else item)
        if not items:
            names = ", ".join(self.names[i] for i in indices[:3])
            raise PixelsegError(f"every file of a batch is unreadable ({names} ...)")
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

    def iter_masks(self):
        for i in range(len(self)):
            yield np.asarray(self.masks[i])


class _View:
    """ds.images / ds.masks of a FoldSubset: indexable and iterable, read from the parts on access."""

    def __init__(self, subset: FoldSubset, which: str):
        self.subset, self.which = subset, which

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, i):
        p, j = self.subset.index[int(i)]
        return getattr(self.subset.parts[p][0], self.which)[j]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def fold_datasets(cfg: TrainConfig, load, train_spec, val_spec) -> tuple[FoldSubset, FoldSubset]:
    """train.py's hook for one fold (--folds K --fold I): (the other folds, fold I), each read as the
    train and val splits would be (`load(split, CacheSpec)`: crops of the source resolution for training)."""
    k, fold = cfg.folds, cfg.fold
    assert fold is not None  # train.py comes here for --fold I
    if not k:
        raise PixelsegError(f"--fold {fold}: needs --folds K, the number of folds it is one of")
    if fold >= k:
        raise PixelsegError(f"--fold {fold}: folds are numbered 0..{k - 1} for --folds {k}")
    fold_of, about = pool_folds(cfg, load)
    train_parts, held_parts = [], []
    for split in about["splits"]:
        tr, va = load(split, train_spec), load(split, val_spec)
        train_parts.append((tr, [i for i, n in enumerate(tr.names) if fold_of.get((split, n), -1) != fold]))
        held_parts.append((va, [i for i, n in enumerate(va.names) if fold_of.get((split, n), -1) == fold]))
    train_ds, held_ds = FoldSubset(train_parts), FoldSubset(held_parts)
    pool = "+".join(about["splits"])
    train_ds.split_name, held_ds.split_name = f"{pool} less fold {fold}", f"fold {fold} of {pool}"  # train.log header
    log.info(
        f"fold {fold + 1}/{k} (--fold {fold}): training on {len(train_ds)} images of the other folds, "
        f"validating on the {len(held_ds)} held out ({about['dataset']} {'+'.join(about['splits'])}, "
        f"{about['images']} images, {about['grouping']})"
    )
    return train_ds, held_ds


# ---- the K runs ------------------------------------------------------------------------------------
def wants_folds(overrides: dict) -> bool:
    """train.py's dispatch: --folds K without --fold (all folds), or --resume of a folds run dir."""
    if overrides.get("resume"):
        return (Path(overrides["resume"]) / MANIFEST).is_file()
    return bool(overrides.get("folds")) and overrides.get("fold") is None


def _loader(cfg: TrainConfig):
    from ..data import dataset_options, load_split

    def load(split, spec):
        return load_split(
            cfg.dataset,
            cfg.data_root,
            split,
            cfg.image_size,
            cfg.limit,
            spec,
            channels=cfg.in_channels,
            **dataset_options(cfg.to_dict()),
        )

    return load


def _start(overrides: dict) -> tuple[Path, dict]:
    """A new folds run: (run dir, the options every fold trains with), checked before anything is made."""
    from . import config

    cfg = config.resolve_config({k: v for k, v in overrides.items() if k != "fold"})
    run_dir = check_output_dir(cfg.run_dir, "--run-dir")
    if (run_dir / MANIFEST).exists() or (run_dir / "last.pt").exists() or any(run_dir.glob("fold_*")):
        raise PixelsegError(
            f"--run-dir {run_dir} already holds a run; continue it with --resume {run_dir} or choose another --run-dir"
        )
    resolved = cfg.to_dict()
    options = {k: resolved[k] for k in overrides if k in resolved and k != "fold"}  # canonical: absolute paths
    options["run_dir"] = str(run_dir)
    return run_dir, options


def _reopen(overrides: dict) -> tuple[Path, dict]:
    """--resume RUN of a folds run: its recorded options, with the resumable ones given now on top."""
    from . import config

    run_dir = Path(overrides["resume"])
    try:
        manifest = json.loads((run_dir / MANIFEST).read_text())
        options = dict(manifest["options"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PixelsegError(
            f"{run_dir / MANIFEST}: unreadable ({exc}); it records the options of this "
            "cross-validation run, so it cannot be resumed without it"
        ) from None
    options.update({k: config.parse_value(k, overrides[k]) for k in config.RESUMABLE if k in overrides})
    return run_dir, options


def train_folds(overrides: dict, train_fn) -> dict:
    """All K folds one after another (finished ones skipped, a partial one resumed), then cv.json/cv.png."""
    from . import config
    from .budget import format_seconds

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PixelsegError(
            "--folds trains its K folds one after another in one process; under torchrun launch "
            "one fold at a time: --folds K --fold I --run-dir RUN/fold_I"
        )
    resuming = bool(overrides.get("resume"))
    run_dir, options = _reopen(overrides) if resuming else _start(overrides)
    cfg = config.resolve_config(options)
    fold_of, about = pool_folds(cfg, _loader(cfg))  # too small for K folds: said before anything is made
    k, budget, t0 = cfg.folds, cfg.time_budget, time.time()
    assert k is not None  # a folds run: --folds K, or recorded in the run it resumes
    make_output_dir(run_dir, "--resume" if resuming else "--run-dir")
    atomic_write_text(run_dir / MANIFEST, json.dumps({"folds": k, "options": options, "pool": about}, indent=1))
    # the whole cross-validation's recipe: `train --config RUN/config.yaml` runs it again
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    atomic_write_text(
        run_dir / "folds.csv", "split,name,fold\n" + "".join(f"{s},{n},{f}\n" for (s, n), f in fold_of.items())
    )
    with run_log(run_dir):
        log.info(
            f"cross-validation: {k} folds of {about['images']} images ({about['dataset']} "
            f"{'+'.join(about['splits'])}, {about['grouping']}; held out per fold: "
            f"{', '.join(map(str, about['fold_images']))}) in {run_dir}"
        )
        if budget:
            log.info(
                f"--time-budget {format_seconds(budget)} is split across the {k} folds: each gets what is "
                f"left divided by the folds left ({format_seconds(budget / k)} for the first)"
            )
        summaries = [
            _run_fold(run_dir, i, k, options, overrides if resuming else {}, budget, train_fn) for i in range(k)
        ]
        cv = write_cv(run_dir, summaries, about)
        log.info(
            f"cross-validation done: mIoU {cv['miou']['mean']:.4f} ± {cv['miou']['std']:.4f} over {k} folds "
            f"(per fold: {', '.join(f'{v:.4f}' for v in cv['miou']['per_fold'])}); {run_dir / 'cv.json'}, "
            f"{run_dir / 'cv.png'}; evaluate/predict/serve {run_dir} use the {k} folds as one ensemble"
        )
    return {
        "run_dir": str(run_dir),
        "best_val_miou": cv["miou"]["mean"],
        "wall_time_s": time.time() - t0,
        "folds": k,
        "cv": cv,
    }


def _time_used(summary: dict) -> float:
    return float(summary.get("time_used_s", summary.get("wall_time_s", 0.0)))


def _run_fold(run_dir: Path, i: int, k: int, options: dict, given: dict, budget, train_fn) -> dict:
    """Fold i: its summary if finished, else resumed from its last.pt or started; budget = what is left
    of the whole budget divided by the folds left."""
    from . import config
    from .budget import format_seconds

    fold_dir = run_dir / f"fold_{i}"
    done = fold_dir / "summary.json"
    if done.is_file():
        log.info(f"fold {i + 1}/{k}: finished earlier ({fold_dir}), kept")
        return json.loads(done.read_text())
    share = None
    if budget:
        used = sum(_time_used(json.loads((run_dir / f"fold_{j}" / "summary.json").read_text())) for j in range(i))
        share = max(budget - used, 1.0) / (k - i)
    if (fold_dir / "last.pt").is_file():
        fold_opts = {"resume": str(fold_dir), **{key: given[key] for key in config.RESUMABLE if key in given}}
        if share and "time_budget" in given:  # a new total budget: this fold's share of what is left
            fold_opts["time_budget"] = share
        what = "resuming"
    else:
        fold_opts = {**options, "folds": k, "fold": i, "run_dir": str(fold_dir)}
        if share:
            fold_opts["time_budget"] = share
        what = "training"
    log.info(f"fold {i + 1}/{k}: {what} {fold_dir}" + (f" (time budget {format_seconds(share)})" if share else ""))
    try:
        summary = train_fn(fold_opts)
    except KeyboardInterrupt as exc:
        raise FoldsInterrupted(run_dir, i, k, getattr(exc, "exit_code", 130)) from None
    log.info(f"fold {i + 1}/{k}: best val mIoU {summary['best_val_miou']:.4f}")
    return summary


class FoldsInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM inside one fold: the command that continues the whole cross-validation."""

    def __init__(self, run_dir: Path, fold: int, k: int, exit_code: int = 130):
        super().__init__()
        self.run_dir, self.fold, self.k, self.exit_code = run_dir, fold, k, exit_code

    def advice(self) -> str:
        return (
            f"interrupted in fold {self.fold + 1}/{self.k}; continue the cross-validation (finished folds are "
            f"kept, this one resumes from its last.pt) with: pixelseg train --resume {self.run_dir}"
        )


# ---- cv.json and cv.png -----------------------------------------------------------------------------
def _stats(values: list) -> dict:
    """Mean and sample standard deviation (ddof=1) of the finite values; NaN (a class absent from a fold's
    held-out images and predictions) is left out, and written as null."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return {
        "mean": float(np.mean(finite)) if finite else None,
        "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else None,
        "per_fold": [float(v) if v is not None and math.isfinite(float(v)) else None for v in values],
    }


def write_cv(run_dir: Path, summaries: list[dict], about: dict) -> dict:
    """RUN/cv.json (per-fold mIoU and per-class IoU at each fold's best epoch, mean ± std) and RUN/cv.png."""
    rows = []
    for i, s in enumerate(summaries):
        metrics = run_dir / f"fold_{i}" / "metrics.json"
        history = json.loads(metrics.read_text()) if metrics.is_file() else []
        if not history:
            raise PixelsegError(
                f"{metrics.parent}: the fold finished without a validated epoch (see its "
                "train.log), so there is nothing to cross-validate; give a larger --time-budget"
            )
        best = max(history, key=lambda h: h["val_miou"])  # first of the maxima: the epoch best.pt holds
        rows.append(
            {
                "fold": i,
                "run_dir": f"fold_{i}",
                "held_out_images": about["fold_images"][i],
                "best_val_miou": s["best_val_miou"],
                "best_epoch": best["epoch"],
                "epochs_done": s.get("epochs_done", len(history)),
                "stop_reason": s.get("stop_reason"),
                "time_s": _time_used(s),
                "val_iou": best["val_iou"],
            }
        )
    classes = list(rows[0]["val_iou"])
    cv = {
        "folds": len(rows),
        "pool": about,
        "std": "sample standard deviation across folds (ddof=1); classes absent from a fold are left out",
        "miou": _stats([r["best_val_miou"] for r in rows]),
        "per_class_iou": {c: _stats([r["val_iou"].get(c) for r in rows]) for c in classes},
        "per_fold": [{k: v for k, v in r.items() if k != "val_iou"} for r in rows],
        "members": [
            {
                "fold": r["fold"],
                "checkpoint": f"fold_{r['fold']}/best.pt",
                "sha256": file_sha256(run_dir / f"fold_{r['fold']}" / "best.pt"),
            }
            for r in rows
        ],
    }
    cv_figure(cv, run_dir / "cv.png")
    atomic_write_text(run_dir / "cv.json", json.dumps(cv, indent=1))
    return cv


def cv_figure(cv: dict, path: Path) -> None:
    """Per-class IoU (mean, std error bars, each fold a dot) beside per-fold mIoU (mean ± std band)."""
    from ..core.viz import _save_fig, plt

    classes = list(cv["per_class_iou"])
    nan = float("nan")
    means = [cv["per_class_iou"][c]["mean"] if cv["per_class_iou"][c]["mean"] is not None else nan for c in classes]
    stds = [cv["per_class_iou"][c]["std"] or 0.0 for c in classes]
    fig, (ax1, ax2) = plt.subplots(
        1,
        2,
        figsize=(max(8.0, 0.6 * len(classes) + 5), 4.0),
        gridspec_kw={"width_ratios": [max(2, len(classes)), max(2, cv["folds"])]},
    )
    x = np.arange(len(classes))
    ax1.bar(x, means, yerr=stds, capsize=4, color="#4c78a8", alpha=0.8, label="mean ± std")
    for j, c in enumerate(classes):
        pts = [v for v in cv["per_class_iou"][c]["per_fold"] if v is not None]
        ax1.plot([j + 0.25] * len(pts), pts, "k.", ms=5, label="one fold" if j == 0 else None)
    ax1.set_xticks(x, classes, rotation=45, ha="right")
    ax1.set(ylim=(0, 1), ylabel="IoU", title="Per-class IoU across folds")
    ax1.legend(fontsize=8)
    m = cv["miou"]
    folds = np.arange(cv["folds"])
    ax2.bar(folds, [v if v is not None else nan for v in m["per_fold"]], color="#f58518", alpha=0.8)
    ax2.axhline(m["mean"], color="k", lw=1, label=f"mean {m['mean']:.3f}")
    if m["std"]:
        ax2.axhspan(m["mean"] - m["std"], m["mean"] + m["std"], color="k", alpha=0.1, label=f"± std {m['std']:.3f}")
    ax2.set_xticks(folds, [f"fold {i}" for i in folds])
    ax2.set(ylim=(0, 1), ylabel="best val mIoU", title="mIoU per fold")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(axis="y", alpha=0.3)
    std = f" ± {m['std']:.3f}" if m["std"] is not None else ""
    fig.suptitle(f"{cv['folds']}-fold cross-validation: mIoU {m['mean']:.3f}{std}")
    _save_fig(fig, path)

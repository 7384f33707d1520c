"""Checkpoints that survive kills and never execute pickled code, and their schema.

Writes go through ``files.atomic_file`` (temp file in the same directory, fsync, os.replace): a kill at
any moment leaves either the old or the new file, never a truncated one. Loading uses weights_only=True.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import PixelsegError
from .files import atomic_file

# ---- the schema: what a checkpoint holds (train writes it, loading/inference/export/serving read it) ----------
# Every checkpoint (best.pt, last.pt): MODEL_KEYS. last.pt adds TRAINING_KEYS, what --resume restores.
MODEL_KEYS = (
    "pixelseg_version",
    "model",
    "model_config",
    "dataset",
    "config",
    "epoch",
    "global_step",
    "best_miou",
    "metrics",
    "time_used_s",
    "timing",
    "encoder_weights",
)
TRAINING_KEYS = ("optimizer", "scheduler", "scaler", "step_in_epoch", "history", "rng")


def model_checkpoint(model, info, cfg: dict, **fields) -> dict:
    """The part every checkpoint holds: weights, the model's config (to rebuild it), the dataset's classes and
    palette, and the run's config; ``fields``: the rest of MODEL_KEYS / TRAINING_KEYS."""
    from .._version import __version__

    out = {
        "pixelseg_version": __version__,
        "model": model.state_dict(),
        "model_config": model.config,
        "dataset": info.to_dict(),
        "config": cfg,
        # where the encoder's starting weights came from: package + version + sha256, hub file, or a path
        "encoder_weights": getattr(model, "weights_source", None),
    }
    out.update(fields)
    return out


def atomic_save(obj, path: Path) -> None:
    with atomic_file(path) as f:
        torch.save(obj, f)


def load_checkpoint(path: Path | str) -> dict:
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            if (path / MANIFEST).is_file():  # a `train --folds` run: its folds as one ensemble
                return load_ensemble(path)
            raise PixelsegError(f"{path}: no best.pt or last.pt in this run directory; pass a checkpoint file")
    if not path.is_file():
        raise PixelsegError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PixelsegError(_unreadable(path, exc)) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:  # MODEL_KEYS' core
        raise PixelsegError(
            f"{path}: not a pixelseg checkpoint (missing 'model'/'model_config'); "
            "to start from plain encoder weights use --weights PATH"
        )
    ckpt["path"] = str(path)
    return ckpt


def _unreadable(path: Path, exc: Exception) -> str:
    """One line for a file torch.load(weights_only=True) refused: which kind of problem, and what to do.

    PyTorch's own text is long and its advice (weights_only=False) would run pickled code."""
    text = str(exc)
    size = path.stat().st_size
    if "Weights only load failed" in text or "Unsupported global" in text:
        return (
            f"{path}: not a pixelseg checkpoint: it holds Python objects beyond tensors, and pixelseg never "
            "runs pickled code (weights_only=True); load it yourself and save only the state dict, or train "
            "with pixelseg to get best.pt/last.pt"
        )
    return (
        f"{path}: not a pixelseg checkpoint: the file ({size} bytes) is corrupt, truncated (an interrupted "
        "copy or download?) or not a PyTorch file at all; copy it again, or use the best.pt/last.pt that "
        "`pixelseg train` wrote in its run directory"
    )


# a `train --folds K` run directory: its manifest, and what every fold's checkpoint must share to form one model
MANIFEST = "folds.json"
MUST_AGREE = (
    ("dataset", "class_names"),
    ("dataset", "ignore_index"),
    ("model_config", "num_classes"),
    ("model_config", "in_channels"),
    ("config", "image_size"),
    ("config", "rgb_bands"),
)


# ---- the folds as one model ---------------------------------------------------------------------------
def load_ensemble(run_dir: Path) -> dict:
    """checkpoint.load_checkpoint's branch for a folds run dir: the first fold's checkpoint dict (classes,
    input size, config) with every fold's in ``members`` (loading.load_model makes them an Ensemble) and
    ``path`` RUN/cv.json, whose hash changes with any member's weights."""
    run_dir = Path(run_dir)
    try:
        manifest = json.loads((run_dir / MANIFEST).read_text())
        k = int(manifest["folds"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PixelsegError(
            f"{run_dir / MANIFEST}: unreadable ({exc}); pass one fold's checkpoint, e.g. "
            f"{run_dir / 'fold_0' / 'best.pt'}"
        ) from None
    missing = [i for i in range(k) if not (run_dir / f"fold_{i}" / "best.pt").is_file()]
    if missing or not (run_dir / "cv.json").is_file():
        raise PixelsegError(
            f"{run_dir}: cross-validation not finished (folds without best.pt: "
            f"{', '.join(map(str, missing)) or 'none'}; no cv.json yet); continue it with "
            f"pixelseg train --resume {run_dir}, or pass one fold, e.g. {run_dir / 'fold_0'}"
        )
    members = [load_checkpoint(run_dir / f"fold_{i}" / "best.pt") for i in range(k)]
    for i, m in enumerate(members[1:], 1):
        for part, key in MUST_AGREE:
            a, b = members[0][part].get(key), m[part].get(key)
            if a != b:
                raise PixelsegError(
                    f"{run_dir}: fold_{i}/best.pt and fold_0/best.pt differ in {part}.{key} "
                    f"({b!r} vs {a!r}); an ensemble's members must share classes and input, so "
                    "evaluate them one by one"
                )
    return {
        **members[0],
        "path": str(run_dir / "cv.json"),
        "members": members,
        "pool_splits": list(manifest.get("pool", {}).get("splits", [])),
    }

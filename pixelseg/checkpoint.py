"""Checkpoints that survive kills and never execute pickled code.

Writes go to a temp file in the same directory, fsync, then os.replace: a kill at any moment leaves
either the old or the new file, never a truncated one. Loading uses weights_only=True.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch

from .errors import PixelsegError


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _atomic_file(path: Path):
    """Yield a temp file beside `path`; on success fsync and rename it onto `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make outputs private, unlike open()'s files
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ---- the schema: what a checkpoint holds (train writes it, loading/inference/export/serving read it) ----------
# Every checkpoint (best.pt, last.pt): MODEL_KEYS. last.pt adds TRAINING_KEYS, what --resume restores.
MODEL_KEYS = ("pixelseg_version", "model", "model_config", "dataset", "config", "epoch", "global_step", "best_miou",
              "metrics", "time_used_s", "timing")
TRAINING_KEYS = ("optimizer", "scheduler", "scaler", "step_in_epoch", "history", "rng")


def model_checkpoint(model, info, cfg: dict, **fields) -> dict:
    """The part every checkpoint holds: weights, the model's config (to rebuild it), the dataset's classes and
    palette, and the run's config; ``fields``: the rest of MODEL_KEYS / TRAINING_KEYS."""
    from . import __version__
    out = {"pixelseg_version": __version__, "model": model.state_dict(), "model_config": model.config,
           "dataset": info.to_dict(), "config": cfg}
    out.update(fields)
    return out


def atomic_save(obj, path: Path) -> None:
    with _atomic_file(path) as f:
        torch.save(obj, f)


def load_checkpoint(path: Path | str) -> dict:
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise PixelsegError(f"{path}: no best.pt or last.pt in this run directory; pass a checkpoint file")
    if not path.is_file():
        raise PixelsegError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PixelsegError(_unreadable(path, exc)) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:  # MODEL_KEYS' core
        raise PixelsegError(f"{path}: not a pixelseg checkpoint (missing 'model'/'model_config'); "
                            "to start from plain encoder weights use --weights PATH")
    ckpt["path"] = str(path)
    return ckpt


def _unreadable(path: Path, exc: Exception) -> str:
    """One line for a file torch.load(weights_only=True) refused: which kind of problem, and what to do.

    PyTorch's own text is long and its advice (weights_only=False) would run pickled code."""
    text = str(exc)
    size = path.stat().st_size
    if "Weights only load failed" in text or "Unsupported global" in text:
        return (f"{path}: not a pixelseg checkpoint: it holds Python objects beyond tensors, and pixelseg never "
                "runs pickled code (weights_only=True); load it yourself and save only the state dict, or train "
                "with pixelseg to get best.pt/last.pt")
    return (f"{path}: not a pixelseg checkpoint: the file ({size} bytes) is corrupt, truncated (an interrupted "
            "copy or download?) or not a PyTorch file at all; copy it again, or use the best.pt/last.pt that "
            "`pixelseg train` wrote in its run directory")


def check_output_dir(path, flag: str) -> Path:
    """Refuse, before any work, an output directory that cannot exist: a file in its place or on its path,
    or a parent we may not write in. Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PixelsegError(f"{flag} {path}: a file with that name exists; {flag} names a directory, so choose "
                            "another name or move the file")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PixelsegError(f"{flag} {path}: {existing} is a file, so no directory can be made under it")
    if existing != path and not os.access(existing, os.W_OK | os.X_OK):
        raise PixelsegError(f"{flag} {path}: no permission to create it in {existing}; choose a directory you "
                            "can write to")
    return path


def make_output_dir(path, flag: str) -> Path:
    """Create an output directory (and parents) and prove a file can be written there; on failure remove
    whatever this call created and raise a one-line PixelsegError naming the flag."""
    path = check_output_dir(path, flag)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".pixelseg-write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        for d in missing:  # deepest first: nothing half-made is left behind
            with contextlib.suppress(OSError):
                d.rmdir()
        raise PixelsegError(f"{flag} {path}: cannot create or write there ({exc.strerror or exc}); choose a "
                            "directory on a writable file system") from None
    return path

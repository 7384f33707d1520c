"""`pixelseg predict`: masks for image files at their own resolution (+ overlays, uncertainty maps, and
pre-annotations for a labelling tool); every input is checked before anything is written."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core import viz
from ..core.errors import PixelsegError
from ..core.files import check_output_dir, make_output_dir
from ..core.metrics import class_ids
from ..core.progress import progress as progress_bar
from ..data import DatasetInfo
from ..data.io import UnreadableImage, collect_images, read_input
from .runner import mc_uncertainty, open_model, resolve_backend
from .tiling import tile_scale_warning

RANK_MC_SAMPLES = 8  # --rank uncertainty on a model with dropout, when --mc-samples is not given


def _decode_all(files: list[Path], keep_bytes: int = 1 << 30, channels: int = 3, exif_transpose: bool = False) -> list:
    """Decode every input before anything is written, so a bad file fails the command with no partial
    output; arrays are kept for reuse only up to `keep_bytes` (big photos are decoded again later)."""
    kept, total = [], 0
    for f in files:
        try:
            img = read_input(f, channels, exif_transpose=exif_transpose)
        except UnreadableImage as exc:
            raise PixelsegError(f"{exc}; pass only image files (JPEG, PNG, ...) to predict") from exc
        total += img.nbytes
        kept.append(img if total <= keep_bytes else None)
    return kept


@torch.no_grad()
def predict(
    run_or_ckpt,
    images,
    out_dir,
    device="auto",
    precision="auto",
    mc_samples=0,
    progress=True,
    tile=None,
    overlap=0.25,
    tta=False,
    backend="auto",
    format=None,
    shapes="polygon",
    min_area=16,
    rank=None,
    image_url=None,
    keep_exif_grid=False,
) -> list[dict]:
    """For each image: class mask at the original resolution (palette PNG) + colour overlay
    (+ uncertainty heatmaps with --mc-samples). All inputs are checked before anything is written.

    Resolution: resize to the training size and back (default), or sliding windows at native scale
    (`tile`), optionally averaged over test-time augmentations (`tta`: True for the flip, or a `TTA`).
    `backend="onnx"` runs a file written by `pixelseg export` under onnxruntime instead of the checkpoint
    under PyTorch. Photos are turned upright as their EXIF Orientation says (masks fit the image as people
    see it) unless `keep_exif_grid`.

    `format` (coco, cvat, labelstudio, yolo) also writes the masks as pre-annotations for that tool, and
    `rank="uncertainty"` writes ranking.csv/json, the images most uncertain first (pixelseg.labels.write)."""
    from ..labels import write as pre

    backend = resolve_backend(backend, run_or_ckpt)
    check_output_dir(out_dir, "--out")  # before any work; created only once every input has been read
    pre.check_options(format, shapes, min_area)
    mc = _check_options(backend, mc_samples, tile, tta, rank)
    runner = open_model(run_or_ckpt, device, precision, tile, overlap, tta, backend)
    info, size, model, predictor = runner.info, runner.size, runner.model, runner.predictor
    dev, amp, window = runner.device, runner.amp, predictor.tile
    files = collect_images(images)
    decoded = _decode_all(files, channels=runner.channels, exif_transpose=not keep_exif_grid)
    if rank and not mc and not (tile or tta) and runner.mc_dropout:
        mc_samples, mc = RANK_MC_SAMPLES, True  # rank by MC dropout where the model can sample
    _warn_tile_scale(decoded, size, window)
    out = make_output_dir(out_dir, "--out")
    results, regions = [], []
    for f, img in progress_bar(list(zip(files, decoded, strict=True)), desc="predict", unit="img", enabled=progress):
        img = img if img is not None else read_input(f, runner.channels, exif_transpose=not keep_exif_grid)
        entry: dict[str, Any] = {
            "image": str(f),
            "mode": "mc-dropout" if mc else predictor.describe(),
            "backend": runner.backend,
        }
        if mc:
            probs = _write_mc_maps(model, img, size, dev, amp, mc_samples, info, out / f.stem, entry)
        else:
            probs = predictor(img, probs=bool(format or rank))  # the softmax only when it is read
        mask = class_ids(probs)[0].to(torch.uint8).cpu().numpy()
        _write_mask(img, mask, info, runner.bands, out / f.stem, entry)
        if format or rank:
            from .calibration import softmax_entropy

            unc = entry["mean_entropy"] if mc else float(softmax_entropy(probs).mean())
            top = probs[0].float().amax(0).cpu().numpy()
            r = pre.image_regions(f, mask, top, info.class_names, unc, shapes if format else None, min_area)
            regions.append(r)
            entry["uncertainty"] = r.uncertainty
        results.append(entry)
    if format:
        _write_pre_annotations(run_or_ckpt, format, regions, info, out, shapes, image_url, results[0])
    if rank:
        method = f"mc-dropout entropy ({mc_samples} samples)" if mc else "softmax entropy"
        results[0]["ranking"] = [str(p) for p in pre.write_ranking(regions, out, method)]
        results[0]["rank_method"] = method
    return results


def _check_options(backend: str, mc_samples, tile, tta, rank) -> bool:
    """One line for option combinations predict cannot run; whether MC dropout samples."""
    if rank not in (None, "uncertainty"):
        raise PixelsegError(f"--rank {rank}: the one ranking is 'uncertainty'")
    mc = bool(mc_samples and mc_samples > 1)
    if mc and (backend != "torch" or tile or tta):
        raise PixelsegError(
            "--mc-samples runs the PyTorch model with dropout on, at the training resolution; it cannot be "
            "combined with "
            + (
                "--backend onnx (the exported graph has no dropout)"
                if backend == "onnx"
                else "--tile, --tta or --tta-scales"
            )
        )
    return mc


def _warn_tile_scale(decoded: list, size, window) -> None:
    """On stderr: images so much larger than the training size that resizing (or these tiles) loses detail."""
    shapes = [(img.shape[0], img.shape[1]) for img in decoded if img is not None]
    largest = max(shapes, default=None, key=lambda hw: hw[0] * hw[1])
    warning = tile_scale_warning(largest, size, window) if largest else None
    if warning:
        print(warning, file=sys.stderr)


def _write_pre_annotations(
    run_or_ckpt, format: str, regions: list, info: DatasetInfo, out: Path, shapes: str, image_url, first: dict
) -> None:
    """predict --format: the masks as pre-annotations of a labelling tool; the files in `first`["files"]."""
    from ..labels import write as pre

    model_version = f"pixelseg-{Path(run_or_ckpt).name}-{_short_hash(run_or_ckpt)}"
    first["files"] = [
        str(p)
        for p in pre.write(
            format,
            regions,
            info.class_names,
            info.palette,
            out,
            shapes=shapes,
            model_version=model_version,
            image_url=image_url,
        )
    ]


def _write_mc_maps(model, img, size, dev, amp, mc_samples: int, info: DatasetInfo, stem: Path, entry: dict):
    """MC dropout on one image: <stem>_entropy.png and <stem>_variance.png, their means in `entry`; the mean
    probabilities."""
    probs, maps = mc_uncertainty(model, img, size, dev, amp, mc_samples)
    for key, m in maps.items():
        vmax = float(np.log(info.num_classes)) if key == "entropy" else None
        viz.heatmap_png(m.cpu().numpy(), stem.parent / f"{stem.name}_{key}.png", vmax=vmax)
        entry[f"mean_{key}"] = float(m.mean())
    return probs


def _write_mask(img, mask, info: DatasetInfo, bands, stem: Path, entry: dict) -> None:
    """<stem>.png (palette PNG of class ids) and <stem>_overlay.png; the mask's path and class shares in `entry`."""
    out, name = stem.parent, stem.name
    viz.save_index_png(mask, info.palette, out / f"{name}.png")
    overlay = viz.overlay(viz.rgb_view(img, bands), mask, info.palette)
    viz.save_rgb_png(viz.with_legend(overlay, mask, info.palette, info.class_names), out / f"{name}_overlay.png")
    entry["mask"] = str(out / f"{name}.png")
    entry["class_fraction"] = {n: float((mask == i).mean()) for i, n in enumerate(info.class_names)}


def _short_hash(run_or_ckpt) -> str:
    """8 hex digits of the checkpoint file: tells Label Studio's model versions apart."""
    from ..core.files import file_sha256

    p = Path(run_or_ckpt)
    if p.is_dir():  # a run's best.pt, or a --folds run's cv.json (it holds its members' hashes)
        p = p / "best.pt" if (p / "best.pt").is_file() else p / "cv.json"
    return file_sha256(p)[:8] if p.is_file() else "unknown"

"""Evaluate a checkpoint on a split, and predict masks for image files at their own resolution."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import viz
from .checkpoint import atomic_write_text, load_checkpoint
from .data import DatasetInfo, collate_batch, load_split
from .data.io import UnreadableImage, read_image
from .errors import PixelsegError
from .models import create_model
from .runtime import autocast, resolve_precision, select_device, to_model_input

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def load_model(ckpt: dict, device: torch.device):
    """Rebuild the architecture from the checkpoint's own config and load its weights."""
    cfg = dict(ckpt["model_config"])
    cfg["weights"] = None
    model = create_model(**cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:200]
        raise PixelsegError(f"{ckpt['path']}: weights do not fit {cfg.get('arch')}/{cfg.get('backbone')} with "
                            f"{cfg.get('num_classes')} classes ({first}); was the file edited or produced by "
                            "another tool?") from exc
    return model.to(device).eval()


def _input_size(ckpt: dict) -> tuple[int, int]:
    s = ckpt["config"].get("image_size", 128)
    return (s, s) if isinstance(s, int) else tuple(s)


def evaluate(run_or_ckpt, data_root=None, split=None, dataset=None, limit=None, device="auto",
             precision="auto", out_dir=None, batch_size=32, progress=True) -> dict:
    ckpt = load_checkpoint(run_or_ckpt)
    cfg = ckpt["config"]
    dataset = dataset or cfg["dataset"]
    split = split or cfg["val_split"]
    root = data_root if data_root is not None else cfg.get("data_root")
    dev = select_device(device)
    amp = resolve_precision(precision, dev)
    size = _input_size(ckpt)
    ds = load_split(dataset, root, split, size, limit, use_cache=cfg.get("cache", True))
    num_classes = ckpt["model_config"]["num_classes"]
    if ds.info.num_classes != num_classes:
        raise PixelsegError(f"{ckpt['path']}: the model predicts {num_classes} classes but dataset {dataset} has "
                            f"{ds.info.num_classes} ({', '.join(ds.info.class_names)}); evaluate it on the dataset "
                            "it was trained for")
    model = load_model(ckpt, dev)
    from .train import evaluate_model
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate_batch)
    cm, _ = evaluate_model(model, loader, dev, amp, num_classes, ds.info.ignore_index,
                           cfg.get("channels_last", True), progress=progress, desc=f"evaluate {split}")
    scores = cm.compute()
    result = {
        "checkpoint": ckpt["path"], "dataset": dataset, "split": split, "images": len(ds),
        "resolution": f"{size[0]}x{size[1]} (training resolution)",
        "skipped_files": ds.skipped,
        "pixel_acc": scores["pixel_acc"], "mean_class_acc": scores["mean_class_acc"], "miou": scores["miou"],
        "mean_dice": scores["mean_dice"],
        "per_class": {n: {"iou": i, "dice": d, "acc": a} for n, i, d, a in
                      zip(ds.info.class_names, scores["iou"], scores["dice"], scores["class_acc"])},
        "confusion_matrix": cm.mat.cpu().tolist(),
    }
    out = Path(out_dir) if out_dir else Path(ckpt["path"]).parent
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"eval_{split}.json", json.dumps(result, indent=1))
    viz.confusion_figure(cm.mat.cpu().numpy(), ds.info.class_names, out / f"confusion_{split}.png",
                         f"{dataset} {split}: mIoU {scores['miou']:.3f}")
    result["out_dir"] = str(out)
    return result


def format_scores(result: dict) -> str:
    lines = [f"{result['dataset']} / {result['split']}: {result['images']} images at {result['resolution']}",
             f"pixel accuracy {result['pixel_acc']:.4f} | mean class accuracy {result['mean_class_acc']:.4f} | "
             f"mIoU {result['miou']:.4f} | mean Dice {result['mean_dice']:.4f}",
             f"{'class':<16}{'IoU':>8}{'Dice':>8}{'acc':>8}"]
    for name, s in result["per_class"].items():
        lines.append(f"{name:<16}{s['iou']:>8.4f}{s['dice']:>8.4f}{s['acc']:>8.4f}")
    return "\n".join(lines)


def _collect_images(paths) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            files.append(p)
        else:
            raise PixelsegError(f"{p}: no such file or directory")
    if not files:
        raise PixelsegError(f"no images found in {', '.join(map(str, paths))}")
    return files


@torch.no_grad()
def predict(run_or_ckpt, images, out_dir, device="auto", precision="auto", mc_samples=0, progress=True) -> list[dict]:
    """For each image: class mask at the original resolution (palette PNG) + colour overlay
    (+ uncertainty heatmaps with --mc-samples). All inputs are checked before anything is written."""
    ckpt = load_checkpoint(run_or_ckpt)
    info = DatasetInfo.from_dict(ckpt["dataset"])
    files = _collect_images(images)
    decoded = []
    for f in files:  # decode everything first: a bad file fails the command before any output exists
        try:
            decoded.append(read_image(f))
        except UnreadableImage as exc:
            raise PixelsegError(f"{exc}; pass only image files (JPEG, PNG, ...) to predict") from exc
    dev = select_device(device)
    amp = resolve_precision(precision, dev)
    model = load_model(ckpt, dev)
    size = _input_size(ckpt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for f, img in tqdm(list(zip(files, decoded)), desc="predict", unit="img", disable=not progress or None):
        h, w = img.shape[:2]
        x = torch.from_numpy(img).permute(2, 0, 1)[None]
        x = to_model_input(x, dev, True)
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        entry = {"image": str(f)}
        if mc_samples and mc_samples > 1:
            from .models import mc_predict
            with autocast(dev, amp):
                r = mc_predict(model, x, mc_samples)
            probs = F.interpolate(r["mean"].float(), size=(h, w), mode="bilinear", align_corners=False)
            for key in ("entropy", "variance"):
                m = F.interpolate(r[key].float()[:, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
                vmax = float(np.log(info.num_classes)) if key == "entropy" else None
                viz.heatmap_png(m.cpu().numpy(), out / f"{f.stem}_{key}.png", vmax=vmax)
                entry[f"mean_{key}"] = float(m.mean())
        else:
            with autocast(dev, amp):
                logits = model(x)
            probs = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)
        mask = probs.argmax(1)[0].to(torch.uint8).cpu().numpy()
        viz.save_index_png(mask, info.palette, out / f"{f.stem}.png")
        viz.save_rgb_png(viz.overlay(img, mask, info.palette), out / f"{f.stem}_overlay.png")
        entry["mask"] = str(out / f"{f.stem}.png")
        entry["class_fraction"] = {n: float((mask == i).mean()) for i, n in enumerate(info.class_names)}
        results.append(entry)
    return results

"""`pixelseg evaluate`: score a checkpoint, a `--folds` run or an export on a split — at the training size or
each image's own resolution — with per-class IoU, confusion matrix and, on request, calibration."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..core import viz
from ..core.checkpoint import load_checkpoint
from ..core.errors import PixelsegError
from ..core.files import atomic_write_text, check_output_dir, make_output_dir
from ..core.metrics import ConfusionMatrix, class_ids
from ..core.progress import progress as progress_bar
from ..core.runtime import resolve_precision, select_device
from ..data import DatasetInfo, dataset_info, dataset_options, iter_full_res, load_split
from ..data.loader import make_loader
from ..training import loop
from ..training.loop import RunContext
from .loading import input_size, load_model, model_channels, recorded_data_root
from .runner import resolve_backend, tile_size
from .tiling import TTA, Predictor, TTAModel, as_tta, tile_scale_warning, torch_logits_fn


@dataclass
class EvalOptions:
    """What `pixelseg evaluate` scores and how: one field per flag (None = what the run recorded)."""

    data_root: str | None = None
    split: str | None = None
    dataset: str | None = None
    limit: int | None = None
    device: str = "auto"
    precision: str = "auto"
    out_dir: str | None = None
    batch_size: int = 32
    progress: bool = True
    full_res: bool = False
    tile: object = None
    overlap: float = 0.25
    tta: bool | TTA = False  # True: the flip alone
    uncertainty: bool = False
    mc_samples: int = 0
    backend: str = "torch"
    exported: str | None = None


def _warn_if_pooled(ckpt: dict, dataset: str, split: str) -> None:
    """A --folds ensemble scored on a split its folds trained on: say the score is optimistic."""
    if split in ckpt.get("pool_splits", ()) and dataset == ckpt["config"]["dataset"]:
        tqdm.write(
            f"warning: every image of split {split!r} was in the cross-validation pool, so each fold model "
            "trained on most of them and this score is optimistic; the out-of-fold scores are in "
            f"{ckpt['path']}",
            file=sys.stderr,
        )


def evaluate(run_or_ckpt, options: EvalOptions | None = None, **fields) -> dict:
    """Score a checkpoint on a split: at the training resolution (default, what training reports), or with
    `full_res` at each image's own resolution against the original-size masks (the honest number).

    `uncertainty` (or `mc_samples` > 0, which needs dropout in the model) adds the calibration report of
    `pixelseg.inference.calibration`: softmax-entropy uncertainty of the deterministic pass and, with `mc_samples`,
    Monte-Carlo dropout's predictive entropy and variance; scores stay those of the deterministic pass.

    `backend` "onnx"/"openvino" scores the `exported` file made from this run instead of the PyTorch model
    (the run still says which dataset and split). Options: an `EvalOptions`, and/or its fields by keyword."""
    o = dataclasses.replace(options or EvalOptions(), **fields)
    ckpt = load_checkpoint(run_or_ckpt)
    runner = _exported_runner(o.backend, o.exported, bool(o.uncertainty or o.mc_samples))
    if o.out_dir:
        check_output_dir(o.out_dir, "--out")
    cfg = ckpt["config"]
    dataset = o.dataset or cfg["dataset"]
    split = o.split or cfg["val_split"]
    _warn_if_pooled(ckpt, dataset, split)
    root = o.data_root if o.data_root is not None else recorded_data_root(ckpt)
    data = _EvalData(dataset, root, split, o.limit, dataset_options(cfg) if dataset == cfg["dataset"] else {})
    dev = select_device(o.device)
    ctx = RunContext(dev, resolve_precision(o.precision, dev), cfg.get("channels_last", True))
    size = input_size(ckpt)
    window = tile_size(o.tile, size)
    if window and not o.full_res:
        raise PixelsegError("--tile needs --full-res: at the training resolution every image is already one window")
    mc_samples = int(o.mc_samples or 0)
    uncertainty = bool(o.uncertainty or mc_samples)
    if mc_samples < 0:
        raise PixelsegError(f"--mc-samples {mc_samples}: must be >= 0")
    tta = as_tta(o.tta)
    if uncertainty and (o.full_res or tta):
        raise PixelsegError(
            "--uncertainty/--mc-samples are measured at the training resolution without TTA; "
            "drop --full-res/--tta/--tta-scales"
        )
    unc = None
    if o.full_res:
        cm, info, n_images, skipped, resolution = _score_full_res(ckpt, runner, data, ctx, size, window, o)
        tag = f"{split}_fullres" + ("_tile" if window else "") + tta.tag()
    else:
        cm, unc, info, n_images, skipped = _score_at_training_size(
            ckpt, runner, data, ctx, size, o, uncertainty, mc_samples
        )
        resolution = f"{size[0]}x{size[1]} (training resolution{', ' + tta.describe() if tta else ''})"
        tag = split + tta.tag()
    scores = cm.compute()
    result = {
        "checkpoint": ckpt["path"],
        "dataset": dataset,
        "split": split,
        "images": n_images,
        "resolution": resolution,
        "full_res": bool(o.full_res),
        "tile": list(window) if window else None,
        "tta": tta.flip,
        "tta_scales": list(tta.scales),
        "skipped_files": skipped,
        "pixel_acc": scores["pixel_acc"],
        "mean_class_acc": scores["mean_class_acc"],
        "miou": scores["miou"],
        "mean_dice": scores["mean_dice"],
        "per_class": {
            n: {"iou": i, "dice": d, "acc": a}
            for n, i, d, a in zip(info.class_names, scores["iou"], scores["dice"], scores["class_acc"], strict=False)
        },
        "confusion_matrix": cm.mat.cpu().tolist(),
    }
    return _write_eval(result, ckpt, cm, info, scores, tag, unc, mc_samples, window, o)


@dataclass
class _EvalData:
    """The split being scored."""

    dataset: str
    root: str | Path | None
    split: str
    limit: int | None
    options: dict


def _score_full_res(ckpt, runner, data: _EvalData, ctx: RunContext, size, window, o: EvalOptions):
    """Each image at its own resolution against its original-size mask: (cm, info, images, skipped, resolution)."""
    dataset, root, split, limit, options = data.dataset, data.root, data.split, data.limit, data.options
    dev, amp, channels_last = ctx.device, ctx.amp_dtype, ctx.channels_last
    num_classes = ckpt["model_config"]["num_classes"]
    skipped: list[str] = []
    info = dataset_info(dataset, root, split=split, **options)
    _check_classes(ckpt, info, dataset, num_classes)
    model = runner or load_model(ckpt, dev, amp, channels_last)
    predictor = Predictor(
        runner or torch_logits_fn(model, dev, amp, channels_last),
        size,
        window,
        o.overlap,
        o.tta,
        batch_size=min(o.batch_size, 16),
        device=dev,
    )
    cm = ConfusionMatrix(num_classes, info.ignore_index, device=dev)
    n_images = 0
    warned = False
    for _, img, target in progress_bar(
        iter_full_res(dataset, root, split, size, limit, skipped, channels=model_channels(ckpt), **options),
        total=limit,
        desc=f"evaluate {split} (full resolution)",
        unit="img",
        enabled=o.progress,
    ):
        if not warned:
            warned = True
            warning = tile_scale_warning(img.shape[:2], size, window)
            if warning:
                tqdm.write(warning, file=sys.stderr)
        cm.update(class_ids(predictor(img, probs=False)), torch.from_numpy(target).to(dev))
        n_images += 1
    if n_images == 0:
        raise PixelsegError(f"dataset {dataset} split {split!r} at {root} has no readable images")
    return cm, info, n_images, skipped, f"full resolution (each image's own size; {predictor.describe()})"


def _score_at_training_size(
    ckpt, runner, data: _EvalData, ctx: RunContext, size, o: EvalOptions, uncertainty: bool, mc_samples: int
):
    """The split at the training resolution, as training scores it: (cm, uncertainty report, info, images, skipped)."""
    cfg = ckpt["config"]
    ds = load_split(
        data.dataset,
        data.root,
        data.split,
        size,
        data.limit,
        use_cache=cfg.get("cache", "mmap"),
        channels=model_channels(ckpt),
        **data.options,
    )
    info, n_images, skipped = ds.info, len(ds), ds.skipped
    _check_classes(ckpt, info, data.dataset, ckpt["model_config"]["num_classes"])
    model = runner or load_model(ckpt, ctx.device, ctx.amp_dtype, ctx.channels_last)
    loader, _ = make_loader(ds, o.batch_size)  # every sample once, in order (shards: in stream order)
    unc = None
    if uncertainty:
        cm, unc = _uncertainty_pass(model, loader, ctx, info, mc_samples, o.progress, ckpt["path"], data.split)
    else:
        cm, _ = loop.evaluate_loader(
            TTAModel(model, o.tta) if as_tta(o.tta) else model,
            loader,
            ctx,
            info,
            progress=o.progress,
            desc=f"evaluate {data.split}",
        )
    return cm, unc, info, n_images, skipped


def _write_eval(result: dict, ckpt, cm, info, scores, tag: str, unc, mc_samples: int, window, o: EvalOptions):
    """eval_<tag>.json, confusion_<tag>.png (and the reliability figure) in --out or next to the checkpoint."""
    dataset, split = result["dataset"], result["split"]
    out = make_output_dir(Path(o.out_dir) if o.out_dir else Path(ckpt["path"]).parent, "--out")
    extra_files = []
    if unc is not None:
        from .calibration import reliability_figure

        sources = unc.pop("_stats")
        result["uncertainty"] = unc
        tag_u = f"{tag}_mc{mc_samples}" if mc_samples else tag
        fig = out / f"uncertainty_{tag_u}.png"
        reliability_figure(
            sources,
            fig,
            f"{ckpt['model_config'].get('arch')}/{ckpt['model_config'].get('backbone')}"
            f" on {dataset} {split}" + (f", {mc_samples} MC-dropout samples" if mc_samples else ""),
        )
        extra_files.append(str(fig))
        tag = tag_u
    atomic_write_text(out / f"eval_{tag}.json", json.dumps(result, indent=1))
    viz.confusion_figure(
        cm.mat.cpu().numpy(),
        info.class_names,
        out / f"confusion_{tag}.png",
        f"{dataset} {split}: mIoU {scores['miou']:.3f}"
        + (" (full resolution)" if o.full_res else "")
        + (f" with {as_tta(o.tta).describe()}" if as_tta(o.tta) else "")
        + (f", tiles {window[0]}x{window[1]}" if window else ""),
    )
    result["out_dir"] = str(out)
    result["files"] = [str(out / f"eval_{tag}.json"), str(out / f"confusion_{tag}.png"), *extra_files]
    return result


@torch.no_grad()
def _uncertainty_pass(
    model, loader, ctx: RunContext, info: DatasetInfo, mc_samples: int, progress: bool, ckpt_path, split: str
):
    """One pass over the split (loop.py's evaluation loop): confusion matrix of the deterministic prediction
    plus the calibration statistics of `pixelseg.inference.calibration` for it (softmax entropy) and, with `mc_samples`,
    for MC dropout."""
    from ..core.metrics import scores_from_confusion
    from ..models.uncertainty import has_dropout, mc_predict
    from .calibration import UncertaintyStats, entropy_range, softmax_entropy

    c, dev = info.num_classes, ctx.device
    if mc_samples and not has_dropout(model):
        raise PixelsegError(
            f"{ckpt_path}: this model has no dropout layers, so --mc-samples has nothing to sample; "
            "use --uncertainty for the softmax-entropy report of a plain model"
        )
    cm = ConfusionMatrix(c, info.ignore_index, device=dev)
    cm_mc = ConfusionMatrix(c, info.ignore_index, device=dev)
    single = UncertaintyStats({"entropy": entropy_range(c)}, device=dev)
    mc = (
        UncertaintyStats({"entropy": entropy_range(c), "variance": (1 - 1 / c) / c}, device=dev) if mc_samples else None
    )

    def on_batch(x, y, logits):
        probs = logits.softmax(1)
        cm.update(class_ids(probs), y)
        single.update(probs, y, info.ignore_index, {"entropy": softmax_entropy(probs)})
        if mc is not None:
            with ctx.autocast():
                r = mc_predict(model, x, mc_samples)
            mean = r["mean"].float()
            cm_mc.update(class_ids(mean), y)
            mc.update(mean, y, info.ignore_index, {"entropy": r["entropy"].float(), "variance": r["variance"].float()})

    loop.evaluate_loader(model, loader, ctx, info, progress=progress, desc=f"uncertainty {split}", on_batch=on_batch)
    report: dict[str, Any] = {
        "mc_samples": mc_samples,
        "softmax": single.summary(),
        "_stats": {"softmax (1 pass)": single},
    }
    if mc is not None:
        s = scores_from_confusion(cm_mc.mat)
        report["mc"] = mc.summary()
        report["mc"].update({"mean_class_acc": s["mean_class_acc"], "miou": s["miou"]})
        report["_stats"][f"MC dropout ({mc_samples})"] = mc
    return cm, report


def _exported_runner(backend: str, exported, uncertainty: bool):
    """None for the PyTorch model, else the exported file's callable (used where the model would be)."""
    if backend == "torch" and not exported:
        return None
    if not exported or resolve_backend(backend, exported) == "torch":
        raise PixelsegError(
            f"--backend {backend} scores an exported file: pass --exported FILE (.onnx or .xml "
            "from `pixelseg export` of this run)"
        )
    if uncertainty:
        raise PixelsegError("--uncertainty/--mc-samples need the PyTorch model; drop --exported")
    if resolve_backend(backend, exported) == "openvino":
        from .openvino import OpenVinoModel

        return OpenVinoModel(exported)
    from .loading import OnnxModel

    return OnnxModel(exported)


def _check_classes(ckpt: dict, info: DatasetInfo, dataset: str, num_classes: int) -> None:
    if info.num_classes != num_classes:
        raise PixelsegError(
            f"{ckpt['path']}: the model predicts {num_classes} classes but dataset {dataset} has "
            f"{info.num_classes} ({', '.join(info.class_names)}); evaluate it on the dataset "
            "it was trained for"
        )


def format_scores(result: dict) -> str:
    lines = [
        f"{result['dataset']} / {result['split']}: {result['images']} images at {result['resolution']}",
        f"pixel accuracy {result['pixel_acc']:.4f} | mean class accuracy {result['mean_class_acc']:.4f} | "
        f"mIoU {result['miou']:.4f} | mean Dice {result['mean_dice']:.4f}",
        f"{'class':<16}{'IoU':>8}{'Dice':>8}{'acc':>8}",
    ]
    for name, s in result["per_class"].items():
        lines.append(f"{name:<16}{s['iou']:>8.4f}{s['dice']:>8.4f}{s['acc']:>8.4f}")
    unc = result.get("uncertainty")
    if unc:
        lines.append("uncertainty: accuracy of the kept pixels when the most uncertain are dropped; ECE of the softmax")
        rows = [("softmax, 1 pass", unc["softmax"], "entropy")]
        if "mc" in unc:
            rows += [
                (f"MC {unc['mc_samples']}, entropy", unc["mc"], "entropy"),
                (f"MC {unc['mc_samples']}, variance", unc["mc"], "variance"),
            ]
        drops = list(rows[0][1]["kept_accuracy"]["entropy"])
        lines.append(f"{'':<22}{'ECE':>8}" + "".join(f"{'drop ' + d:>11}" for d in drops))
        for label, st, key in rows:
            lines.append(
                f"{label:<22}{100 * st['ece']:>7.2f}%"
                + "".join(f"{100 * st['kept_accuracy'][key][d]:>10.2f}%" for d in drops)
            )
        if "mc" in unc:
            m = unc["mc"]
            lines.append(
                f"MC-dropout mean prediction: pixel accuracy {m['pixel_acc']:.4f} | mean class accuracy "
                f"{m['mean_class_acc']:.4f} | mIoU {m['miou']:.4f}"
            )
    return "\n".join(lines)

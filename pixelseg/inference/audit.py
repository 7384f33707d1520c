"""`pixelseg audit RUN`: likely label errors in the training data, found with held-out fold models.

The method is confident learning (Northcutt, Jiang, Chuang, "Confident Learning: Estimating Uncertainty in
Dataset Labels", JAIR 70, 2021), applied per pixel and written here from the paper:

1. Out-of-sample probabilities. In a `train --folds K` run every pool image was held out by exactly one fold
   (RUN/folds.csv); that fold's model, which never saw the image or its mask, predicts it. A plain run has
   no such model, so its own (optimistic) predictions are used, with a warning.
2. Per-class thresholds. t_j = the mean self-confidence p_j(x) over all pixels x labelled j (the paper's
   per-class threshold, which adapts to classes the model is habitually less sure of).
3. Confident pixels. A pixel is confidently class j when p_j >= t_j (the highest such j when several);
   it is a suspect pixel when that class differs from its label (an off-diagonal cell of the confident joint).
4. Suspect regions. Connected components (8-connected) of suspect pixels sharing (given, suggested) classes,
   at least `min_area` pixels, each given a kind: *boundary* (>= 90% of it within `band` pixels of an edge of
   the labelled mask: a contour drawn off), else *missing label* (labelled background, confidently an
   object), *spurious label* (labelled an object, confidently background) or *wrong class* (object vs object).
5. Label quality. 1 - (m_1 + REST_WEIGHT × (m_2 + m_3 + ...)) / labelled pixels, where m_k are the masses
   (area × mean margin p_suggested - p_given) of the image's suspect regions, heaviest first: about the share
   of the image's labelled pixels that are wrong, with the heaviest region counted whole and the others at a
   quarter (a real error is mostly one object, while a blurry model leaves weak regions along every edge of
   every image; summed, they buried single errors: docs/labels.md, "Measured"). 1 is clean; the ranking puts
   the lowest first.

Everything runs at each image's own resolution (the model at its training size, its logits resized back,
as `predict` does), so suspect regions line up with the annotations they are exported beside.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import PixelsegError
from ..core.files import atomic_write_bytes, atomic_write_text, check_output_dir, make_output_dir
from ..core.logs import logger as log
from .suspects import KINDS, Thresholds, background_ids, find_suspects, label_quality, suspect_regions

KIND_COLORS = {
    "missing_label": (255, 215, 0),
    "wrong_class": (255, 0, 255),
    "spurious_label": (0, 200, 255),
    "boundary": (255, 120, 0),
}
FORMATS = ("auto", "coco", "cvat", "labelstudio", "yolo", "none")


@dataclass
class Entry:
    split: str
    name: str
    fold: int | None  # the fold that held it out; None for a plain run
    image: Path | None  # the image file (None for datasets without files, e.g. synthetic)
    sample: object  # what read_target takes (a Sample), or an index into `arrays`


@dataclass
class Source:
    """The images to audit, their models and how to read them."""

    run: Path
    ckpt: dict  # the run's checkpoint dict (a folds run: fold 0's, with ``members``)
    dataset: str
    root: str | Path | None  # a path, or a URL (s3://) for shards
    class_names: list
    palette: list
    ignore_index: int
    channels: int
    entries: list
    read_target: Callable[[object], object] | None = None  # a Sample -> its mask, for datasets with files
    arrays: dict | None = None  # split -> ArrayDataset, for datasets without files
    folds: bool = True

    def image(self, e: Entry) -> np.ndarray:
        if e.image is None:
            assert self.arrays is not None  # entries without a file are samples of `arrays`
            return np.asarray(self.arrays[e.split].images[e.sample])
        from ..data.io import read_input

        return read_input(e.image, self.channels)

    def target(self, e: Entry) -> np.ndarray:
        if e.image is None:
            assert self.arrays is not None  # entries without a file are samples of `arrays`
            return np.asarray(self.arrays[e.split].masks[e.sample])
        assert self.read_target is not None  # entries with a file come with the dataset's reader
        return np.asarray(self.read_target(e.sample))


def open_run(run, data_root=None, limit: int | None = None) -> Source:
    """Everything checked before any work: the run (folds or plain), its data and classes, the fold of
    each image. Bad input is one PixelsegError line."""
    from ..core.checkpoint import MANIFEST, load_checkpoint
    from ..data import dataset_info, dataset_options, get_dataset_module
    from ..training.folds import pool_splits
    from .loading import model_channels, recorded_data_root

    run = Path(run)
    if not run.exists():
        raise PixelsegError(f"{run}: no such run directory; pass the --run-dir of a `pixelseg train` run")
    is_folds = run.is_dir() and (run / MANIFEST).is_file()
    ckpt = load_checkpoint(run)
    cfg = ckpt["config"]
    if is_folds:
        manifest = json.loads((run / MANIFEST).read_text())
        splits = list(manifest.get("pool", {}).get("splits") or pool_splits(cfg))
        fold_of = _read_folds_csv(run / "folds.csv")
    else:
        splits, fold_of = [cfg["train_split"]], None
        log.warning(
            f"{run} is not a `train --folds K` run: its one model trained on the {cfg['train_split']!r} "
            "images it now scores, so it agrees with their labels more than a held-out model would and "
            "the audit misses errors it has learnt; train with --folds 3 (or more) for honest scores"
        )
    dataset = cfg["dataset"]
    fix = "pass --data-root PATH (where the data is now)"
    root = data_root if data_root is not None else recorded_data_root(ckpt, fix)
    if data_root is not None and "://" not in str(data_root) and not Path(data_root).exists():
        raise PixelsegError(f"--data-root {data_root}: not found")
    opts = dataset_options(cfg)
    info = dataset_info(dataset, root, split=splits[0], **opts)
    want = list(ckpt["dataset"]["class_names"])
    if list(info.class_names) != want:
        raise PixelsegError(
            f"{run}: the model's classes ({', '.join(want)}) differ from those of dataset {dataset} "
            f"at {root} ({', '.join(info.class_names)}); audit the data the run trained on "
            "(--data-root), with the same class list"
        )
    module = get_dataset_module(dataset)
    src = Source(
        run,
        ckpt,
        dataset,
        root,
        want,
        [tuple(p) for p in info.palette],
        int(info.ignore_index),
        model_channels(ckpt),
        [],
        folds=is_folds,
    )
    _collect_entries(src, module, splits, opts, cfg.get("limit"), fold_of, fix)
    if limit:
        src.entries = src.entries[:limit]
    if not src.entries:
        raise PixelsegError(f"{run}: no images to audit in dataset {dataset} {'+'.join(splits)} at {root}")
    return src


def _collect_entries(src: Source, module, splits: list, opts: dict, limit, fold_of: dict | None, fix: str) -> None:
    """src.entries: every image of the pool's splits with the fold that held it out; a run's folds.csv and the
    data as it is now must agree (images gone: one line; images added since: left out, with a warning)."""
    from ..data import load_split

    seen, extra = set(), 0
    for split in splits:
        if hasattr(module, "full_res_samples"):
            samples, src.read_target = module.full_res_samples(Path(src.root) if src.root else None, split, **opts)
            items = [(s.name, s.image, s) for s in samples]
        else:
            from .loading import input_size

            ds = load_split(
                src.dataset,
                src.root,
                split,
                input_size(src.ckpt),
                limit,
                use_cache="none",
                channels=src.channels,
                **opts,
            )
            src.arrays = {**(src.arrays or {}), split: ds}
            items = [(n, None, i) for i, n in enumerate(ds.names)]
        for name, image, sample in items:
            if image is not None and not Path(image).is_file():
                raise PixelsegError(
                    f"{image}: listed by dataset {src.dataset} at {src.root} but not found; the data moved "
                    f"or changed since the run: {fix}"
                )
            fold = fold_of.get((split, name)) if fold_of is not None else None
            if fold_of is not None and fold is None:
                extra += 1
                continue
            seen.add((split, name))
            src.entries.append(Entry(split, name, fold, Path(image) if image is not None else None, sample))
    if fold_of is not None:
        missing = [f"{s}/{n}" for (s, n) in fold_of if (s, n) not in seen]
        if missing:
            raise PixelsegError(
                f"{src.run / 'folds.csv'}: {len(missing)} of its {len(fold_of)} images are not in dataset "
                f"{src.dataset} at {src.root} (e.g. {missing[0]}); the data moved or changed since the run: "
                f"{fix}, or train the folds again on the data as it is now"
            )
        if extra:
            log.warning(
                f"{extra} image(s) of the dataset are not in {src.run / 'folds.csv'} (added after training?): "
                "no fold held them out, so they are left out of the audit"
            )


def _read_folds_csv(path: Path) -> dict:
    try:
        with open(path, newline="") as f:
            return {(r["split"], r["name"]): int(r["fold"]) for r in csv.DictReader(f)}
    except (OSError, KeyError, ValueError) as exc:
        raise PixelsegError(
            f"{path}: unreadable ({exc}); it says which fold held out each image, so the audit "
            "cannot pick the held-out model without it"
        ) from None


# ---- the audit -----------------------------------------------------------------------------------------
def audit(
    run,
    out=None,
    top: int = 20,
    fmt: str = "auto",
    data_root=None,
    device: str = "auto",
    precision: str = "auto",
    band: int | None = None,
    min_area: int | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
    unlabelled=None,
    next_top: int | None = None,
) -> dict:
    """Audit a run's training labels; writes audit.csv, audit.json, overlays/ and review/ into `out`
    (default RUN/audit). `unlabelled` (folders or files of new images): also next/, one list of the suspects
    and those images (pixelseg.inference.label_next). Returns the report (the dict in audit.json, plus ``files``)."""
    from ..core.progress import progress as progress_bar
    from ..core.runtime import resolve_precision, select_device
    from .loading import input_size, load_model
    from .tiling import Predictor, torch_logits_fn

    if fmt not in FORMATS:
        raise PixelsegError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    for flag, v in (("--top", top), ("--band", band), ("--min-area", min_area), ("--limit", limit)):
        if v is not None and v < 0:
            raise PixelsegError(f"{flag} {v}: must be >= 0")
    src = open_run(run, data_root, limit)
    out = check_output_dir(Path(out) if out else src.run / "audit", "--out")
    fmt = _export_format(fmt, src)
    new_files = _check_unlabelled(src, unlabelled, fmt, next_top)
    dev = select_device(device)
    amp = resolve_precision(precision, dev)
    size = input_size(src.ckpt)
    members = src.ckpt.get("members") or [src.ckpt]
    channels_last = src.ckpt["config"].get("channels_last", True)
    predictors = {}

    def predictor(fold):
        key = fold if src.folds else None
        if key not in predictors:
            model = load_model(members[fold] if src.folds else src.ckpt, dev, amp, channels_last)
            predictors[key] = Predictor(torch_logits_fn(model, dev, amp, channels_last), size, device=dev)
        return predictors[key]

    c = len(src.class_names)
    thresholds = Thresholds(c, src.ignore_index)
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pixelseg-audit-") as tmp:
        # pass 1: each image through the model that held it out; logits kept at the training size (float16,
        # on disk), probabilities at the image's size feed the thresholds
        logits = np.lib.format.open_memmap(Path(tmp) / "logits.npy", "w+", np.float16, (len(src.entries), c, *size))
        bar = progress_bar(total=len(src.entries), desc="audit: held-out predictions", unit="img", enabled=progress)
        shapes = _held_out_pass(src, predictor, size, batch_size, logits, thresholds, skipped, bar)
        bar.close()
        if not shapes:
            raise PixelsegError(f"{src.run}: none of the {len(src.entries)} images could be read")
        t = thresholds.values()
        bg = background_ids(src.class_names)
        records = _suspects_pass(src, logits, sorted(shapes), t, bg, band, min_area, progress)
        report = _report(src, records, t, bg, band, min_area, skipped)
        made = make_output_dir(out, "--out")
        files = _write_tables(report, made)
        files += _write_overlays(src, records[:top], logits, made)
        if fmt != "none":
            files += _write_review(src, records, fmt, made)
        if new_files is not None:
            files += _write_next(src, records, new_files, fmt, made, dev, amp, next_top, progress, report)
    report["files"] = [str(f) for f in files]
    return report


def _suspects_pass(src: Source, logits, readable: list, t, bg: set, band, min_area, progress: bool) -> list:
    """Pass 2: each readable image's suspects and label quality, worst first: (index, quality, suspects,
    labelled pixels, (h, w)) records."""
    from ..core.progress import progress as progress_bar

    c = len(src.class_names)
    records = []
    for i in progress_bar(readable, desc="audit: suspects", unit="img", enabled=progress):
        target = src.target(src.entries[i])
        probs = _probs(logits[i], target.shape)
        sus = find_suspects(probs, target, t, bg, src.ignore_index, band, min_area)
        labelled = int(((target != src.ignore_index) & (target < c)).sum())
        records.append((i, label_quality(sus, labelled), sus, labelled, target.shape))
    records.sort(key=lambda r: (r[1], src.entries[r[0]].split, src.entries[r[0]].name))
    return records


def _check_unlabelled(src: Source, unlabelled, fmt: str, next_top) -> list | None:
    """--unlabelled, checked before any work: its image files, less those the audit has labels for."""
    if not unlabelled:
        return None
    from .label_next import check_names, unlabelled_files

    if next_top is not None and next_top < 1:
        raise PixelsegError(f"--next-top {next_top}: must be >= 1")
    audited = [e.image for e in src.entries]
    files, labelled = unlabelled_files(unlabelled, audited)
    if labelled:
        log.info(
            f"--unlabelled: {labelled} of the images are labelled images of the dataset (audited, not listed twice)"
        )
    check_names(files, audited, fmt)
    return files


def _write_next(
    src: Source, records, new_files: list, fmt: str, out: Path, dev, amp, next_top, progress, report: dict
) -> list[Path]:
    """next/: the suspects and the unlabelled images in one list (pixelseg.inference.label_next)."""
    from .label_next import merge, score_unlabelled, suspect_item, write_next

    suspects = []
    for i, score, sus, _, (h, w) in records:
        e = src.entries[i]
        label = src.target(e) if sus and fmt == "labelstudio" else None
        item = suspect_item(e.image or Path(e.name), h, w, score, sus, src.class_names, label) if sus else None
        if item is not None:
            suspects.append(item)
    items = merge(suspects, score_unlabelled(src, new_files, dev, amp, progress), next_top)
    if fmt == "yolo" and (out / "next" / "yolo").exists():
        shutil.rmtree(out / "next" / "yolo")
    report["next"] = items
    return write_next(items, fmt, src.class_names, src.palette, out / "next", model_version="pixelseg-next")


def _held_out_pass(
    src: Source, predictor, size, batch_size: int, logits, thresholds: Thresholds, skipped: list, bar
) -> dict:
    """Pass 1: each image through the model that held it out (batches of one fold); training-size logits
    into `logits`, the image-size probabilities into the thresholds. Returns {entry index: (H, W)}."""
    order = sorted(range(len(src.entries)), key=lambda i: (src.entries[i].fold or 0, i))
    shapes: dict[int, tuple] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        groups: dict = {}
        for i in chunk:
            groups.setdefault(src.entries[i].fold, []).append(i)
        for fold, idx in groups.items():
            imgs, ok = [], []
            for i in idx:
                img = _read(src, src.entries[i], skipped)
                if img is not None:
                    imgs.append(img)
                    ok.append(i)
            if not ok:
                continue
            p = predictor(fold)
            lg = p.fn(torch.cat([p._input(img, size) for img in imgs])).float()
            for j, i in enumerate(ok):
                logits[i] = lg[j].cpu().numpy().astype(np.float16)
                target = src.target(src.entries[i])
                _check_size(src.entries[i], imgs[j], target)
                shapes[i] = target.shape
                thresholds.add(_probs(logits[i], target.shape), target)
        bar.update(len(chunk))
    return shapes


def _read(src: Source, e: Entry, skipped: list):
    from ..data.io import UnreadableImage

    try:
        return src.image(e)
    except UnreadableImage as exc:
        log.warning(f"skipping {exc}")
        skipped.append(str(e.image))
        return None


def _check_size(e: Entry, img: np.ndarray, target: np.ndarray) -> None:
    if img.shape[:2] != target.shape:
        raise PixelsegError(
            f"{e.image or e.name}: image is {img.shape[1]}×{img.shape[0]} but its mask is "
            f"{target.shape[1]}×{target.shape[0]}; "
            "fix the pair (the audit compares them pixel by pixel)"
        )


def _probs(logits: np.ndarray, hw) -> np.ndarray:
    """Training-size logits -> probabilities C×H×W at the image's own size, as Predictor does."""
    x = torch.from_numpy(np.asarray(logits, np.float32))[None]
    if tuple(x.shape[-2:]) != tuple(hw):
        x = F.interpolate(x, size=tuple(hw), mode="bilinear", align_corners=False)
    return x.softmax(1)[0].numpy()


def _export_format(fmt: str, src: Source) -> str:
    """auto: the dataset's own annotation format; COCO for datasets of mask files; none without files."""
    if fmt == "auto":
        if src.entries and src.entries[0].image is None:
            return "none"
        return src.dataset if src.dataset in ("coco", "cvat", "labelstudio", "yolo") else "coco"
    if fmt != "none" and src.entries and src.entries[0].image is None:
        raise PixelsegError(f"--format {fmt}: dataset {src.dataset} has no image files to refer to; use --format none")
    return fmt


def _report(src: Source, records, t, bg, band, min_area, skipped) -> dict:
    names = src.class_names
    rows = []
    for rank, (i, score, sus, _labelled, (h, w)) in enumerate(records, 1):
        e = src.entries[i]
        kinds = {k: sum(r.kind == k for r in sus) for k in KINDS}
        shares = {k: round(sum(r.area for r in sus if r.kind == k) / (h * w), 6) for k in KINDS}
        rows.append(
            {
                "rank": rank,
                "image": str(e.image) if e.image else e.name,
                "split": e.split,
                "name": e.name,
                "fold": e.fold,
                "score": round(score, 6),
                "regions": len(sus),
                "kinds": kinds,
                "pixel_share": shares,
                "suspect_share": round(sum(r.area for r in sus) / (h * w), 6),
                "width": w,
                "height": h,
                "suspects": [
                    {
                        "kind": r.kind,
                        "given": names[r.given],
                        "suggested": names[r.suggested],
                        "area": r.area,
                        "bbox": r.bbox,
                        "confidence": round(r.confidence, 4),
                        "margin": round(r.margin, 4),
                    }
                    for r in sus
                ],
            }
        )
    return {
        "run": str(src.run),
        "dataset": src.dataset,
        "data_root": str(src.root) if src.root else None,
        "held_out": src.folds,
        "method": "confident learning (Northcutt et al., JAIR 2021) per pixel; see docs/labels.md",
        "thresholds": {n: (None if not np.isfinite(v) else round(float(v), 4)) for n, v in zip(names, t, strict=False)},
        "background": [names[k] for k in sorted(bg)],
        "band": band or "auto (2% of the longer side, >= 3 px)",
        "min_area": min_area or "auto (0.025% of the image, >= 16 px)",
        "images": len(rows),
        "flagged": sum(r["regions"] > 0 for r in rows),
        "skipped_files": skipped,
        "ranking": rows,
    }


CSV_FIELDS = (
    ["rank", "image", "split", "name", "fold", "score", "regions"]
    + [f"n_{k}" for k in KINDS]
    + ["suspect_share"]
    + [f"share_{k}" for k in KINDS]
)


def _write_tables(report: dict, out: Path) -> list[Path]:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in report["ranking"]:
        w.writerow(
            {
                **{k: r[k] for k in CSV_FIELDS[:7]},
                **{f"n_{k}": r["kinds"][k] for k in KINDS},
                "suspect_share": r["suspect_share"],
                **{f"share_{k}": r["pixel_share"][k] for k in KINDS},
            }
        )
    atomic_write_text(out / "audit.csv", buf.getvalue())
    atomic_write_text(out / "audit.json", json.dumps(report, indent=1))
    return [out / "audit.csv", out / "audit.json"]


# ---- overlays ------------------------------------------------------------------------------------------
def overlay_panel(src: Source, image, target, pred, suspects, title: str) -> np.ndarray:
    """Three panels: image + label, image + held-out prediction, image with the suspects outlined by kind."""
    import cv2

    from ..core.viz import overlay, rgb_view

    img = image if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 else rgb_view(image)
    h, w = target.shape
    scale = min(1.0, 480 / max(h, w)) if max(h, w) > 480 else max(1.0, 240 / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    label = np.where(target == src.ignore_index, 255, target).astype(np.uint8)
    a = overlay(img, label, src.palette)
    b = overlay(img, pred.astype(np.uint8), src.palette)
    c = (img.astype(np.float32) * 0.7).astype(np.uint8).copy()
    c = cv2.resize(c, size, interpolation=cv2.INTER_AREA)
    for r in suspects:
        m = cv2.resize(r.mask(h, w).astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(c, contours, -1, KIND_COLORS[r.kind], 2)
    panels = [cv2.resize(a, size, interpolation=cv2.INTER_AREA), cv2.resize(b, size, interpolation=cv2.INTER_AREA), c]
    heads = ["label", "held-out prediction", "suspects"]
    bar_h = 22
    tiles = []
    for p, head in zip(panels, heads, strict=True):
        tile = np.full((size[1] + bar_h, size[0], 3), 255, np.uint8)
        tile[bar_h:] = p
        cv2.putText(tile, head, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(tile)
    sep = np.full((size[1] + bar_h, 4, 3), 255, np.uint8)
    body = np.concatenate([tiles[0], sep, tiles[1], sep, tiles[2]], 1)
    header = np.full((24, body.shape[1], 3), 255, np.uint8)
    cv2.putText(header, title, (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    x = 4
    legend = np.full((22, body.shape[1], 3), 255, np.uint8)
    for k in KINDS:
        cv2.rectangle(legend, (x, 5), (x + 12, 17), KIND_COLORS[k], -1)
        cv2.putText(
            legend, k.replace("_", " "), (x + 16, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA
        )
        x += 22 + 8 * len(k)
    return np.concatenate([header, body, legend], 0)


def _write_overlays(src: Source, records, logits, out: Path) -> list[Path]:
    """overlays/NNN_<name>.png for the top images, written to overlays.partial/ and swapped in whole."""
    from ..core.viz import png_bytes

    final, tmp = out / "overlays", out / "overlays.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    written = []
    for rank, (i, score, sus, _, hw) in enumerate(records, 1):
        e = src.entries[i]
        img, target = src.image(e), src.target(e)
        pred = _probs(logits[i], hw).argmax(0)
        kinds = (
            ", ".join(
                f"{sum(r.kind == k for r in sus)} {k.replace('_', ' ')}" for k in KINDS if any(r.kind == k for r in sus)
            )
            or "no suspects"
        )
        title = f"#{rank} {e.name}  quality {score:.3f}  ({kinds})"
        name = f"{rank:03d}_{_safe(e.name)}.png"
        atomic_write_bytes(tmp / name, png_bytes(overlay_panel(src, img, target, pred, sus, title)))
        written.append(final / name)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return written


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:80]


# ---- review tasks in the dataset's own format ----------------------------------------------------------
def _write_review(src: Source, records, fmt: str, out: Path) -> list[Path]:
    """review/: the flagged images, worst first, with their suspects as the tool's pre-annotations."""
    from ..labels.write import ImageRegions, write

    bg = background_ids(src.class_names)
    items = []
    for i, score, sus, _, (h, w) in records:
        regions = suspect_regions(src.class_names, sus, bg, h, w)
        if regions:
            items.append(ImageRegions(src.entries[i].image, h, w, regions, score, 1 - score))
    review = out / "review"
    if fmt == "yolo" and (review / "yolo").exists():
        shutil.rmtree(review / "yolo")
    review.mkdir(exist_ok=True)
    names = [src.class_names[k] for k in range(len(src.class_names)) if k not in bg]
    return write(
        fmt,
        items,
        src.class_names,
        src.palette,
        review,
        model_version="pixelseg-audit",
        attributes={"kind": list(KINDS), "given": names, "suggested": list(src.class_names)},
    )


def format_summary(report: dict, top: int = 10) -> str:
    how = (
        "each by the fold model that held it out"
        if report["held_out"]
        else "by the model that trained on them: optimistic"
    )
    lines = [
        f"audited {report['images']} images of {report['dataset']} ({how}); {report['flagged']} with suspect regions",
        "thresholds (mean self-confidence per class): "
        + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in report["thresholds"].items()),
        f"{'rank':>4}  {'quality':>7}  {'regions':>7}  image",
    ]
    for r in report["ranking"][:top]:
        kinds = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in r["kinds"].items() if n)
        lines.append(
            f"{r['rank']:>4}  {r['score']:>7.4f}  {r['regions']:>7}  {r['name']}" + (f"  ({kinds})" if kinds else "")
        )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: pixelseg audit RUN")

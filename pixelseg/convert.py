"""`pixelseg convert`: any dataset pixelseg reads (coco, cvat, labelstudio, labelme, yolo, folder, voc, ...) to a
folder of class-id PNG masks + classes.csv that `--dataset folder` reads back, or to WebDataset shards.

    OUT/images/<split>/<name><ext>   the source image files, byte for byte
    OUT/masks/<split>/<name>.png     8-bit class ids (palette PNG coloured with the classes' colours; 255 = ignore)
    OUT/classes.csv                  id,name,r,g,b
    OUT/convert_report.json          images, classes, pixel share per class, images without labels, shapes
                                     clipped at the border, shapes dropped and why, items skipped (--skip-bad)
    OUT/convert_overlay.png          a few samples with their masks drawn over them, to check by eye

Everything is written into a temporary directory next to OUT and renamed into place at the end: an error
(bad input, full disk) leaves nothing half-written. OUT must not exist yet (or be empty).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import PixelsegError
from .labels.raster import IGNORE

OVERLAY_SAMPLES = 4
TARGETS = ("folder", "shards")


def _splits(dataset: str, root, options: dict) -> list[str]:
    from .data import default_split, get_dataset_module, labelled
    module = get_dataset_module(dataset)
    if isinstance(module, labelled.AnnotationFormat):  # an annotation format: every split the export has
        o = labelled.options(module.OPTIONS, options)
        return list(labelled.splits(labelled.parse(dataset, module.read, Path(root), o), o))
    return list(dict.fromkeys(default_split(dataset, r) for r in ("train", "val")))


def _labelset(dataset: str, root, options: dict):
    from .data import get_dataset_module, labelled
    module = get_dataset_module(dataset)
    if not isinstance(module, labelled.AnnotationFormat):
        return None
    return labelled.parse(dataset, module.read, Path(root), labelled.options(module.OPTIONS, options))


def _prepare_out(out: Path) -> Path:
    from .files import check_output_dir
    check_output_dir(out, "--out")
    if out.exists() and any(out.iterdir()):
        raise PixelsegError(f"--out {out}: exists and is not empty; convert writes a new folder (choose another "
                            "name or remove it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    from .files import pid_prefix, remove_stale_temps
    remove_stale_temps(out.parent, f".{out.name}.tmp-")  # a killed convert's half-written folder
    return Path(tempfile.mkdtemp(prefix=pid_prefix(f".{out.name}.tmp-"), dir=out.parent))


def convert(dataset: str, root, out, to: str = "folder", splits: list[str] | None = None, limit: int | None = None,
            maxcount: int = 1000, progress: bool = True, **options) -> dict:
    """Convert and return the report (also written to OUT/convert_report.json)."""
    from .data import dataset_info, load_split
    from .data.base import CacheSpec
    if to not in TARGETS:
        raise PixelsegError(f"--to {to}: choose one of {', '.join(TARGETS)}")
    out = Path(out)
    options = {k: v for k, v in options.items() if v is not None}
    info = dataset_info(dataset, root, **options)
    splits = splits or _splits(dataset, root, options)
    tmp = _prepare_out(out)
    try:
        counts = np.zeros(256, np.int64)
        report = {"dataset": dataset, "data_root": str(root), "to": to, "splits": {}, "images": 0,
                  "images_without_labels": []}
        overlays = []
        for split in splits:
            ds = load_split(dataset, root, split, (64, 64), limit, CacheSpec("none", full_res=True), **options)
            n = 0
            for s in tqdm(ds.samples, desc=f"convert {split}", unit="img", leave=False, disable=not progress or None):
                img, mask = ds.reader(s, None, None)
                counts += np.bincount(mask.ravel(), minlength=256)
                if not (mask[mask != IGNORE] > 0).any():
                    report["images_without_labels"].append(f"{split}/{s.name}")
                elif len(overlays) < OVERLAY_SAMPLES:
                    overlays.append((f"{split}/{s.name}", img, mask))
                if to == "folder":
                    _write_pair(tmp, split, s, mask, info.palette)
                n += 1
            report["splits"][split] = n
            report["images"] += n
            if to == "shards":
                from .data.shards import write_shards
                write_shards(dataset, root, split, tmp, maxcount, limit, progress, **options)
        _finish_report(report, counts, info, _labelset(dataset, root, options))
        if to == "folder":
            _write_classes(tmp / "classes.csv", info)
        (tmp / "convert_report.json").write_text(json.dumps(report, indent=1))
        if overlays:
            _overlay_png(overlays, info, tmp / "convert_overlay.png")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["out"] = str(out)
    return report


def _write_pair(tmp: Path, split: str, s, mask: np.ndarray, palette) -> None:
    from .viz import save_index_png
    (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
    (tmp / "masks" / split).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(s.image, tmp / "images" / split / f"{s.name}{Path(s.image).suffix.lower()}")
    save_index_png(mask, palette, tmp / "masks" / split / f"{s.name}.png")


def _write_classes(path: Path, info) -> None:
    rows = ["id,name,r,g,b"] + [f"{i},{n},{c[0]},{c[1]},{c[2]}" for i, (n, c) in
                                enumerate(zip(info.class_names, info.palette))]
    path.write_text("\n".join(rows) + "\n")


def _finish_report(report: dict, counts: np.ndarray, info, labels) -> None:
    total = max(int(counts.sum()), 1)
    report["classes"] = list(info.class_names)
    report["pixel_share"] = {n: round(float(counts[i]) / total, 6) for i, n in enumerate(info.class_names)}
    if counts[IGNORE]:
        report["pixel_share"]["(ignored)"] = round(float(counts[IGNORE]) / total, 6)
    if labels is not None:
        report["shapes"] = sum(len(it.shapes) for it in labels.items)
        report["shapes_clipped_at_border"] = labels.clipped
        report["shapes_dropped"] = dict(labels.dropped)
        report["skipped_bad"] = list(labels.bad)
        report["notes"] = list(labels.notes)


def format_report(report: dict) -> str:
    lines = [f"converted {report['images']} images ({', '.join(f'{k} {v}' for k, v in report['splits'].items())}) "
             f"of {report['dataset']} to {report['to']} {report.get('out', '')}",
             "  classes: " + ", ".join(f"{n} {100 * p:.1f}%" for n, p in report["pixel_share"].items())]
    if report["images_without_labels"]:
        lines.append(f"  {len(report['images_without_labels'])} image(s) without labels: "
                     + ", ".join(report["images_without_labels"][:5]))
    if "shapes" in report:
        lines.append(f"  {report['shapes']} shapes; {report['shapes_clipped_at_border']} clipped at the border")
        lines += [f"  {k} dropped: {why}" for why, k in report["shapes_dropped"].items()]
        if report["skipped_bad"]:
            lines.append(f"  {len(report['skipped_bad'])} damaged item(s) skipped (--skip-bad), e.g. "
                         f"{report['skipped_bad'][0]}")
        lines += [f"  note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def _overlay_png(samples, info, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .viz import legend_handles, overlay
    fig, axes = plt.subplots(1, len(samples), figsize=(4 * len(samples), 4.6), squeeze=False)
    present: set = set()
    for ax, (name, img, mask) in zip(axes[0], samples):
        shown = np.where((mask > 0)[..., None], overlay(img, mask, info.palette, 0.55), img)  # background untinted
        ax.imshow(shown)
        ax.set_title(name if len(name) < 40 else name[:37] + "...", fontsize=8)
        ax.axis("off")
        present |= set(np.unique(mask).tolist())
    names = [n if i in present else None for i, n in enumerate(info.class_names)]
    handles = [h for h, n in zip(legend_handles(info.class_names, info.palette), names) if n]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)

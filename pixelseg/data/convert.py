"""`pixelseg convert`: any dataset pixelseg reads (coco, cvat, labelstudio, labelme, yolo, folder, voc, ...) to a
folder of class-id PNG masks + classes.csv that `--dataset folder` reads back, or to WebDataset shards.

    OUT/images/<split>/<name><ext>   the source image files, byte for byte; except that an annotated image with an
                                     EXIF Orientation tag is written upright as <name>.png (its annotations are
                                     upright, labels/rules.py, and a folder dataset reads the stored grid)
    OUT/masks/<split>/<name>.png     8-bit class ids (palette PNG coloured with the classes' colours; 255 = ignore)
    OUT/classes.csv                  id,name,r,g,b (RFC 4180 quoting; one distinct colour per class)
    OUT/convert_report.json          images, classes, pixel share per class, images without labels, shapes
                                     clipped at the border, shapes dropped and why, items skipped (--skip-bad)
    OUT/convert_overlay.png          a few samples with their masks drawn over them, to check by eye

Everything is written into a temporary directory next to OUT (.OUT.tmp-*) and renamed into place at the end:
an error (bad input, full disk) leaves nothing half-written, and the folder gets the mode a plain mkdir would
(the umask's), not the temporary directory's private 0700. A convert killed outright (SIGKILL, power cut) leaves
its .OUT.tmp-* behind; the next convert to OUT removes it (unless the process that made it is still running).
OUT must not exist yet (or be empty). Splits: every split an annotation export has; for other datasets train,
val and, where the dataset has one, test.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, cast

import numpy as np
from tqdm import tqdm

from ..core.errors import PixelsegError
from ..labels.raster import IGNORE, distinct_palette

OVERLAY_SAMPLES = 4
TARGETS = ("folder", "shards")


def _splits(dataset: str, root, options: dict) -> list[str]:
    from . import default_split, get_dataset_module, labelled

    module = get_dataset_module(dataset)
    if isinstance(module, labelled.AnnotationFormat):  # an annotation format: every split the export has
        o = labelled.options(module.OPTIONS, options)
        return list(labelled.splits(labelled.parse(dataset, module.read, Path(root), o), o))
    out = list(dict.fromkeys(default_split(dataset, r) for r in ("train", "val")))
    if "test" in getattr(module, "SPLITS", ()) and "test" not in out and _has_split(dataset, root, "test", options):
        out.append("test")
    return out


def _has_split(dataset: str, root, split: str, options: dict) -> bool:
    from . import load_split
    from .base import CacheSpec

    try:
        return len(load_split(dataset, root, split, (64, 64), 1, CacheSpec("none", full_res=True), **options)) > 0
    except PixelsegError:
        return False


def _labelset(dataset: str, root, options: dict):
    from . import get_dataset_module, labelled

    module = get_dataset_module(dataset)
    if not isinstance(module, labelled.AnnotationFormat):
        return None
    return labelled.parse(dataset, module.read, Path(root), labelled.options(module.OPTIONS, options))


OWNER = ".pixelseg-convert-owner"  # host and pid of the convert writing a temporary folder


def _alive(owner: Path) -> bool:
    """Whether the convert that made a temporary folder may still be running (same host, pid alive)."""
    try:
        host, pid = owner.read_text().split()
        if host != socket.gethostname():
            return True  # another machine's (a shared file system): not ours to judge
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False  # no owner file (killed before writing it), an unparseable one, or a dead pid
    return True


def _clean_stale(out: Path) -> None:
    """Remove the .OUT.tmp-* folders that killed converts to OUT left behind."""
    for d in out.parent.glob(f".{out.name}.tmp-*"):
        if d.is_dir() and not d.is_symlink() and not _alive(d / OWNER):
            shutil.rmtree(d, ignore_errors=True)


def _prepare_out(out: Path) -> Path:
    from ..core.files import _umask, check_output_dir

    check_output_dir(out, "--out")
    if out.exists() and any(out.iterdir()):
        raise PixelsegError(
            f"--out {out}: exists and is not empty; convert writes a new folder (choose another name or remove it)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would survive the rename: outputs readable as mkdir's
    (tmp / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    return tmp


def convert(
    dataset: str,
    root,
    out,
    to: str = "folder",
    splits: list[str] | None = None,
    limit: int | None = None,
    maxcount: int = 1000,
    progress: bool = True,
    **options,
) -> dict:
    """Convert and return the report (also written to OUT/convert_report.json)."""
    from . import dataset_info, load_split
    from .base import CacheSpec, FileDataset

    if to not in TARGETS:
        raise PixelsegError(f"--to {to}: choose one of {', '.join(TARGETS)}")
    out = Path(out)
    options = {k: v for k, v in options.items() if v is not None}
    info = dataset_info(dataset, root, **options)
    splits = splits or _splits(dataset, root, options)
    tmp = _prepare_out(out)
    try:
        counts = np.zeros(256, np.int64)
        report: dict[str, Any] = {
            "dataset": dataset,
            "data_root": str(root),
            "to": to,
            "splits": {},
            "images": 0,
            "images_without_labels": [],
        }
        overlays: list[tuple[str, np.ndarray, np.ndarray]] = []  # (name, image, mask)
        turned = 0
        palette = distinct_palette(list(info.palette))  # classes.csv needs one colour per class
        for split in splits:
            # --cache none: a FileDataset (samples and their reader) for every file-backed dataset
            ds = cast(
                FileDataset,
                load_split(dataset, root, split, (64, 64), limit, CacheSpec("none", full_res=True), **options),
            )
            n = 0
            for s in tqdm(ds.samples, desc=f"convert {split}", unit="img", leave=False, disable=not progress or None):
                img, mask = ds.reader(s, None, None)
                counts += np.bincount(mask.ravel(), minlength=256)
                if not (mask[mask != IGNORE] > 0).any():
                    report["images_without_labels"].append(f"{split}/{s.name}")
                elif len(overlays) < OVERLAY_SAMPLES:
                    overlays.append((f"{split}/{s.name}", img, mask))
                if to == "folder":
                    turned += _write_pair(tmp, split, s, img, mask, palette)
                n += 1
            report["splits"][split] = n
            report["images"] += n
            if to == "shards":
                from .shards_write import write_shards

                write_shards(dataset, root, split, tmp, maxcount, limit, progress, **options)
        _finish_report(report, counts, info, _labelset(dataset, root, options))
        if turned:
            report.setdefault("notes", []).append(
                f"{turned} image(s) with an EXIF Orientation tag written upright as PNG (their annotations are upright)"
            )
        if to == "folder":
            _write_classes(tmp / "classes.csv", info.class_names, palette)
        (tmp / "convert_report.json").write_text(json.dumps(report, indent=1))
        if overlays:
            _overlay_png(overlays, info, tmp / "convert_overlay.png")
        (tmp / OWNER).unlink()
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["out"] = str(out)
    return report


def _write_pair(tmp: Path, split: str, s, img: np.ndarray, mask: np.ndarray, palette) -> int:
    """Image and mask of one sample; 1 when the image was written upright (EXIF-oriented, annotated upright)."""
    from PIL import Image

    from ..core.viz import save_index_png

    (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
    (tmp / "masks" / split).mkdir(parents=True, exist_ok=True)
    turned = getattr(s, "orientation", 1) != 1
    if turned:  # the pixels the annotations were drawn on, without a tag that would turn them again
        Image.fromarray(img).save(tmp / "images" / split / f"{s.name}.png")
    else:
        shutil.copyfile(s.image, tmp / "images" / split / f"{s.name}{Path(s.image).suffix.lower()}")
    save_index_png(mask, palette, tmp / "masks" / split / f"{s.name}.png")
    return int(turned)


def _write_classes(path: Path, names: list[str], palette) -> None:
    """classes.csv as `--dataset folder` reads it: csv-quoted names, one distinct colour per class."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "name", "r", "g", "b"])
    for i, (n, c) in enumerate(zip(names, palette, strict=False)):
        w.writerow([i, n, *c])
    path.write_text(buf.getvalue(), encoding="utf-8")


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
        report["notes"] = list(labels.notes) + report.get("notes", [])


def format_report(report: dict) -> str:
    lines = [
        f"converted {report['images']} images ({', '.join(f'{k} {v}' for k, v in report['splits'].items())}) "
        f"of {report['dataset']} to {report['to']} {report.get('out', '')}",
        "  classes: " + ", ".join(f"{n} {100 * p:.1f}%" for n, p in report["pixel_share"].items()),
    ]
    if report["images_without_labels"]:
        lines.append(
            f"  {len(report['images_without_labels'])} image(s) without labels: "
            + ", ".join(report["images_without_labels"][:5])
        )
    if "shapes" in report:
        lines.append(f"  {report['shapes']} shapes; {report['shapes_clipped_at_border']} clipped at the border")
        lines += [f"  {k} dropped: {why}" for why, k in report["shapes_dropped"].items()]
        if report["skipped_bad"]:
            lines.append(
                f"  {len(report['skipped_bad'])} damaged item(s) skipped (--skip-bad), e.g. {report['skipped_bad'][0]}"
            )
        lines += [f"  note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def _overlay_png(samples, info, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.viz import legend_handles, overlay

    fig, axes = plt.subplots(1, len(samples), figsize=(4 * len(samples), 4.6), squeeze=False)
    present: set = set()
    for ax, (name, img, mask) in zip(axes[0], samples, strict=True):
        shown = np.where((mask > 0)[..., None], overlay(img, mask, info.palette, 0.55), img)  # background untinted
        ax.imshow(shown)
        ax.set_title(name if len(name) < 40 else name[:37] + "...", fontsize=8)
        ax.axis("off")
        present |= set(np.unique(mask).tolist())
    names = [n if i in present else None for i, n in enumerate(info.class_names)]
    handles = [h for h, n in zip(legend_handles(info.class_names, info.palette), names, strict=False) if n]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)

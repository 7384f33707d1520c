"""YOLO-seg (Ultralytics): data.yaml names + images/<split>/ and labels/<split>/*.txt, one polygon per line.

Line: `class x1 y1 x2 y2 ...`, coordinates normalised to 0..1; class k (0-based, data.yaml's `names`) becomes
class id k + 1 (0 is background), except that a class named "background" is 0 and the ones after it close up
(labels/rules.py, as in every reader); at most 254 classes. Coordinates are fractions of the image as viewers
(and Ultralytics, through OpenCV) show it: turned upright by its EXIF Orientation. A detection line
(`class cx cy w h`) is a box: painted with --boxes, else left out and counted. An image without a .txt has no
labels (all background). Splits: data.yaml's train/val/test (relative to its `path` or its folder; Roboflow's
`../train/images` too), else images/<split>/ or <split>/images/ found without it (names still from data.yaml).
A val that is the training folder (or holds only training images) is not a validation split: it is dropped,
with a note, and val is carved out of train by --val-fraction; val images that are also training images are
left out of val.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import PixelsegError
from ..core.images import IMAGE_SUFFIXES
from .files import Names
from .raster import (
    HUGE,
    BadShape,
    Item,
    LabelSet,
    Problems,
    box_polygon,
    check_not_empty,
    default_palette,
    export_values,
    make_shape,
    polygons_rle,
    shape_values,
)
from .rules import class_ids, upright_hw

SPLIT_KEYS = {"train": "train", "val": "val", "valid": "val", "test": "test"}


def _yaml(root: Path) -> tuple[Path, dict]:
    import yaml

    cands = [root] if root.is_file() else [root / "data.yaml", root / "dataset.yaml", *sorted(root.glob("*.yaml"))]
    path = next((p for p in cands if p.is_file()), None)
    if path is None:
        raise PixelsegError(f"--data-root {root}: no data.yaml (YOLO-seg exports name their classes there)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        pos = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise PixelsegError(f"{path}{pos}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict) or "names" not in data:
        raise PixelsegError(f"{path}: no 'names' (the class names, a list or {{id: name}})")
    return path, data


def _names(data: dict, path: Path) -> list[str]:
    names = data["names"]
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except ValueError:
            raise PixelsegError(f"{path}: names keys must be class numbers") from None
        if ids != list(range(len(ids))):
            raise PixelsegError(f"{path}: names ids must run 0..{len(ids) - 1} without gaps")
        return [str(names[k] if k in names else names[str(k)]) for k in ids]
    if isinstance(names, list):
        return [str(n) for n in names]
    raise PixelsegError(f"{path}: names must be a list or a mapping")


def _is_dir(p: Path) -> bool:
    """Path.is_dir() that is False for a name the OS refuses (too long, NUL): data.yaml's folders are outside data."""
    try:
        return p.is_dir()
    except (OSError, ValueError):
        return False


def _split_dirs(path: Path, data: dict) -> list[tuple[str, Path]]:
    base = path.parent
    if data.get("path"):
        p = Path(str(data["path"]))
        base = p if p.is_absolute() else base / p
    out = []
    for key, split in SPLIT_KEYS.items():
        val = data.get(key)
        for v in [val] if isinstance(val, str) else val or []:
            cands = [base / v, path.parent / v, path.parent / str(v).replace("../", "", 1)]
            d = next((c for c in cands if _is_dir(c)), None)
            if d is not None:
                out.append((split, d))
    if out:
        return out
    for key, split in SPLIT_KEYS.items():
        for d in (path.parent / "images" / key, path.parent / key / "images"):
            if d.is_dir():
                out.append((split, d))
    if not out and (path.parent / "images").is_dir():
        out.append(("train", path.parent / "images"))
    return out


def _label_file(image: Path, images_dir: Path) -> Path:
    rel = image.relative_to(images_dir)
    parts = list(images_dir.parts)
    idx = max((i for i, p in enumerate(parts) if p == "images"), default=None)
    labels_dir = Path(*parts[:idx], "labels", *parts[idx + 1 :]) if idx is not None else images_dir.parent / "labels"
    return (labels_dir / rel).with_suffix(".txt")


@shape_values
def _line(vals: list[str], h: int, w: int, k_names: int, boxes: bool):
    try:
        cls = int(vals[0])
        xy = np.asarray([float(v) for v in vals[1:]], np.float64)
    except ValueError:
        raise BadShape("values are not numbers") from None
    if not 0 <= cls < k_names:
        raise BadShape(f"class {cls} is not declared (data.yaml names {k_names} classes: 0..{k_names - 1})")
    if np.isfinite(xy).all() and (np.abs(xy) > HUGE).any():
        raise BadShape(f"coordinate {float(np.abs(xy).max()):g} is not normalised (0..1)")
    if len(xy) == 4:
        if not boxes:
            return cls, None, False
        cx, cy, bw, bh = xy * [w, h, w, h]
        return (cls, *polygons_rle([box_polygon(cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)], h, w))
    if len(xy) % 2:
        raise BadShape(f"odd number of coordinates ({len(xy)})")
    return (cls, *polygons_rle([xy.reshape(-1, 2) * [w, h]], h, w))


def _split_files(dirs: list[tuple[str, Path]], notes: list[str]) -> list[tuple[str, Path, list[Path]]]:
    """(split, folder, image files) per split, without validating on training images: a val (or test) folder
    that is the training folder, or holds only training images, is dropped (val then comes from
    --val-fraction); a val image that is also a training image is left out of val. Both said in `notes`."""
    listed = [(split, d, sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)) for split, d in dirs]
    train = {p.resolve() for split, _, files in listed if split == "train" for p in files}
    out = []
    for split, d, files in listed:
        if split != "train" and train:
            shared = [p for p in files if p.resolve() in train]
            if shared and len(shared) == len(files):
                notes.append(
                    f"data.yaml's {split} ({d}) holds only training images: not used as a {split} split"
                    + (" (val is carved out of train by --val-fraction instead)" if split == "val" else "")
                )
                continue
            if shared:
                notes.append(f"{len(shared)} {split} image(s) in {d} are also training images: left out of {split}")
                files = [p for p in files if p.resolve() not in train]
        out.append((split, d, files))
    return out


@export_values
def read(root: Path, boxes: bool = False, skip_bad: bool = False) -> LabelSet:
    path, data = _yaml(Path(root))
    names_ = _names(data, path)
    dirs = _split_dirs(path, data)
    if not dirs:
        raise PixelsegError(f"{path}: no image folders found (train:/val: in data.yaml, or images/<split>/)")
    ids = class_ids(names_, path, "class", unique=False)  # yolo class k -> class id
    classes = ["background"] + [""] * max([v for v in ids if v != 255], default=0)
    for cname, v in zip(names_, ids, strict=True):
        if 0 < v < 255 and not classes[v]:
            classes[v] = cname
    problems = Problems(skip_bad)
    names = Names(problems)
    out = LabelSet("yolo", f"YOLO-seg {path.name}", classes, default_palette(len(classes)), [])
    unlabelled = 0
    for split, d, files in _split_files(dirs, out.notes):
        for img in files:
            txt = _label_file(img, d)
            stem = names.take(txt, "image", split, img.name)
            hw = upright_hw(img) if stem else None
            if hw is None or not stem:  # hw implies stem
                if stem:
                    problems.bad(img, "image", "cannot be read")
                continue
            item = Item(stem, img, hw[0], hw[1], split=split, source=txt if txt.is_file() else None, orientation=hw[2])
            if not txt.is_file():
                unlabelled += 1
                out.items.append(item)
                continue
            for n, line in enumerate(txt.read_text().splitlines(), 1):
                vals = line.split()
                if not vals:
                    continue
                try:
                    cls, rle, clipped = _line(vals, hw[0], hw[1], len(names_), boxes)
                except BadShape as exc:
                    problems.bad(f"{txt}:{n}", "line", str(exc))
                    continue
                if rle is None:
                    out.dropped["detection box lines (pass --boxes to paint boxes)"] += 1
                    continue
                out.clipped += clipped
                item.shapes.append(make_shape(ids[cls], rle, f"{txt.name}:{n}", 0, n))
            out.items.append(item)
    if unlabelled:
        out.notes.append(f"{unlabelled} image(s) have no label file: all background")
    out.bad = problems.skipped
    return check_not_empty(out, path)

"""LabelMe JSON, one file per image: `shapes` (polygon; rectangle with --boxes; circle), `imagePath`.

Layout: ROOT/**/*.json next to (or pointing at, via imagePath) the images; ROOT/train/, ROOT/val/, ROOT/test/
sub-folders are splits. Classes: ROOT/labels.txt as labelme2voc reads it (one name per line; `__ignore__`
-> 255, `_background_` -> 0), in its order; without it, the labels found, sorted. line, linestrip, point
and mask shapes are left out and counted. A JSON whose image file is not there but which embeds it
(`imageData`, base64: LabelMe's default) is read from the embedded bytes, written once to the decode cache
($PIXELSEG_CACHE/labelme-images/<sha1>.<ext>), as labelme's own json_to_dataset does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
from pathlib import Path

import numpy as np

from ..core.errors import PixelsegError
from .files import Names, class_names, class_table, find_image, read_json, sized_image
from .raster import (
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

SPLITS = ("train", "val", "test")


def _files(root: Path) -> list[tuple[str | None, Path]]:
    if root.is_file():
        return [(None, root)]
    subs = [s for s in SPLITS if (root / s).is_dir()]
    if subs:
        return [(s, p) for s in subs for p in sorted((root / s).rglob("*.json"))]
    return [(None, p) for p in sorted(root.rglob("*.json"))]


@shape_values
def _polygon(shape: dict, h: int, w: int, boxes: bool):
    kind = shape.get("shape_type") or "polygon"
    try:
        pts = np.asarray(shape.get("points"), np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        raise BadShape("points are not [x, y] pairs") from None
    if kind == "polygon":
        return polygons_rle([pts], h, w)
    if kind == "rectangle":
        if not boxes:
            return None, False
        if len(pts) != 2:
            raise BadShape(f"rectangle has {len(pts)} points, expected 2")
        (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
        return polygons_rle([box_polygon(x0, y0, x1, y1)], h, w)
    if kind == "circle":
        if len(pts) != 2 or not np.isfinite(pts).all():
            raise BadShape("circle needs a centre and a point on it")
        (cx, cy), r = pts[0], float(np.hypot(*(pts[1] - pts[0])))
        t = np.linspace(0, 2 * math.pi, max(16, int(r)), endpoint=False)
        return polygons_rle([np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)], h, w)
    raise KeyError(kind)


def _embedded(doc: dict, path: Path, problems: Problems) -> Path | None:
    """The image LabelMe embedded in the JSON (`imageData`), as a file in the cache (written once)."""
    from PIL import Image, UnidentifiedImageError

    from ..core.files import atomic_write_bytes, cache_dir

    try:
        data = base64.b64decode(doc["imageData"], validate=True)
        fmt = (Image.open(io.BytesIO(data)).format or "png").lower()
    except (binascii.Error, ValueError, TypeError, OSError, UnidentifiedImageError) as exc:
        problems.bad(path, "imageData", f"embedded image cannot be decoded ({exc.__class__.__name__})")
        return None
    out = cache_dir() / "labelme-images" / f"{hashlib.sha1(data).hexdigest()}.{'jpg' if fmt == 'jpeg' else fmt}"
    if not out.is_file():
        try:
            atomic_write_bytes(out, data)
        except OSError as exc:
            raise PixelsegError(
                f"{path}: cannot write its embedded image to {out} ({exc.strerror or exc}); set "
                "PIXELSEG_CACHE to a writable folder"
            ) from None
    return out


@export_values
def read(root: Path, boxes: bool = False, skip_bad: bool = False) -> LabelSet:
    root = Path(root)
    files = _files(root)
    if not files:
        raise PixelsegError(f"--data-root {root}: empty export: no LabelMe *.json files")
    docs = [(s, p, read_json(p)) for s, p in files]
    docs = [(s, p, d) for s, p, d in docs if isinstance(d, dict) and "shapes" in d]
    if not docs:
        raise PixelsegError(f"--data-root {root}: empty export: no *.json with LabelMe 'shapes'")
    base = root if root.is_dir() else root.parent
    notes = []
    if (base / "labels.txt").is_file():
        declared = [ln.strip() for ln in (base / "labels.txt").read_text().splitlines() if ln.strip()]
        classes_file = base / "labels.txt"
    else:
        declared = sorted({str(sh.get("label")) for _, _, d in docs for sh in d["shapes"] if isinstance(sh, dict)})
        classes_file = base
        notes.append("no labels.txt: classes are the labels found, sorted: " + ", ".join(declared))
    table = class_table(declared, classes_file, "label")
    names_ = class_names(table)
    problems = Problems(skip_bad)
    names = Names(problems)
    out = LabelSet("labelme", f"LabelMe {len(docs)} JSON files", names_, default_palette(len(names_)), [], notes)
    for split, path, doc in docs:
        img = str(doc.get("imagePath") or path.with_suffix(".jpg").name)
        stem = names.take(path, "imagePath", split, img)
        folders = [path.parent, path.parent / Path(img).parent]
        where = "imagePath"
        if stem and find_image(img, folders) is None and isinstance(doc.get("imageData"), str) and doc["imageData"]:
            emb = _embedded(doc, path, problems)
            if emb is None:
                continue
            img, folders, where = emb.name, [emb.parent], "imageData"
        found = (
            sized_image(problems, path, where, img, folders, (doc.get("imageWidth"), doc.get("imageHeight")))
            if stem
            else None
        )
        if found is None or not stem:  # found implies stem
            continue
        item = Item(stem, found[0], found[1], found[2], split=split, source=path, orientation=found[3])
        for k, sh in enumerate(doc["shapes"]):
            sid = f"shape #{k} label={sh.get('label') if isinstance(sh, dict) else None!r}"
            if not isinstance(sh, dict):
                problems.bad(path, sid, "not an object")
                continue
            if sh.get("label") not in table:
                problems.bad(path, sid, f"label {sh.get('label')!r} is not in {where}")
                continue
            try:
                rle, clipped = _polygon(sh, item.height, item.width, boxes)
            except BadShape as exc:
                problems.bad(path, sid, str(exc))
                continue
            except KeyError as exc:
                out.dropped[f"{exc.args[0]} shapes are not regions"] += 1
                continue
            if rle is None:
                out.dropped["rectangle (pass --boxes to paint boxes)"] += 1
                continue
            out.clipped += clipped
            item.shapes.append(make_shape(table[sh["label"]], rle, f"{path.name} {sid}", 0, k))
        out.items.append(item)
    out.bad = problems.skipped
    return check_not_empty(out, root)

"""COCO instances JSON: polygons, RLE (compressed and uncompressed), iscrowd, categories from the file.

Layouts found without flags (`--data-root`):
    Roboflow   ROOT/train/_annotations.coco.json + images, ROOT/valid/..., ROOT/test/...  (valid -> split val)
    classic    ROOT/annotations/instances_<split>.json + images in ROOT/images/<split>/, ROOT/<split>/ or ROOT/images/
               (CVAT's COCO export: annotations/instances_default.json + images/ -> one split, val by --val-fraction)
    one file   ROOT/_annotations.coco.json or ROOT/annotations.json next to the images

Categories become class ids 1..K in category-id order (0 is background), named from the file; a category
named "background" is class 0 and at most 254 classes are read (labels/rules.py, as every reader). A
category that no annotation uses and that *other* categories name as their supercategory is left out: that
is Roboflow's placeholder (id 0, the project name), not a class (COCO's own `person`, its own supercategory,
stays a class). Split names: `valid`/`validation` -> val, and COCO's year suffix is dropped
(instances_train2017.json -> train, images still looked for in images/train2017/ or train2017/).
iscrowd (`--iscrowd`): `class` (default) paints a crowd region with its category, as torchvision's COCO
segmentation reference and COCO-Stuff's PNG conversion do (semantic segmentation has no instances to separate);
`ignore` paints it 255 (left out of loss and metrics) for exports whose crowd masks are loose.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..core.errors import PixelsegError
from .files import Names, read_json, sized_image
from .raster import (
    IGNORE,
    BadShape,
    Item,
    LabelSet,
    Problems,
    check_not_empty,
    default_palette,
    export_values,
    make_shape,
    polygons_rle,
    shape_values,
)
from .rle import RLEError, coco_rle_checked
from .rules import class_ids

ISCROWD = ("class", "ignore")
ROBOFLOW_FILE = "_annotations.coco.json"
SPLIT_ALIASES = {"valid": "val", "validation": "val"}


def split_name(name: str) -> str:
    """A folder's or file's split name as pixelseg calls it: valid -> val, train2017 -> train."""
    m = re.fullmatch(r"(train|val|valid|validation|test)(?:[-_]?(?:19|20)\d\d)", name)
    name = m.group(1) if m else name
    return SPLIT_ALIASES.get(name, name)


def discover(root: Path) -> list[tuple[str, Path, list[Path]]]:
    """(split, annotation file, image folders) of every split found under `root`."""
    if root.is_file():
        return [("train", root, [root.parent, root.parent / "images"])]
    found = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if (d / ROBOFLOW_FILE).is_file():
            found.append((split_name(d.name), d / ROBOFLOW_FILE, [d, d / "images"]))
    if found:
        return found
    for f in sorted((root / "annotations").glob("instances_*.json")):
        split = f.stem[len("instances_") :]
        folders = [root / "images" / split, root / split, root / "images", root]
        found.append((split_name(split), f, folders))
    if found:
        return found
    for name in (ROBOFLOW_FILE, "annotations.json", "instances.json"):
        if (root / name).is_file():
            return [("train", root / name, [root, root / "images"])]
    raise PixelsegError(
        f"--data-root {root}: no COCO export found (expected train/{ROBOFLOW_FILE} and valid/... as "
        f"Roboflow writes them, annotations/instances_<split>.json + images/, or {ROBOFLOW_FILE})"
    )


def _categories(files: list[tuple[Path, dict]]) -> tuple[dict[int, int], list[str], list[str]]:
    """category id -> class id, class names, notes; the same table for every split."""
    cats: dict[int, tuple[str, str, Path]] = {}
    used: set = set()
    for path, data in files:
        for c in data.get("categories") or []:
            if not isinstance(c, dict) or "id" not in c or "name" not in c:
                raise PixelsegError(f"{path}: category {c!r} lacks an id or name")
            cid, name = c["id"], str(c["name"])
            if cid in cats and cats[cid][0] != name:
                raise PixelsegError(
                    f"{path}: category id {cid} is {name!r} here but {cats[cid][0]!r} in "
                    f"{cats[cid][2]}; "
                    "the splits must share one category table"
                )
            cats[cid] = (name, str(c.get("supercategory") or ""), path)
        used.update(a.get("category_id") for a in data.get("annotations") or [] if isinstance(a, dict))
    notes, keep = [], []
    for cid in sorted(cats, key=lambda v: (str(type(v)), v)):
        name = cats[cid][0]
        parent_of_others = any(sup == name and other != cid for other, (_, sup, _) in cats.items())
        if cid not in used and parent_of_others:
            notes.append(
                f"category {cid} {name!r} left out: no annotation uses it and it is the supercategory of "
                "the others (Roboflow's placeholder), not a class"
            )
            continue
        keep.append(cid)
    origin = files[0][0] if files else "COCO"
    ids = class_ids([cats[c][0] for c in keep], origin, "categorie", unique=False)  # "...categories"
    table = dict(zip(keep, ids, strict=True))
    names = ["background"] + [""] * max([v for v in ids if v != IGNORE], default=0)
    for c, v in zip(keep, ids, strict=True):
        if 0 < v < IGNORE and not names[v]:
            names[v] = cats[c][0]
    return table, names, notes


@shape_values
def _shape(ann: dict, h: int, w: int):
    """(COCO RLE, clipped?) of one annotation's segmentation."""
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        if not seg:
            return None, False
        polys = seg if isinstance(seg[0], list) else [seg]  # some writers give one flat list
        for p in polys:
            if len(p) % 2:
                raise BadShape(f"polygon has an odd number of coordinates ({len(p)})")
        return polygons_rle(polys, h, w)
    if isinstance(seg, dict):
        try:
            return coco_rle_checked(seg, h, w), False
        except RLEError as exc:
            raise BadShape(str(exc)) from None
    raise BadShape(f"segmentation is a {type(seg).__name__}, expected polygons (list) or RLE (dict)")


def _read_file(
    path: Path,
    data: dict,
    split: str,
    folders: list[Path],
    table: dict,
    iscrowd: str,
    problems: Problems,
    names: Names,
    out: LabelSet,
) -> None:
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise PixelsegError(f"{path}: not a COCO instances file (no 'images' list)")
    images: dict = {}
    for im in data["images"]:
        where = f"image id {im.get('id')!r}" if isinstance(im, dict) else "images entry"
        if not isinstance(im, dict) or "file_name" not in im or "id" not in im:
            problems.bad(path, where, "image entry lacks id or file_name")
            continue
        name = names.take(path, f"image id {im['id']} ({im['file_name']})", split, str(im["file_name"]))
        if name is None:
            continue
        found = sized_image(
            problems, path, f"image id {im['id']}", str(im["file_name"]), folders, (im.get("width"), im.get("height"))
        )
        if found is not None:
            images[im["id"]] = Item(name, found[0], found[1], found[2], split=split, source=path, orientation=found[3])
    dropped_images = {im.get("id") for im in data["images"] if isinstance(im, dict)} - set(images)
    for order, ann in enumerate(data.get("annotations") or []):
        where = f"annotation id {ann.get('id')!r}" if isinstance(ann, dict) else f"annotation #{order}"
        if not isinstance(ann, dict):
            problems.bad(path, where, "not an object")
            continue
        item = images.get(ann.get("image_id"))
        if item is None:
            if ann.get("image_id") in dropped_images:
                continue  # its image was bad and skipped (already counted)
            problems.bad(path, where, f"image_id {ann.get('image_id')!r} is not in the file's images")
            continue
        cat = ann.get("category_id")
        if cat not in table:
            problems.bad(path, where, f"category_id {cat!r} is not declared in categories")
            continue
        try:
            rle, clipped = _shape(ann, item.height, item.width)
        except BadShape as exc:
            problems.bad(path, f"{where} (image {item.image.name})", str(exc))
            continue
        if rle is None:
            out.dropped["empty segmentation (box only)"] += 1
            continue
        out.clipped += clipped
        cid = IGNORE if ann.get("iscrowd") and iscrowd == "ignore" else table[cat]
        item.shapes.append(make_shape(cid, rle, f"{path.name} annotation {ann.get('id')}", 0, order))
    out.items.extend(images.values())


@export_values
def read(root: Path, iscrowd: str = "class", skip_bad: bool = False) -> LabelSet:
    if iscrowd not in ISCROWD:
        raise PixelsegError(f"--iscrowd {iscrowd}: choose one of {', '.join(ISCROWD)}")
    root = Path(root)
    found = discover(root)
    files = [(split, path, folders, read_json(path)) for split, path, folders in found]
    table, names_, notes = _categories([(p, d) for _, p, _, d in files if isinstance(d, dict)])
    problems = Problems(skip_bad)
    names = Names(problems)
    source = ", ".join(f"{s} ({p.relative_to(root) if root.is_dir() else p.name})" for s, p, _, _ in files)
    out = LabelSet("coco", f"COCO {source}", names_, default_palette(len(names_)), [], notes)
    for split, path, folders, data in files:
        _read_file(path, data, split, folders, table, iscrowd, problems, names, out)
    out.bad = problems.skipped
    return check_not_empty(out, files[0][1])

"""Label Studio JSON export: polygonlabels (percent coordinates), brushlabels (its RLE), rectanglelabels (--boxes).

Layout: ROOT/<export>.json (the one JSON list of tasks in ROOT, or ROOT itself as the file) + the images in
ROOT/images/ or ROOT/ (matched by file name; Label Studio's 8-hex-digit upload prefix is tried both ways).
Labels: declared by a labelling config next to the export (ROOT/*.xml with <Label value="..."/>), in its
order; without one, the names found, sorted (said so in the report). The image of a task is `data[KEY]` for
the config's <Image value="$KEY">; without a config, data's `image` (or its first value naming an image file).
Local-files URLs (`/data/local-files/?d=images/my%20photo.jpg`) are decoded and looked up under ROOT too.
A task's last annotation that was not cancelled is used; a task without one (nobody labelled it, or every
annotation was cancelled) is left out and counted, not trained as all background (labels/rules.py).
Splits: none in the export; val by --val-fraction.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.errors import PixelsegError
from ..core.images import IMAGE_SUFFIXES
from .files import Names, class_names, class_table, read_json, sized_image
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
    mask_rle,
    polygons_rle,
    rotated_box,
    shape_values,
)
from .rle import RLEError, ls_rle_decode
from .rules import note_left_out

KINDS = ("polygonlabels", "brushlabels", "rectanglelabels")


def find_export(root: Path) -> Path:
    if root.is_file():
        return root
    jsons = sorted(p for p in root.glob("*.json") if not p.name.startswith("."))
    if len(jsons) == 1:
        return jsons[0]
    raise PixelsegError(
        f"--data-root {root}: expected one Label Studio JSON export there, found "
        f"{len(jsons)}" + (f" ({', '.join(p.name for p in jsons[:4])})" if jsons else "")
    )


def _declared(base: Path) -> tuple[Sequence[str | None] | None, dict, Path | None, str | None]:
    """(label names, their colours, the config file, the data key of its <Image>) of the labelling config."""
    for p in sorted(base.glob("*.xml")):
        try:
            doc = ET.parse(p).getroot()
        except ET.ParseError as exc:
            line, col = exc.position
            raise PixelsegError(f"{p}:{line}:{col + 1}: not valid XML (labelling config)") from None
        labels = [el for el in doc.iter("Label")]
        if doc.tag == "View" and labels:
            colours = {}
            for el in labels:
                c = (el.get("background") or "").lstrip("#")
                if len(c) == 6:
                    colours[el.get("value")] = tuple(int(c[i : i + 2], 16) for i in (0, 2, 4))
            image = next((el.get("value", "") for el in doc.iter("Image") if el.get("value", "").startswith("$")), "")
            return list(dict.fromkeys(el.get("value") for el in labels)), colours, p, image[1:] or None
    return None, {}, None, None


def _image_ref(data, key: str | None):
    """The task's image reference: data[key] (the config's <Image value="$key">), else data's `image`, else its
    first string that names an image file or URL."""
    if not isinstance(data, dict):
        return None
    if key is not None:
        v = data.get(key)
        return v if isinstance(v, str) else None
    if isinstance(data.get("image"), str):
        return data["image"]
    strings = [v for v in data.values() if isinstance(v, str)]
    looks = [v for v in strings if "/" in v or Path(v.split("?")[0]).suffix.lower() in IMAGE_SUFFIXES]
    return looks[0] if looks else strings[0] if strings else None


@shape_values
def _region(r: dict, kind: str, h: int, w: int, boxes: bool):
    v = r.get("value") or {}
    if kind == "polygonlabels":
        pts = v.get("points")
        if not isinstance(pts, list):
            raise BadShape("polygonlabels without points")
        try:
            xy = np.asarray(pts, np.float64).reshape(-1, 2) * [w / 100.0, h / 100.0]
        except (TypeError, ValueError):
            raise BadShape("points are not [x%, y%] pairs") from None
        return polygons_rle([xy], h, w)
    if kind == "brushlabels":
        if v.get("format", "rle") != "rle" or not isinstance(v.get("rle"), list):
            raise BadShape("brushlabels without an rle list")
        try:
            return mask_rle(ls_rle_decode(v["rle"], h, w)), False
        except RLEError as exc:
            raise BadShape(str(exc)) from None
    if not boxes:
        return None, False
    try:
        x, y, bw, bh = (float(v[k]) for k in ("x", "y", "width", "height"))
    except (KeyError, TypeError, ValueError):
        raise BadShape("rectangle needs numeric x, y, width, height") from None
    x, y, bw, bh = x * w / 100, y * h / 100, bw * w / 100, bh * h / 100
    # Label Studio turns a rectangle about its top-left corner (x, y)
    return polygons_rle([rotated_box(box_polygon(x, y, x + bw, y + bh), v.get("rotation"), (x, y))], h, w)


def _annotation(task: dict) -> dict | None:
    anns = [a for a in (task.get("annotations") or []) if isinstance(a, dict) and not a.get("was_cancelled")]
    return anns[-1] if anns else None


def _label_of(r: dict, kind: str):
    names = (r.get("value") or {}).get(kind)
    return names[0] if isinstance(names, list) and names else None


@export_values
def read(root: Path, boxes: bool = False, skip_bad: bool = False) -> LabelSet:
    path = find_export(Path(root))
    base = path.parent
    tasks = read_json(path)
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise PixelsegError(f"{path}: not a Label Studio JSON export (expected a list of tasks)")
    declared, colours, config, key = _declared(base)
    notes = []
    if declared is None:
        found = sorted(
            {
                str(_label_of(r, r.get("type")))
                for t in tasks
                if isinstance(t, dict) and (ann := _annotation(t))
                for r in (ann.get("result") or [])
                if r.get("type") in KINDS and _label_of(r, r.get("type"))
            }
        )
        declared = found
        notes.append(
            f"no labelling config (*.xml) next to {path.name}: classes are the labels found, sorted: "
            + ", ".join(found)
        )
    table = class_table(declared, config or path, "label")
    names_ = class_names(table)
    palette = default_palette(len(names_))
    for n, c in colours.items():
        if n in table and 0 < table[n] < 255:
            palette[table[n]] = c
    problems = Problems(skip_bad)
    names = Names(problems)
    out = LabelSet("labelstudio", f"Label Studio {path.name}", names_, palette, [], notes)
    unlabelled = 0
    for t_i, task in enumerate(tasks):
        if not isinstance(task, dict):
            problems.bad(path, f"task #{t_i}", "not an object")
            continue
        if _annotation(task) is None:
            unlabelled += 1
            continue
        _task(path, task, t_i, [base / "images", base], table, boxes, problems, names, out, key)
    note_left_out(out.notes, unlabelled, "task(s) without an annotation (none, or all cancelled)")
    out.bad = problems.skipped
    return check_not_empty(out, path)


def _task(path, task, t_i, folders, table, boxes, problems, names, out, key=None) -> None:
    where = f"task {task.get('id', '#' + str(t_i))}"
    img_name = _image_ref(task.get("data") or {}, key)
    if not img_name:
        problems.bad(path, where, f"data holds no image reference{f' under {key!r}' if key else ''}")
        return
    ann = _annotation(task)
    assert ann is not None, "read() passes annotated tasks only"
    results = [r for r in (ann.get("result") or []) if isinstance(r, dict)]
    recorded = next(
        ((r.get("original_width"), r.get("original_height")) for r in results if r.get("original_width")), None
    )
    found = sized_image(problems, path, where, img_name, folders, recorded)
    if found is None:
        return
    stem = names.take(path, where, None, found[0].name)  # the file's name, not the upload's
    if stem is None:
        return
    item = Item(stem, found[0], found[1], found[2], source=path, orientation=found[3])
    for k, r in enumerate(results):
        kind = r.get("type")
        sid = f"{where} result {r.get('id', k)!r}"
        if kind not in KINDS:
            out.dropped[f"{kind} results are not regions"] += 1
            continue
        label = _label_of(r, kind)
        if label not in table:
            problems.bad(path, sid, f"label {label!r} is not declared in the labelling config")
            continue
        try:
            rle, clipped = _region(r, kind, item.height, item.width, boxes)
        except BadShape as exc:
            problems.bad(path, sid, str(exc))
            continue
        if rle is None:
            out.dropped["rectanglelabels (pass --boxes to paint boxes)"] += 1
            continue
        out.clipped += clipped
        item.shapes.append(make_shape(table[label], rle, f"{path.name} {sid}", 0, k))
    out.items.append(item)

"""CVAT for images 1.1 XML: <polygon>, <mask> (CVAT's RLE over left/top/width/height), <box> (--boxes, turned by
its `rotation`, degrees clockwise about its centre, as CVAT draws it), z_order.

Layout: ROOT/annotations.xml (or the one *.xml in ROOT) + the images in ROOT/images/ (CVAT's "save images"
export) or ROOT/. Labels and colours come from <meta>'s <labels>; an image's `subset` attribute (Train,
Validation, Test) is its split. <polyline>, <points>, <ellipse>, <skeleton> and <tag> are not regions: left
out and counted.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from ..core.errors import PixelsegError
from .files import Names, class_names, class_table, sized_image
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
from .rle import RLEError, cvat_rle_decode

SUBSETS = {"train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}
NOT_REGIONS = ("polyline", "points", "ellipse", "skeleton", "cuboid")


def find_xml(root: Path) -> Path:
    if root.is_file():
        return root
    if (root / "annotations.xml").is_file():
        return root / "annotations.xml"
    xmls = sorted(root.glob("*.xml"))
    if len(xmls) == 1:
        return xmls[0]
    raise PixelsegError(
        f"--data-root {root}: no CVAT export (annotations.xml) found"
        + (f"; several XML files: {', '.join(p.name for p in xmls[:4])}" if xmls else "")
    )


def parse_xml(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as exc:
        line, col = exc.position
        raise PixelsegError(f"{path}:{line}:{col + 1}: not valid XML ({str(exc).split(':')[0]})") from None
    except OSError as exc:
        raise PixelsegError(f"{path}: cannot read ({exc.strerror})") from None


def _labels(root_el: ET.Element, path: Path) -> tuple[dict[str, int], list]:
    labels = root_el.findall("./meta//labels/label")
    if not labels:
        raise PixelsegError(
            f"{path}: no <meta> ... <labels> declared; export 'CVAT for images 1.1' from a task or project"
        )
    names: list[str] = []
    colours: dict[str, tuple[int, int, int]] = {}
    for lab in labels:
        n = (lab.findtext("name") or "").strip()
        if not n:
            raise PixelsegError(f"{path}: a <label> without a <name>")
        names.append(n)
        c = (lab.findtext("color") or "").strip().lstrip("#")
        if len(c) == 6:
            colours[n] = (int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16))
    table = class_table(names, path, "label")
    cls = class_names(table)
    palette = default_palette(len(cls))
    for n, v in table.items():
        if 0 < v < 255 and n in colours:
            palette[v] = colours[n]
    return table, palette


@shape_values
def _shape_rle(el: ET.Element, h: int, w: int, boxes: bool):
    tag = el.tag
    if tag == "polygon":
        try:
            pts = [[float(v) for v in p.split(",")] for p in el.get("points", "").split(";") if p]
        except ValueError:
            raise BadShape(f"points {el.get('points', '')[:40]!r} are not x,y;x,y;...") from None
        return polygons_rle([pts], h, w)
    if tag == "box":
        if not boxes:
            return None, False
        try:
            x0, y0, x1, y1 = (float(el.get(k, "")) for k in ("xtl", "ytl", "xbr", "ybr"))  # missing: ValueError
        except (TypeError, ValueError):
            raise BadShape("box needs numeric xtl, ytl, xbr, ybr") from None
        return polygons_rle([rotated_box(box_polygon(x0, y0, x1, y1), el.get("rotation"))], h, w)
    if tag == "mask":
        try:
            m = cvat_rle_decode(
                el.get("rle", ""), el.get("left", 0), el.get("top", 0), el.get("width", 0), el.get("height", 0), h, w
            )
        except (RLEError, ValueError) as exc:
            raise BadShape(str(exc)) from None
        return mask_rle(m), False
    raise AssertionError(tag)


@export_values
def read(root: Path, boxes: bool = False, skip_bad: bool = False) -> LabelSet:
    path = find_xml(Path(root))
    base = path.parent
    doc = parse_xml(path)
    table, palette = _labels(doc, path)
    problems = Problems(skip_bad)
    names = Names(problems)
    out = LabelSet("cvat", f"CVAT XML {path.name}", class_names(table), palette, [])
    folders = [base / "images", base]
    for im in doc.iter("image"):
        fname = im.get("name", "")
        where = f"<image id={im.get('id')!r} name={fname!r}>"
        split = SUBSETS.get((im.get("subset") or "").strip().lower(), (im.get("subset") or "").strip().lower() or None)
        stem = names.take(path, where, split, fname)
        size = (im.get("width"), im.get("height"))
        found = sized_image(problems, path, where, fname, folders, size) if stem else None
        if found is None or not stem:  # found implies stem
            continue
        item = Item(stem, found[0], found[1], found[2], split=split, source=path, orientation=found[3])
        for k, el in enumerate(im):
            if el.tag in NOT_REGIONS or el.tag == "tag":
                out.dropped[f"<{el.tag}> is not a region"] += 1
                continue
            if el.tag not in ("polygon", "box", "mask"):
                continue
            sid = f"{where} <{el.tag}> #{k} label={el.get('label')!r}"
            label = el.get("label")
            if label not in table:
                problems.bad(path, sid, f"label {label!r} is not declared in <meta> <labels>")
                continue
            try:
                rle, clipped = _shape_rle(el, item.height, item.width, boxes)
            except BadShape as exc:
                problems.bad(path, sid, str(exc))
                continue
            if rle is None:
                out.dropped["<box> (pass --boxes to paint boxes)"] += 1
                continue
            out.clipped += clipped
            try:
                z = int(el.get("z_order", 0))
            except ValueError:
                z = 0
            item.shapes.append(make_shape(table[label], rle, f"{path.name} {sid}", z, k))
        out.items.append(item)
    out.bad = problems.skipped
    return check_not_empty(out, path)

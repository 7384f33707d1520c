"""Shapes -> one class-id mask, with the single overlap rule every reader uses; and what a parsed export holds.

Every reader turns each shape (polygon, RLE mask, box) into a COCO RLE of the whole image while it parses
(pycocotools, in C): the masks are then small, picklable for DataLoader workers, and their areas known for
the overlap rule. Polygons of every format go through pycocotools' rasteriser, so all readers share its
pixel convention (coordinates on pixel corners: the polygon (0,0)-(w,0)-(w,h)-(0,h) covers the whole image)
and a COCO file written by pycocotools reads back exactly; OpenCV is not needed for it.

Overlap rule (`--overlap`), for a pixel covered by several shapes:
    smaller (default)  higher z_order wins (CVAT's z_order; formats without one have z = 0); among equal z the
                       smaller shape is on top, so a scratch drawn inside a dent stays visible; ties: later in
                       the file on top.
    order              higher z_order wins, then the shape later in the file (as the tool draws them).
    ignore             pixels claimed by shapes of different classes become 255 (ignored in loss and metrics),
                       as torchvision's COCO segmentation reference does.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from ..core.errors import PixelsegError

IGNORE = 255
OVERLAP_RULES = ("smaller", "order", "ignore")
HUGE = 4.0  # a coordinate further than this many image sides outside the image is damage, not a clipped shape


@dataclass
class Shape:
    """One labelled region as a COCO RLE of the whole image (`rle`, compressed counts as bytes)."""

    class_id: int  # 1..K, or IGNORE
    rle: dict
    area: int
    id: str  # where it came from, for messages: "annotation 12", "labels/a.txt:3"
    z: int = 0
    order: int = 0  # position in the file


@dataclass
class Item:
    """One image and its shapes; `height`/`width` are the image's as viewers show it (EXIF-upright, rules.py)."""

    name: str
    image: Path
    height: int
    width: int
    shapes: list[Shape] = field(default_factory=list)
    split: str | None = None
    source: Path | None = None  # the annotation file (its mtime keys the decode cache)
    orientation: int = 1  # the file's EXIF Orientation: != 1 means its pixels are turned upright to read


@dataclass
class LabelSet:
    """A parsed export: classes (id 0 = background) and images with shapes, plus what the parse noticed."""

    format: str
    source: str
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    items: list[Item]
    notes: list[str] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)  # reason -> shapes left out
    clipped: int = 0  # shapes reaching past the image border
    bad: list[str] = field(default_factory=list)  # damaged items skipped by --skip-bad

    def splits(self) -> dict[str, list[Item]]:
        out: dict[str, list[Item]] = {}
        for it in self.items:
            out.setdefault(it.split or "train", []).append(it)
        return out


class Problems:
    """Bad input: one line naming the file and the annotation, or (with --skip-bad) noted and skipped."""

    def __init__(self, skip_bad: bool = False):
        self.skip_bad = bool(skip_bad)
        self.skipped: list[str] = []

    def bad(self, file, where: str, msg: str) -> None:
        line = f"{file}: {where}: {msg}"
        if not self.skip_bad:
            raise PixelsegError(line + " (pass --skip-bad to skip damaged items)")
        self.skipped.append(line)


class BadShape(Exception):
    """A shape that cannot be used; the message says why (readers report it through Problems)."""


# What Python raises on a value of the wrong type or range deep inside a conversion (int(None), a list as a
# dict key, float("x"), a number too large for numpy): in an export, damage to report, not a pixelseg bug.
VALUE_ERRORS = (TypeError, ValueError, OverflowError, AttributeError, IndexError)


def shape_values(fn):
    """Decorate a reader's shape conversion: a wrong-typed value inside one shape is a BadShape (reported with
    the file and the shape's id, or skipped by --skip-bad), not a traceback (found by tests/test_fuzz_labels.py)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VALUE_ERRORS as exc:
            raise BadShape(f"unexpected value ({type(exc).__name__}: {_first_line(exc)})") from None

    return wrapper


def export_values(fn):
    """Decorate a reader's read(root, ...): a wrong-typed value in the export's structure (a list as an image id,
    a number as a name) is one PixelsegError naming the export, not a traceback."""

    @functools.wraps(fn)
    def wrapper(root, *args, **kwargs):
        try:
            return fn(root, *args, **kwargs)
        except (*VALUE_ERRORS, KeyError, RecursionError) as exc:
            raise PixelsegError(
                f"{root}: damaged export: unexpected value ({type(exc).__name__}: {_first_line(exc)})"
            ) from None

    return wrapper


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def tab20_rgb() -> list[tuple[int, int, int]]:
    """matplotlib's tab20 colours as 0..255 RGB triples."""
    import matplotlib
    from matplotlib.colors import ListedColormap

    cmap = cast(ListedColormap, matplotlib.colormaps["tab20"])  # tab20 is a listed colormap
    return [(round(255 * r), round(255 * g), round(255 * b)) for r, g, b in np.asarray(cmap.colors, float).tolist()]


def _colours():
    """tab20, then golden-ratio hues over three saturations and three values: an endless stream of colours."""
    import colorsys

    yield from tab20_rgb()
    i = 0
    while True:
        rgb = colorsys.hsv_to_rgb((i * 0.6180339887) % 1.0, (0.9, 0.6, 0.4)[i % 3], (0.95, 0.75, 0.55)[(i // 3) % 3])
        yield tuple(round(255 * v) for v in rgb)
        i += 1


def default_palette(n: int) -> list[tuple[int, int, int]]:
    """Black background, then tab20's colours, then more: n distinct colours for any n."""
    return distinct_palette([(0, 0, 0)] + [None] * (n - 1))


def distinct_palette(palette: list) -> list[tuple[int, int, int]]:
    """`palette` with every missing (None) or repeated colour replaced by the next unused default one, so each
    colour names one class (as `--dataset folder`'s classes.csv requires); background keeps black."""
    out, used = [], set()
    stream = _colours()
    for c in palette:
        c = None if c is None else tuple(int(v) for v in c)
        while c is None or c in used:
            c = next(stream)
        out.append(c)
        used.add(c)
    return out


def _check_points(pts: np.ndarray, h: int, w: int) -> bool:
    """Raise BadShape for NaN/huge coordinates or < 3 points; True when the shape reaches past the border."""
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3:
        raise BadShape(f"polygon has {len(pts) if pts.ndim == 2 else pts.size / 2:g} point(s); at least 3 needed")
    if not np.isfinite(pts).all():
        raise BadShape("polygon has NaN or infinite coordinates")
    lim = HUGE * max(h, w)
    if (np.abs(pts) > lim).any():
        raise BadShape(f"polygon coordinate {float(np.abs(pts).max()):g} is far outside the {w}×{h} image")
    return bool((pts[:, 0] < 0).any() or (pts[:, 1] < 0).any() or (pts[:, 0] > w).any() or (pts[:, 1] > h).any())


def polygons_rle(polygons, h: int, w: int) -> tuple[dict, bool]:
    """Polygons (each N×2 (x, y) in pixels, or a flat [x1, y1, ...] list) -> (merged COCO RLE, clipped?)."""
    from pycocotools import mask as mask_utils

    flat, clipped = [], False
    for poly in polygons:
        try:
            pts = np.asarray(poly, np.float64).reshape(-1, 2)
        except (TypeError, ValueError):
            raise BadShape("polygon coordinates are not numbers in (x, y) pairs") from None
        clipped |= _check_points(pts, h, w)
        flat.append(pts.ravel().tolist())
    if not flat:
        raise BadShape("no polygon")
    rles = mask_utils.frPyObjects(flat, h, w)
    return (rles[0] if len(rles) == 1 else mask_utils.merge(rles)), clipped


def box_polygon(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)


def rotation_degrees(value) -> float:
    """A shape's `rotation` attribute as degrees; BadShape when it is not a finite number."""
    if value is None or value == "":
        return 0.0
    try:
        a = float(value)
    except (TypeError, ValueError):
        raise BadShape(f"rotation {value!r} is not a number (degrees)") from None
    if not math.isfinite(a):
        raise BadShape(f"rotation {value!r} is not a finite number (degrees)")
    return a


def rotated_box(corners: np.ndarray, degrees, about=None) -> np.ndarray:
    """A box's 4 corners turned `degrees` clockwise on screen (y points down) about `about` (default: the
    box's centre, as CVAT turns boxes; Label Studio turns about the top-left corner)."""
    a = math.radians(rotation_degrees(degrees))
    if a == 0:
        return corners
    c = corners.mean(0) if about is None else np.asarray(about, np.float64)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return (corners - c) @ rot.T + c


def mask_rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    return mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))


def make_shape(class_id: int, rle: dict, id: str, z: int = 0, order: int = 0) -> Shape:
    from pycocotools import mask as mask_utils

    return Shape(int(class_id), rle, int(mask_utils.area(rle)), id, int(z), int(order))


def _paint_order(shapes: list[Shape], overlap: str) -> list[Shape]:
    if overlap == "smaller":
        return sorted(shapes, key=lambda s: (s.z, -s.area, s.order))
    return sorted(shapes, key=lambda s: (s.z, s.order))


def rasterize(shapes: list[Shape], h: int, w: int, overlap: str = "smaller") -> np.ndarray:
    """uint8 h×w class ids (0 = background) from the shapes, overlaps resolved by `overlap` (module doc)."""
    from pycocotools import mask as mask_utils

    if overlap not in OVERLAP_RULES:
        raise PixelsegError(f"--overlap {overlap}: choose one of {', '.join(OVERLAP_RULES)}")
    out = np.zeros((h, w), np.uint8)
    if not shapes:
        return out
    conflict = np.zeros((h, w), bool) if overlap == "ignore" else None
    for s in _paint_order(shapes, overlap):
        m = mask_utils.decode(s.rle).astype(bool)
        if m.shape != (h, w):
            raise PixelsegError(f"{s.id}: mask is {m.shape[1]}×{m.shape[0]} but the image is {w}×{h}")
        if conflict is not None:
            conflict |= m & (out != 0) & (out != s.class_id)
        out[m] = s.class_id
    if conflict is not None:
        out[conflict] = IGNORE
    return out


def check_not_empty(labels: LabelSet, file) -> LabelSet:
    """An export without images, or without a single shape, is a mistake (wrong file, export of nothing)."""
    if not labels.items:
        raise PixelsegError(
            f"{file}: empty export: no usable images" + (f" ({len(labels.bad)} skipped as bad)" if labels.bad else "")
        )
    if not any(it.shapes for it in labels.items):
        raise PixelsegError(f"{file}: empty export: {len(labels.items)} image(s) but not one labelled shape")
    return labels


def finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False

"""The rules all five readers (COCO, CVAT, Label Studio, LabelMe, YOLO) share, each written once here.

Orientation    Annotations are drawn on the image as a viewer shows it: turned upright as its EXIF Orientation
               tag says. CVAT, LabelMe and Label Studio annotate in the browser/Qt view (upright), Ultralytics
               reads YOLO images upright (OpenCV applies the tag), and pixelseg's own `predict --format ...`
               writes upright sizes. So every reader sizes an image upright (`upright_hw`), checks recorded sizes
               against that, and the samples are decoded upright (data/labelled.py). Orientations 5-8 swap width
               and height; 2, 3, 4 and 7 mirror or turn the grid without changing its size.
Background     A class named "background" or "_background_" (any case) is class 0, the background every mask
               already has; "__ignore__" (LabelMe's) is 255. Every other declared name gets 1..K in order.
Class limit    At most MAX_CLASSES (254) classes besides background: ids are uint8 and 255 is "ignore".
Unlabelled     An item nobody labelled (a Label Studio task without an annotation, or whose annotations were all
               cancelled) is left out and counted in the report; an item labelled with no shapes (an empty
               result, a YOLO image without a .txt, a COCO image without annotations) is all background.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..core.errors import PixelsegError

BACKGROUND_NAMES = ("background", "_background_")
IGNORE_NAMES = ("__ignore__",)
MAX_CLASSES = 254


# ---- orientation -----------------------------------------------------------------------------------------
def orientation_of(img) -> int:
    """The EXIF Orientation (1..8) of an opened PIL image; 1 when absent or unreadable."""
    from ..core.images import exif_orientation

    return exif_orientation(img)


def upright_hw(path: Path) -> tuple[int, int, int] | None:
    """(height, width, orientation) of the image as a viewer shows it (EXIF-upright), from the header;
    None when the file is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            o = orientation_of(im)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return (w, h, o) if o in (5, 6, 7, 8) else (h, w, o)


def stored_size_note(o: int) -> str:
    """Why a recorded size that equals the stored grid is refused (orientations 5-8)."""
    return (
        f"; its EXIF Orientation {o} turns it by 90° for viewers, and annotation tools label the upright "
        "image, so the export was made from a copy without the tag (strip the tag, e.g. "
        "`exiftool -Orientation= FILE`, or re-export from the tool)"
    )


# ---- class names ------------------------------------------------------------------------------------------
def is_background(name) -> bool:
    return str(name).strip().lower() in BACKGROUND_NAMES


def check_class_count(k: int, file, what: str) -> None:
    """One limit, one message, in every reader: `k` classes besides background."""
    if k > MAX_CLASSES:
        raise PixelsegError(
            f"{file}: {k} {what}s; at most {MAX_CLASSES} classes besides background are supported "
            "(class ids are 8-bit and 255 means ignore)"
        )


def class_ids(names: Sequence[object], file, what: str, unique: bool = True) -> list[int]:
    """Declared names, in order -> class ids: background names 0, '__ignore__' 255, the others 1..K in order.
    `unique=False` gives a repeated name (COCO files have them) the id of its first declaration."""
    out: list[int] = []
    first: dict[str, int] = {}
    k = 0
    for n in names:
        n = str(n)
        if n in first:
            if unique:
                raise PixelsegError(f"{file}: {what} {n!r} is declared twice")
            out.append(first[n])
            continue
        if n in IGNORE_NAMES:
            v = 255
        elif is_background(n):
            v = 0
        else:
            k += 1
            v = k
        first[n] = v
        out.append(v)
    check_class_count(k, file, what)
    return out


# ---- unlabelled items -------------------------------------------------------------------------------------
def note_left_out(notes: list[str], n: int, what: str) -> None:
    """Items nobody labelled: left out, and said so in the report."""
    if n:
        notes.append(f"{n} {what} left out: not labelled (an unlabelled image is not all background)")

"""What every reader does with files: parse JSON with line/column, find and size images, keep names unique."""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import PixelsegError
from .raster import Problems

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def read_json(path: Path):
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise PixelsegError(f"{path}: cannot read ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PixelsegError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None


def image_hw(path: Path) -> tuple[int, int] | None:
    """(height, width) from the file's header, None when it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def find_image(name: str, folders: list[Path]) -> Path | None:
    """`name` (as the export records it: a relative path, a URL or an upload path) under one of `folders`."""
    name = name.replace("\\", "/")
    if "://" in name or name.startswith("/data/"):
        name = name.rsplit("/", 1)[-1]
    cands = [name, name.rsplit("/", 1)[-1]]
    m = re.match(r"^[0-9a-f]{8}-(.+)$", cands[-1])  # Label Studio prefixes uploads with 8 hex digits
    if m:
        cands.append(m.group(1))
    for folder in folders:
        for c in cands:
            p = folder / c
            if p.is_file():
                return p
    return None


def sized_image(problems: Problems, file, where: str, name: str, folders: list[Path],
                recorded: tuple | None = None) -> tuple[Path, int, int] | None:
    """The image of an annotation, checked: exists, decodes, and has the recorded (width, height)."""
    path = find_image(name, folders)
    if path is None:
        problems.bad(file, where, f"image {name!r} not found in {', '.join(str(f) for f in folders[:3])}")
        return None
    hw = image_hw(path)
    if hw is None:
        problems.bad(file, where, f"image {path} cannot be read")
        return None
    if recorded and all(v is not None for v in recorded):
        try:
            rw, rh = int(float(recorded[0])), int(float(recorded[1]))
        except (TypeError, ValueError):
            problems.bad(file, where, f"recorded size {recorded} is not a number pair")
            return None
        if (rh, rw) != hw:
            problems.bad(file, where, f"records {name!r} as {rw}×{rh} but the file {path.name} is {hw[1]}×{hw[0]}")
            return None
    return path, hw[0], hw[1]


class Names:
    """Sample names (image stems) unique per split: two images with one name are bad input."""

    def __init__(self, problems: Problems):
        self.problems, self.seen = problems, {}

    def take(self, file, where: str, split: str | None, image_name: str) -> str | None:
        stem = Path(image_name.replace("\\", "/").rsplit("/", 1)[-1]).stem
        key = (split, stem)
        if key in self.seen:
            self.problems.bad(file, where, f"duplicate image name {stem!r} (also {self.seen[key]}); image names "
                                           "must be unique within a split")
            return None
        self.seen[key] = where
        return stem


def class_table(names: list[str], file, what: str) -> dict[str, int]:
    """Declared label names -> class ids 1..K (0 is background); '__ignore__' (LabelMe's) -> 255."""
    out: dict[str, int] = {}
    k = 1
    for n in names:
        if n in out:
            raise PixelsegError(f"{file}: {what} {n!r} is declared twice")
        if n in ("__ignore__",):
            out[n] = 255
            continue
        if n in ("_background_", "background"):
            out[n] = 0
            continue
        out[n] = k
        k += 1
    if k > 255:
        raise PixelsegError(f"{file}: {k - 1} {what}s; at most 254 classes are supported")
    return out


def class_names(table: dict[str, int]) -> list[str]:
    names = ["background"] + [""] * max([v for v in table.values() if v != 255], default=0)
    for n, v in table.items():
        if 0 < v < 255:
            names[v] = n
    return names

"""What every reader does with files: parse JSON with line/column, find and size images, keep names unique."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..core.errors import PixelsegError
from .raster import Problems
from .rules import class_ids, stored_size_note, upright_hw


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
    """(height, width) of the image as viewers show it (EXIF-upright, rules.py), None when missing or unreadable."""
    hw = upright_hw(path)
    return None if hw is None else hw[:2]


def reference_name(name: str) -> str:
    """The file path an export records for an image: a relative path, or what a URL points at. Label Studio's
    local-files URLs (`/data/local-files/?d=images/my%20photo.jpg`, as pixelseg's writer makes them) carry it
    URL-encoded in `d`; upload URLs (`/data/upload/1/0123abcd-a.jpg`) and http(s) URLs in their path."""
    name = name.replace("\\", "/")
    if "://" in name or name.startswith("/data/") or "?d=" in name:
        parts = urlsplit(name)
        d = [unquote(v[2:]) for v in parts.query.split("&") if v.startswith("d=")]  # %20 decoded, "+" kept
        if d and d[0]:
            return d[0].lstrip("/")
        return unquote(parts.path).rsplit("/", 1)[-1]
    return name


def find_image(name: str, folders: list[Path]) -> Path | None:
    """`name` (as the export records it: a relative path, a URL or an upload path) under one of `folders`."""
    name = reference_name(name)
    cands = [name, name.rsplit("/", 1)[-1]]
    m = re.match(r"^[0-9a-f]{8}-(.+)$", cands[-1])  # Label Studio prefixes uploads with 8 hex digits
    if m:
        cands.append(m.group(1))
    for folder in folders:
        for c in cands:
            p = folder / c
            if is_file(p):
                return p
    return None


def is_file(p: Path) -> bool:
    """Path.is_file() that is False for a name the OS refuses (too long, NUL byte): names in an export are
    outside data, and such a name is a missing image, reported as one."""
    try:
        return p.is_file()
    except (OSError, ValueError):
        return False


def sized_image(
    problems: Problems, file, where: str, name: str, folders: list[Path], recorded: tuple | None = None
) -> tuple[Path, int, int, int] | None:
    """The image of an annotation, checked: exists, decodes, and has the recorded (width, height) when turned
    upright (rules.py); returns (path, upright height, upright width, EXIF orientation)."""
    path = find_image(name, folders)
    if path is None:
        problems.bad(file, where, f"image {name!r} not found in {', '.join(str(f) for f in folders[:3])}")
        return None
    hw = upright_hw(path)
    if hw is None:
        problems.bad(file, where, f"image {path} cannot be read")
        return None
    if recorded and all(v is not None for v in recorded):
        try:
            rw, rh = int(float(recorded[0])), int(float(recorded[1]))
        except (TypeError, ValueError):
            problems.bad(file, where, f"recorded size {recorded} is not a number pair")
            return None
        if (rh, rw) != hw[:2]:
            why = stored_size_note(hw[2]) if (rw, rh) == (hw[0], hw[1]) and hw[2] >= 5 else ""
            problems.bad(
                file,
                where,
                f"records {name!r} as {rw}×{rh} but the file {path.name} is {hw[1]}×{hw[0]}"
                + (" upright" if hw[2] >= 5 else "")
                + why,
            )
            return None
    return path, hw[0], hw[1], hw[2]


class Names:
    """Sample names (image stems) unique per split: two images with one name are bad input."""

    def __init__(self, problems: Problems):
        self.problems = problems
        self.seen: dict[tuple[str | None, str], str] = {}  # (split, stem) -> where first seen

    def take(self, file, where: str, split: str | None, image_name: str) -> str | None:
        stem = Path(image_name.replace("\\", "/").rsplit("/", 1)[-1]).stem
        key = (split, stem)
        if key in self.seen:
            self.problems.bad(
                file,
                where,
                f"duplicate image name {stem!r} (also {self.seen[key]}); image names must be unique within a split",
            )
            return None
        self.seen[key] = where
        return stem


def class_table(names: Sequence[object], file, what: str) -> dict[str, int]:
    """Declared label names -> class ids (rules.py: background names 0, '__ignore__' 255, others 1..K)."""
    return dict(zip(map(str, names), class_ids(names, file, what), strict=True))


def class_names(table: dict[str, int]) -> list[str]:
    names = ["background"] + [""] * max([v for v in table.values() if v != 255], default=0)
    for n, v in table.items():
        if 0 < v < 255:
            names[v] = n
    return names

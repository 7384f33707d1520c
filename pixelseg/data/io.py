"""Image and mask decoding that reports bad files by name instead of failing deep inside PIL."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import PixelsegError

# Large photos are common in user data; PIL's default bomb limit (~89 MP) rejects some real ones.
Image.MAX_IMAGE_PIXELS = 400_000_000


class UnreadableImage(PixelsegError):
    """A file that is not a decodable image; datasets skip these and count them."""


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load() if img.format != "JPEG" else None
        return img
    except FileNotFoundError as exc:
        raise UnreadableImage(f"{path}: file not found") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImage(f"{path}: not a readable image ({exc.__class__.__name__}: {exc})") from exc


def read_image(path: Path | str, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode by content (a GIF or PNG named .jpg is fine), any mode -> RGB uint8 H×W×3.

    With `size` (h, w) the result is resized with PIL's antialiased bilinear filter; for JPEGs the
    decoder's DCT scaling (`draft`) first skips the resolution that would be thrown away anyway.
    """
    path = Path(path)
    return to_rgb_array(_open(path), path, size)


def to_rgb_array(img: Image.Image, name, size: tuple[int, int] | None = None) -> np.ndarray:
    """An opened PIL image (file or upload) -> RGB uint8 H×W×3: first frame, alpha over black,
    16-bit grey scaled to 8 bits, CMYK/palette/grey converted. `pixelseg serve` decodes uploads
    with this too, so the server and `predict` see the same pixels."""
    try:
        if size is not None and img.format == "JPEG":
            img.draft("RGB", (size[1] * 2, size[0] * 2))
        if getattr(img, "is_animated", False):
            img.seek(0)
        if img.mode.startswith("I;16") or img.mode == "I":
            # PIL's own I;16 -> RGB conversion clips at 255 (a 16-bit photo turns white); keep the top byte
            arr = np.asarray(img, dtype=np.uint32)
            img = Image.fromarray((arr >> 8 if img.mode != "I" or arr.max(initial=0) > 255 else arr)
                                  .clip(0, 255).astype(np.uint8), mode="L")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (0, 0, 0, 255))
            img = Image.alpha_composite(background, img)
        img = img.convert("RGB")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BILINEAR, reducing_gap=None)
        return np.array(img, dtype=np.uint8)  # writable copy: torch.from_numpy warns on read-only arrays
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImage(f"{name}: image data is corrupt ({exc})") from exc


def read_mask(path: Path | str, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a single-channel label mask (values = class ids) as uint8 H×W; NEAREST resize keeps ids."""
    path = Path(path)
    img = _open(path)
    try:
        if img.mode not in ("L", "P", "I", "I;16", "1"):
            raise PixelsegError(f"{path}: mask has mode {img.mode}; expected a single-channel label image "
                                "(8-bit grey or palette PNG whose values are class ids)")
        arr = np.asarray(img)
        if arr.max(initial=0) > 255:
            raise PixelsegError(f"{path}: mask values go up to {arr.max()}, more than 255 classes is not supported")
        arr = arr.astype(np.uint8)
        if size is not None and arr.shape != tuple(size):
            arr = np.asarray(Image.fromarray(arr).resize((size[1], size[0]), Image.NEAREST))
        return arr
    except (OSError, SyntaxError) as exc:
        raise UnreadableImage(f"{path}: mask data is corrupt ({exc})") from exc


def image_size(path: Path | str) -> tuple[int, int]:
    """(h, w) without decoding pixels."""
    img = _open(Path(path))
    return img.size[1], img.size[0]


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def collect_images(paths) -> list[Path]:
    """Image files named directly, or found (by suffix) in the directories named."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            files.append(p)
        else:
            raise PixelsegError(f"{p}: no such file or directory")
    if not files:
        raise PixelsegError(f"no images found in {', '.join(map(str, paths))}")
    return files

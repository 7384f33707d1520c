"""Run-length codecs of the three tools: COCO (pycocotools), CVAT masks and Label Studio brushes.

Every decoder returns a bool H×W mask of the whole image and raises PixelsegError (via `RLEError`, which
callers turn into one line naming the file and the shape) when the runs do not add up to the size.

COCO RLE goes through pycocotools. CVAT's and Label Studio's are written here by hand: CVAT ships no
library for its XML format (its RLE lives inside the server's Django code), and label-studio-converter,
which has Label Studio's brush codec, pins many packages (pandas, an old Pillow, label-studio-sdk ...)
that a training toolkit should not drag in. Both are a few dozen lines of well-specified bit fiddling.

    cvat_rle_decode(counts, left, top, width, height, img_h, img_w) -> bool mask (img_h × img_w)
    cvat_rle_encode(mask) -> (counts, left, top, width, height)       counts: list[int]
    ls_rle_decode(rle, h, w) -> bool mask                              rle: list[int] of bytes
    ls_rle_encode(mask) -> list[int]
    coco_rle_decode(rle, h, w) -> bool mask                            rle: {"size": [h, w], "counts": ...}
    coco_rle_encode(mask) -> {"size": [h, w], "counts": str}           (compressed, JSON-ready)
"""

from __future__ import annotations

import numpy as np

from ..core.errors import PixelsegError


class RLEError(PixelsegError):
    """Runs that do not fit the image; the message says how (the caller adds file and shape id)."""


# ---- shared: runs of a flat bool array --------------------------------------------------------------
def _runs(flat: np.ndarray) -> list[int]:
    """Alternating run lengths of a flat bool array, starting with a (possibly empty) run of False."""
    flat = np.asarray(flat, bool).ravel()
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    lengths = np.diff(bounds).tolist()
    return [0, *lengths] if flat[0] else lengths


def _unruns(counts, n: int, what: str) -> np.ndarray:
    counts = np.asarray(counts, np.int64)
    if counts.size and counts.min() < 0:
        raise RLEError(f"{what}: negative run length {int(counts.min())}")
    total = int(counts.sum())
    if total != n:
        raise RLEError(f"{what}: runs add up to {total} pixels but the area is {n}")
    values = (np.arange(counts.size) % 2).astype(bool)
    return np.repeat(values, counts)


# ---- CVAT for images 1.1: <mask rle="..." left top width height> -------------------------------------
def parse_cvat_counts(text: str) -> list[int]:
    """The `rle` attribute ("3, 5, 2, ...") -> ints."""
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise RLEError(f"rle attribute is not a comma-separated list of integers ({text[:40]!r}...)") from None


def cvat_rle_decode(
    counts, left: float | str, top: float | str, width: float | str, height: float | str, img_h: int, img_w: int
) -> np.ndarray:
    """CVAT's mask: runs (background first) over the width×height box at (left, top), row by row (the box as
    numbers or the XML's attribute strings)."""
    if isinstance(counts, str):
        counts = parse_cvat_counts(counts)
    left, top, width, height = (round(float(v)) for v in (left, top, width, height))
    if width < 1 or height < 1:
        raise RLEError(f"mask box {width}×{height} is empty")
    if left < 0 or top < 0 or left + width > img_w or top + height > img_h:
        raise RLEError(f"mask box left={left} top={top} {width}×{height} lies outside the {img_w}×{img_h} image")
    box = _unruns(counts, width * height, f"mask rle over its {width}×{height} box").reshape(height, width)
    out = np.zeros((img_h, img_w), bool)
    out[top : top + height, left : left + width] = box
    return out


def cvat_rle_encode(mask: np.ndarray) -> tuple[list[int], int, int, int, int]:
    """Bool mask -> (counts, left, top, width, height) over the mask's bounding box, as CVAT writes it.
    An empty mask has no box: a 1×1 box at (0, 0) with one background run."""
    mask = np.asarray(mask, bool)
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return [1], 0, 0, 1, 1
    top, bottom, left, right = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
    box = mask[top : bottom + 1, left : right + 1]
    return _runs(box), left, top, right - left + 1, bottom - top + 1


# ---- Label Studio brush: value.rle (thi-ng/rle-pack over the RGBA bytes) -------------------------------
# Stream of bits, most significant first: 32-bit count of values, 5-bit (word size - 1), four 4-bit
# (run-length field size - 1); then blocks: 1 bit "repeat?", 2 bits which length field, (length - 1) in that
# many bits, then one value (repeat) or `length` values (literal), each `word size` bits. The values are the
# H×W×4 RGBA bytes of the brush image; the mask is the alpha channel (as label-studio-converter reads it).
_LS_WORD = 8
_LS_SIZES = (3, 4, 8, 16)


def ls_rle_decode(rle, h: int, w: int) -> np.ndarray:
    """Label Studio brush RLE (list of byte values) -> bool mask h×w (alpha > 0)."""
    data = bytes(int(b) & 0xFF for b in rle)
    bits = "".join(f"{b:08b}" for b in data)
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        if pos + n > len(bits):
            raise RLEError(f"brush rle ends early (bit {pos} of {len(bits)})")
        v = int(bits[pos : pos + n], 2) if n else 0
        pos += n
        return v

    num = read(32)
    if num != h * w * 4:
        raise RLEError(f"brush rle holds {num} values but the {w}×{h} image needs {h * w * 4} (RGBA)")
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, np.uint8)
    i = 0
    while i < num:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        if j > num:
            raise RLEError(f"brush rle run ends at value {j}, past the {num} values it declares")
        if repeat:
            out[i:j] = read(word)
        else:
            for k in range(i, j):
                out[k] = read(word)
        i = j
    return out.reshape(h, w, 4)[:, :, 3] > 0


def ls_rle_encode(mask: np.ndarray) -> list[int]:
    """Bool mask -> Label Studio brush RLE (list of byte values): RGBA all 255 where the mask is set."""
    flat = np.repeat(np.asarray(mask, bool).ravel().astype(np.uint8) * 255, 4)
    parts = [f"{flat.size:032b}", f"{_LS_WORD - 1:05b}"] + [f"{s - 1:04b}" for s in _LS_SIZES]
    longest = 1 << _LS_SIZES[-1]
    start = 0
    for length in _runs(flat > 0):
        val = int(flat[start]) if length else 0
        left = length
        while left > 0:
            n = min(left, longest)
            k = next(i for i, s in enumerate(_LS_SIZES) if n - 1 < (1 << s))
            parts.append(f"1{k:02b}{n - 1:0{_LS_SIZES[k]}b}{val:08b}")
            left -= n
        start += length
    bits = "".join(parts)
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


# ---- COCO: pycocotools --------------------------------------------------------------------------------
def coco_rle_decode(rle: dict, h: int, w: int) -> np.ndarray:
    """COCO RLE, compressed (counts: str) or uncompressed (counts: list), -> bool h×w mask."""
    from pycocotools import mask as mask_utils

    rle = coco_rle_checked(rle, h, w)
    try:
        return mask_utils.decode(rle).astype(bool)
    except Exception as exc:  # pycocotools raises bare Exceptions / ValueErrors on corrupt strings
        raise RLEError(f"RLE cannot be decoded ({exc})") from None


def coco_rle_checked(rle: dict, h: int, w: int) -> dict:
    """COCO RLE (either kind) whose runs were checked to cover exactly h×w, as pycocotools' compressed dict
    (counts: bytes); pycocotools itself silently truncates or zero-fills runs that do not fit."""
    from pycocotools import mask as mask_utils

    size = rle.get("size") if isinstance(rle, dict) else None
    if not (isinstance(size, (list, tuple)) and len(size) == 2):
        raise RLEError("RLE has no size [height, width]")
    try:
        rh, rw = (_whole(v) for v in size)
    except (TypeError, ValueError, OverflowError):
        raise RLEError(f"RLE size {size!r} is not two whole numbers [height, width]") from None
    if [rh, rw] != [h, w]:
        raise RLEError(f"RLE size {size[1]}×{size[0]} (w×h) differs from the image's {w}×{h}")
    counts = rle.get("counts")
    if isinstance(counts, list):  # uncompressed: check the length before pycocotools reads past it
        try:
            runs = [_whole(c) for c in counts]
        except (TypeError, ValueError, OverflowError):
            bad = next(c for c in counts if not _is_whole(c))
            raise RLEError(f"uncompressed RLE counts hold {bad!r}, not a whole number") from None
        if min(runs, default=0) < 0:
            raise RLEError(f"uncompressed RLE has a negative run length {min(runs)}")
        if sum(runs) != h * w:
            raise RLEError(f"uncompressed RLE runs add up to {sum(runs)} pixels but the image has {h * w}")
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": runs}, h, w)
    elif isinstance(counts, (str, bytes)):
        try:
            text = counts.decode("ascii") if isinstance(counts, bytes) else counts
            text.encode("ascii")
        except (UnicodeDecodeError, UnicodeEncodeError):
            raise RLEError("compressed RLE counts hold non-ASCII characters") from None
        runs = coco_counts_from_string(text)
        if min(runs, default=0) < 0 or sum(runs) != h * w:
            raise RLEError(f"compressed RLE runs add up to {sum(runs)} pixels but the image has {h * w}")
        rle = {"size": [h, w], "counts": text.encode("ascii")}
    else:
        raise RLEError("RLE counts must be a string (compressed) or a list of integers (uncompressed)")
    return rle


def _whole(v) -> int:
    """An int, or a float/str that is exactly one (JSON writers emit 30.0); anything else raises ValueError."""
    if isinstance(v, bool):
        raise ValueError(v)
    if isinstance(v, int):
        return v
    f = float(v)
    if not f.is_integer():
        raise ValueError(v)
    return int(f)


def _is_whole(v) -> bool:
    try:
        _whole(v)
        return True
    except (TypeError, ValueError, OverflowError):
        return False


def coco_counts_from_string(counts: str) -> list[int]:
    """A compressed COCO RLE string -> its run lengths, as pycocotools' rleFrString (maskApi.c) reads it.
    Needed because pycocotools' decode() silently truncates or zero-fills runs that do not add up to h×w."""
    out: list[int] = []
    p, m = 0, len(counts)
    while p < m:
        x, k, more = 0, 0, True
        while more:
            if p >= m:
                raise RLEError("compressed RLE string ends inside a number")
            c = ord(counts[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def coco_rle_encode(mask: np.ndarray) -> dict:
    """Bool mask -> compressed COCO RLE with str counts (JSON-ready)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}

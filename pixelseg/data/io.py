"""Image and mask decoding that reports bad files by name instead of failing deep inside PIL."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..core.errors import PixelsegError
from ..core.images import IMAGE_SUFFIXES, exif_orientation

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec; while decode_jpeg exists it is used
# for full-resolution JPEGs (see decode_jpeg_fast), and when it goes PIL takes over with identical pixels.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)

# Large photos are common in user data; PIL's default bomb limit (~89 MP) rejects some real ones.
Image.MAX_IMAGE_PIXELS = 400_000_000


class UnreadableImage(PixelsegError):
    """A file that is not a decodable image; datasets skip these and count them."""


def _open(path, name=None) -> Image.Image:
    """`path` may be a file object (a shard member); `name` then says what to call it in messages."""
    name = name or path
    try:
        img = Image.open(path)
        img.load() if img.format != "JPEG" else None
        return img
    except FileNotFoundError as exc:
        raise UnreadableImage(f"{name}: file not found") from exc
    except Image.DecompressionBombError as exc:  # not an OSError: it used to escape as a traceback
        raise UnreadableImage(f"{name}: not read: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImage(f"{name}: not a readable image ({exc.__class__.__name__}: {exc})") from exc


def read_image(path, size: tuple[int, int] | None = None, name=None, exif_transpose: bool = False) -> np.ndarray:
    """Decode by content (a GIF or PNG named .jpg is fine), any mode -> RGB uint8 H×W×3.

    With `size` (h, w) the result is resized with PIL's antialiased bilinear filter; for JPEGs the
    decoder's DCT scaling (`draft`) first skips the resolution that would be thrown away anyway.
    `exif_transpose` turns the pixels as the EXIF Orientation tag says (the image as people see it:
    what predict and serve segment); datasets leave it off, their masks label the stored grid.
    """
    path = Path(path) if isinstance(path, str) else path
    img = _open(path, name)
    turn = exif_transpose and exif_orientation(img) != 1
    if size is None and img.format == "JPEG" and img.mode in ("RGB", "L"):
        out = decode_jpeg_fast(path, turn)
        if out is not None:
            return out
    return to_rgb_array(upright(img, name or path) if turn else img, name or path, size)


def upright(img: Image.Image, name) -> Image.Image:
    """`img` turned as its EXIF orientation says (PIL.ImageOps.exif_transpose)."""
    try:
        return ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImage(f"{name}: image data is corrupt ({exc})") from exc


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
            img = Image.fromarray(
                (arr >> 8 if img.mode != "I" or arr.max(initial=0) > 255 else arr).clip(0, 255).astype(np.uint8),
                mode="L",
            )
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (0, 0, 0, 255))
            img = Image.alpha_composite(background, img)
        img = img.convert("RGB")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR, reducing_gap=None)
        return np.array(img, dtype=np.uint8)  # writable copy: torch.from_numpy warns on read-only arrays
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImage(f"{name}: image data is corrupt ({exc})") from exc


def decode_jpeg_fast(path, exif_transpose: bool = False) -> np.ndarray | None:
    """Full-resolution JPEG through torchvision.io.decode_jpeg: measured faster than PIL on the pets
    photos and bit-identical to PIL's RGB conversion (benchmarks/data/bench_data.py decoders, docs/benchmarks.md,
    "Numbers behind choices in the code").
    At a reduced size PIL stays: its DCT-domain downscaling (`draft`) skips most of the work. None: use PIL."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        data = path.getvalue() if hasattr(path, "getvalue") else Path(path).read_bytes()
        t = decode_jpeg(
            torch.frombuffer(bytearray(data), dtype=torch.uint8),
            mode=ImageReadMode.RGB,
            apply_exif_orientation=exif_transpose,
        )
        # numpy's copy, not torch's: a torch copy this size is an OpenMP region, and `pixelseg serve` decodes on
        # I/O threads, where every such region would start another OpenMP team beside the model's (server.py).
        return np.ascontiguousarray(t.numpy().transpose(1, 2, 0))
    except Exception:  # anything decode_jpeg refuses (progressive oddities, CMYK, ...) goes to PIL
        return None


def read_mask(path, size: tuple[int, int] | None = None, name=None) -> np.ndarray:
    """Read a single-channel label mask (values = class ids) as uint8 H×W; NEAREST resize keeps ids."""
    path = Path(path) if isinstance(path, str) else path
    img = _open(path, name)
    name = name or path
    try:
        if img.mode not in ("L", "P", "I", "I;16", "1"):
            raise PixelsegError(
                f"{name}: mask has mode {img.mode}; expected a single-channel label image "
                "(8-bit grey or palette PNG whose values are class ids)"
            )
        arr = np.asarray(img)
        if arr.max(initial=0) > 255:
            raise PixelsegError(f"{name}: mask values go up to {arr.max()}, more than 255 classes is not supported")
        arr = arr.astype(np.uint8)
        if size is not None and arr.shape != tuple(size):
            arr = np.array(Image.fromarray(arr).resize((size[1], size[0]), Image.Resampling.NEAREST))
        return arr
    except (OSError, SyntaxError) as exc:
        raise UnreadableImage(f"{name}: mask data is corrupt ({exc})") from exc


def read_id_mask(path, label_map: np.ndarray, valid_values, what: str) -> np.ndarray:
    """A dataset's id mask at full resolution, mapped to class ids; ids the dataset does not define are
    refused naming the file (`what` says which ids are valid), so a wrong label file never trains silently."""
    mask = read_mask(path)
    bad = np.setdiff1d(np.unique(mask), valid_values)
    if bad.size:
        raise PixelsegError(f"{path}: values {bad.tolist()} {what}")
    return label_map[mask]


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


# ---- images with other than 3 channels (--in-channels) ---------------------------------------------
_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def _read_tiff(path: Path) -> np.ndarray:
    """H x W x C array from a TIFF: interleaved samples (YXS), separate planes or pages (SYX/IYX/CYX)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            arr, axes = series.asarray(), series.axes
    except Exception as exc:  # tifffile raises many types on damaged files (struct.error, TypeError, ...)
        raise UnreadableImage(f"{path}: not a readable TIFF ({exc.__class__.__name__}: {exc})") from exc
    if arr.dtype not in _SCALE:
        raise PixelsegError(
            f"{path}: TIFF sample format {arr.dtype} is not supported; use 8- or 16-bit "
            "unsigned integers (uint8, uint16)"
        )
    # Bring Y and X first and fold every other axis (samples, channels, pages) into channels.
    if "Y" not in axes or "X" not in axes:
        raise UnreadableImage(f"{path}: TIFF has no image plane (axes {axes})")
    if arr.size == 0:
        raise UnreadableImage(f"{path}: TIFF holds no pixels (shape {arr.shape})")
    order = [axes.index("Y"), axes.index("X")] + [i for i, a in enumerate(axes) if a not in "YX"]
    arr = np.transpose(arr, order)
    return arr.reshape(arr.shape[0], arr.shape[1], -1)


def _read_pil_bands(path: Path) -> np.ndarray:
    img = _open(path)
    if getattr(img, "is_animated", False):
        img.seek(0)
    try:
        if img.mode in ("1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
        arr = np.array(img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImage(f"{path}: image data is corrupt ({exc})") from exc
    if arr.dtype.kind == "i" or arr.dtype == np.uint32:  # PIL's 32-bit 'I' mode holds 16-bit PNGs
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
            raise PixelsegError(
                f"{path}: pixel values outside 0..65535 (mode {img.mode}); only 8- and 16-bit images are supported"
            )
        arr = arr.astype(np.uint16)
    if arr.dtype not in _SCALE:
        raise PixelsegError(f"{path}: pixel format {img.mode} ({arr.dtype}) is not supported; use 8- or 16-bit images")
    return arr[..., None] if arr.ndim == 2 else arr


def read_bands(path: Path | str, size: tuple[int, int] | None = None) -> np.ndarray:
    """Any 8/16-bit image as float32 H x W x C in [0, 1] (value / 255 or / 65535), C as stored.

    TIFFs (by content) go through tifffile - multi-band, multi-page and planar files included;
    everything else through PIL (16-bit grey PNG included). With ``size`` every band is resized with
    antialiased bilinear filtering (torch: PIL cannot resize 16-bit multi-band data).
    """
    path = Path(path)
    if not path.is_file():
        raise UnreadableImage(f"{path}: file not found")
    raw = _read_tiff(path) if is_tiff(path) else _read_pil_bands(path)
    arr = raw.astype(np.float32) / _SCALE[raw.dtype]
    if size is not None and arr.shape[:2] != tuple(size):
        import torch
        import torch.nn.functional as F

        t = torch.from_numpy(arr).permute(2, 0, 1)[None]
        t = F.interpolate(t, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
        arr = t[0].permute(1, 2, 0).clamp_(0, 1).numpy()
    return np.ascontiguousarray(arr)


def read_input(
    path: Path | str, channels: int = 3, size: tuple[int, int] | None = None, exif_transpose: bool = False
) -> np.ndarray:
    """What a model with ``channels`` input channels reads: RGB uint8 for 3 (the fast, cached path),
    float32 [0, 1] H x W x C otherwise, with a one-line error when the file holds another count.
    `exif_transpose`: see read_image (RGB photos only; multi-band rasters keep their grid)."""
    if channels == 3 and not is_tiff(Path(path)):
        return read_image(path, size, exif_transpose=exif_transpose)
    arr = read_bands(path, size)
    if arr.shape[2] != channels:
        raise PixelsegError(
            f"{path}: image has {arr.shape[2]} channel(s) but the model takes {channels} (--in-channels {channels})"
        )
    return arr


def image_hw(path: Path | str) -> tuple[int, int]:
    """(h, w) of an image file without decoding pixels; TIFFs via tifffile (PIL cannot open many multi-band
    ones). pixelseg's sizes are (h, w) everywhere; PIL's ``.size`` is (w, h) and stays inside this module."""
    path = Path(path)
    if is_tiff(path):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, axes = series.shape, series.axes
        except Exception as exc:  # tifffile raises many types on damaged files (struct.error, TypeError, ...)
            raise UnreadableImage(f"{path}: not a readable TIFF ({exc.__class__.__name__}: {exc})") from exc
        if "X" not in axes or "Y" not in axes:
            raise UnreadableImage(f"{path}: TIFF has no image plane (axes {axes})")
        return shape[axes.index("Y")], shape[axes.index("X")]
    w, h = _open(path).size
    return h, w

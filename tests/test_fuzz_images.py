"""Fuzzing image and mask decoding (pixelseg/data/io.py, serving.decode_upload): every PIL mode the formats
hold (1, L, P, LA, RGB, RGBA, CMYK, I;16, I, F) at 1×1 to small sizes in PNG, JPEG, GIF, BMP, TIFF and WebP,
then damaged: truncated, bytes flipped, garbage appended, EXIF garbage, a header claiming a decompression
bomb, the wrong file extension.

Property: the reader returns an array of the promised shape and dtype, or raises PixelsegError in one line
naming the file (decode_upload: an HTTPProblem with a 4xx status naming the upload); never another exception
or a hang. Profiles: tests/_fuzz.py.
"""
import io
import struct
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from PIL import Image

from _fuzz import count, examples, no_hang, one_line_naming
from pixelseg.data.io import image_hw, read_bands, read_image, read_input, read_mask
from pixelseg.core.errors import PixelsegError
from pixelseg.inference.serving import HTTPProblem, decode_upload

MODES = ["1", "L", "P", "LA", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}
SUFFIXES = [".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".webp", ".txt", ""]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(w: int, h: int, mode_byte: int = 2) -> bytes:
    """A valid PNG header claiming w×h (8-bit RGB) and one tiny IDAT: a decompression bomb's shape."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, mode_byte, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))


@st.composite
def image_bytes(draw):
    """(bytes, suffix) of a drawn image, possibly damaged."""
    how = draw(st.sampled_from(["clean", "clean", "truncate", "flip", "append", "exif", "bomb", "garbage"]))
    if how == "bomb":
        side = draw(st.sampled_from([(30000, 30000), (65535, 65535), (1, 2 ** 31 - 1), (0, 10), (7000, 6000)]))
        return bomb_png(*side), draw(st.sampled_from(SUFFIXES))
    if how == "garbage":
        return draw(st.binary(max_size=200)), draw(st.sampled_from(SUFFIXES))
    mode = draw(st.sampled_from(MODES))
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    w, h = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    if mode in ("I;16",):
        img = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    elif mode == "I":
        img = Image.fromarray(rng.integers(-(2 ** 20), 2 ** 20, (h, w), dtype=np.int32))
    elif mode == "F":
        img = Image.fromarray(rng.normal(0, 1e3, (h, w)).astype(np.float32))
    else:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    kwargs = {}
    if how == "exif" and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        exif = draw(st.one_of(st.binary(max_size=64), st.just(b"Exif\0\0MM\0*\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01\0\x09\0\0")))
        kwargs["exif"] = exif
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.save(buf, fmt, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, SyntaxError, struct.error):
        assume(False)  # PIL cannot write this mode in this format: nothing to read
    data = buf.getvalue()
    if how == "truncate":
        data = data[:draw(st.integers(0, max(len(data) - 1, 0)))]
    elif how == "flip" and data:
        arr = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(arr) - 1))
            arr[i] = draw(st.integers(0, 255))
        data = bytes(arr)
    elif how == "append":
        data += draw(st.binary(min_size=1, max_size=64))
    suffix = draw(st.sampled_from([FORMATS[fmt]] * 3 + SUFFIXES))
    return data, suffix


def _check_array(out, shape=None, channels=None, dtype=None):
    assert isinstance(out, np.ndarray)
    if dtype is not None:
        assert out.dtype == dtype, out.dtype
    if shape is not None:
        assert out.shape[:2] == shape, out.shape
    if channels is not None:
        assert out.ndim == 3 and out.shape[2] == channels, out.shape
    assert min(out.shape[:2]) >= 1


READERS = {
    "read_image": lambda p: _check_array(read_image(p), channels=3, dtype=np.uint8),
    "read_image(size)": lambda p: _check_array(read_image(p, (16, 12)), (16, 12), 3, np.uint8),
    "read_image(exif)": lambda p: _check_array(read_image(p, exif_transpose=True), channels=3, dtype=np.uint8),
    "read_mask": lambda p: (lambda m: (_check_array(m, dtype=np.uint8), m.ndim == 2 or pytest.fail(m.shape)))(read_mask(p)),
    "read_bands": lambda p: _check_array(read_bands(p, (8, 8)), (8, 8), dtype=np.float32),
    "read_input": lambda p: _check_array(read_input(p, 3), channels=3),
    "image_hw": lambda p: image_hw(p),
}


@examples(80)
@given(img=image_bytes())
def test_image_and_mask_decoding(tmp_path, img):
    """Every reader on each drawn file."""
    data, suffix = img
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        path = Path(d) / f"ünï cødé{suffix}"
        path.write_bytes(data)
        for reader in sorted(READERS):
            count(f"io.{reader}")
            try:
                with no_hang(f"{reader} on {path}"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    READERS[reader](path)
            except PixelsegError as exc:
                one_line_naming(exc, path)


@examples(80)
@given(img=image_bytes(), exif=st.booleans())
def test_upload_decoding(img, exif):
    data, _ = img
    count("serve.decode_upload")
    try:
        with no_hang("decode_upload"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = decode_upload(data, 1_000_000, "upload 'x.jpg'", exif)
    except HTTPProblem as exc:
        assert 400 <= exc.status < 500, exc.status
        assert "\n" not in exc.message and "upload" in exc.message, exc.message
        return
    _check_array(out, channels=3, dtype=np.uint8)

"""What counts as an image file, and which way up a photo is: shared by the dataset readers, the
annotation-format readers and prediction, so all of them agree."""

from __future__ import annotations

from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def exif_orientation(img: Image.Image) -> int:
    """The EXIF Orientation tag (1 = stored upright, 2-8 = mirrored and/or turned), 1 when absent or unreadable."""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # a malformed EXIF block must not make the photo unreadable; PIL raises many types here
        return 1
    return value if value in range(1, 9) else 1

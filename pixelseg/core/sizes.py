"""Sizes and limits: the image-size syntax (``parse_size``/``size_hw``) and the `pixelseg serve` ``Limits``.

Torch-free and below both ``config`` and ``data`` (which both parse sizes), so neither imports the
other for it; the serve flags' defaults come from ``Limits`` without importing the server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import PixelsegError


def show(value) -> str:
    """A value as an error message quotes it: bare when it is a word, repr() otherwise."""
    return value if isinstance(value, str) and value and " " not in value and value.isprintable() else repr(value)


class OptionError(ValueError):
    """A bad option value; the message reads after the flag and value, e.g. "must be >= 1"."""


def parse_size(value) -> int | list[int]:
    """128, "128", "360x480" or [360, 480] -> 128 (square) or [360, 480]; the one size syntax everywhere."""
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, str):
            parts = [int(v) for v in value.strip().lower().replace("×", "x").split("x")]
        elif isinstance(value, (list, tuple)):
            parts = [int(v) for v in value]
        else:
            parts = [int(value)]
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise OptionError("give N or HxW, e.g. 128 or 360x480") from None
    if len(parts) not in (1, 2) or min(parts) < 8:
        raise OptionError("give N or HxW with sides >= 8, e.g. 128 or 360x480")
    return parts[0] if len(parts) == 1 or parts[0] == parts[1] else parts


def size_hw(size, what: str = "--image-size") -> tuple[int, int]:
    """An image size in any accepted form -> (height, width); ``what`` names it in the error."""
    try:
        size = parse_size(size)
    except OptionError as exc:
        raise PixelsegError(f"{what} {show(size)}: {exc}") from None
    return (size, size) if isinstance(size, int) else (size[0], size[1])


@dataclass
class Limits:
    """Server limits, each a `pixelseg serve` flag; the defaults are listed in docs/serving.md."""

    max_upload_mb: float = 20.0
    max_pixels: int = 40_000_000  # 40 MP: a 7300×5500 photo; decoded RGB is 120 MB
    max_mc_samples: int = 32
    default_mc_samples: int = 8
    max_queue: int = 128  # admitted requests (waiting, decoding, running); more get 503
    deadline_s: float = 60.0  # a request that cannot be answered within this after admission: 503
    upload_timeout_s: float = 30.0  # a client that has not sent its whole body by then gets 408
    max_batch: int = 8  # concurrent requests share one forward pass (dynamic batching); 1: off
    batch_wait_ms: float = 5.0

    def check(self) -> Limits:
        for flag, value, low in (
            ("--max-upload-mb", self.max_upload_mb, 0),
            ("--max-pixels", self.max_pixels, 0),
            ("--max-queue", self.max_queue, 0),
            ("--upload-timeout", self.upload_timeout_s, 0),
            ("--deadline", self.deadline_s, 0),
            ("--max-batch", self.max_batch, 0),
            ("--batch-wait-ms", self.batch_wait_ms, -1e-9),
            ("--max-mc-samples", self.max_mc_samples, 1),
        ):
            if not math.isfinite(value):  # inf: int(inf) used to fail every request with a 500
                raise PixelsegError(f"{flag} {value:g}: must be a finite number")
            if not value > low:
                raise PixelsegError(
                    f"{flag} {value:g}: must be {'at least 2' if low == 1 else 'positive'}"
                    if flag != "--batch-wait-ms"
                    else f"{flag} {value:g}: must be 0 or more"
                )
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(min(self.max_upload_mb * 1024 * 1024, 2**62))  # a huge finite limit overflows to inf


__all__ = ["Limits", "OptionError", "parse_size", "show", "size_hw"]

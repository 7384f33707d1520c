"""Joint image + mask augmentation for training, built on `torchvision.transforms.v2`.

Wrapping the pair as `tv_tensors.Image` / `tv_tensors.Mask` lets one v2 pipeline draw each random
parameter once and apply it to both, so geometry always agrees. v2 pads masks with their own fill value
and passes them through colour transforms untouched. Masks are resized nearest-neighbour (class ids must
never be blended), in the NEAREST_EXACT variant: v2 would use torch's legacy NEAREST, whose sampling grid
is shifted by up to half a source pixel against bilinear, so about 1% of mask pixels (a row or column
at each edge) land on the wrong side of object boundaries; NEAREST_EXACT samples pixel centres like
bilinear and PIL's NEAREST do.

Pipeline (each step only when enabled):
  1. ``scale=(lo, hi)`` with ``crop``: `RandomResize` of the shorter side to ``s · min(image_size)``,
     s uniform in [lo, hi] (aspect ratio kept);
  2. ``crop``: `RandomCrop` to ``image_size``, padding images with 0 and masks with ``ignore_index``
     when the (rescaled) input is smaller, so padding never counts in loss or metrics;
     without ``crop``: plain `Resize` to ``image_size`` (bilinear + antialias for the image);
  3. horizontal / vertical flips (p = 0.5 each);
  4. `ColorJitter` (brightness, contrast, saturation = ``color_jitter``; hue left alone), image only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..core.errors import PixelsegError
from ..core.metrics import IGNORE_INDEX
from ..core.sizes import size_hw

__all__ = ["JointTransform", "build_train_transform"]

_MASK_INTERPOLATION = v2.InterpolationMode.NEAREST_EXACT


# Subclasses only to pick the mask's interpolation (see module docstring); v2 has no per-type option.
class _Resize(v2.Resize):
    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Mask):
            return F.resize(inpt, self.size, interpolation=_MASK_INTERPOLATION, max_size=self.max_size)
        return super().transform(inpt, params)


class _RandomResize(v2.RandomResize):
    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Mask):
            return F.resize(inpt, params["size"], interpolation=_MASK_INTERPOLATION)
        return super().transform(inpt, params)


class JointTransform:
    """Callable ``(image uint8 3×H×W, mask H×W) -> (image uint8 3×h×w, mask int64 h×w)``."""

    def __init__(self, pipeline: v2.Transform, ignore_index: int):
        self.pipeline = pipeline
        self.ignore_index = ignore_index

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 image 3×H×W, got {image.dtype} {tuple(image.shape)}")
        if mask.shape != image.shape[1:]:
            raise ValueError(f"mask {tuple(mask.shape)} does not match image {tuple(image.shape)}")
        # uint8 masks keep resizing on torchvision's fast uint8 path; widen only if the fill needs it.
        if mask.dtype != torch.uint8 or not 0 <= self.ignore_index <= 255:
            mask = mask.long()
        image, mask = self.pipeline(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pipeline!r}, ignore_index={self.ignore_index})"


def build_train_transform(
    image_size: int | tuple[int, int] | None,
    *,
    scale: tuple[float, float] | None = None,
    crop: bool = False,
    hflip: bool = True,
    vflip: bool = False,
    color_jitter: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> Callable:
    """Training augmentation (see module docstring). ``image_size`` None keeps the input size, which
    only combines with flips and colour jitter. An int means a square ``(n, n)``."""
    steps: list[v2.Transform] = []
    size = None if image_size is None else size_hw(image_size)
    if scale is not None:
        if size is None or not crop:
            raise PixelsegError("--scale-range needs --crop (the random rescale is cropped back to --image-size)")
        lo, hi = (float(s) for s in scale)
        if not 0 < lo <= hi:
            raise PixelsegError(f"--scale-range must be two numbers 0 < lo <= hi, got {scale!r}")
        base = min(size)
        min_side = max(1, round(lo * base))
        max_side = max(min_side, round(hi * base))
        # RandomResize draws from [min_size, max_size): +1 makes hi inclusive.
        steps.append(_RandomResize(min_side, max_side + 1, interpolation=v2.InterpolationMode.BILINEAR, antialias=True))
    if crop:
        if size is None:
            raise PixelsegError("--crop needs --image-size (the crop size)")
        steps.append(v2.RandomCrop(size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}))
    elif size is not None:
        steps.append(_Resize(size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True))
    if hflip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    if vflip:
        steps.append(v2.RandomVerticalFlip(p=0.5))
    if color_jitter:
        if color_jitter < 0:
            raise PixelsegError(f"--color-jitter must be >= 0, got {color_jitter}")
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    return JointTransform(v2.Compose(steps) if steps else v2.Identity(), ignore_index)

"""Inference at an image's own resolution: resize-and-restore, sliding window, flip TTA.

Every mode works on a `fn(x) -> logits` callable (float [0, 1] N×3×h×w in, N×C×h×w out), so the
PyTorch model and an ONNX Runtime session go through the same code, and returns class
probabilities at the input's H×W.

- resize (default): squash the image to the training size, run once, upsample the logits back.
  The model sees exactly what it saw in training (whole images resized), which is right for
  models trained on resized whole images (the tutorial's recipe).
- tile: windows of the training size (or `tile`) at the image's native scale, overlapping by
  `overlap`; probabilities are blended with a raised-cosine weight so tile borders, where the
  network lacks context, count less. Memory is one batch of windows plus the C×H×W result, so
  a 4000×3000 photo fits, and no detail is lost to downscaling. Right for models trained on
  native-scale images or crops (CamVid at 360×480, aerial tiles).
- tta: also run the horizontally flipped input (`TTA.flip`) and/or the input rescaled by each of
  `TTA.scales`, and average the probability maps at the input's size (mmsegmentation's "aug test").
  Larger scales help thin objects (CamVid's poles, +2 points val mIoU at 1, 1.25, 1.5) and can hurt
  where context matters more than detail (coco-cardamage, -1 point): measure before you serve it
  (docs/datasets.md, "Test-time augmentation: which scales").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
MAX_SCALE = 4.0  # a TTA scale above this would mostly run out of memory on a photo


def _bad_scales(scales: tuple[float, ...]) -> bool:
    return not scales or any(not (0 < s <= MAX_SCALE) for s in scales)


@dataclass(frozen=True)
class TTA:
    """Test-time augmentation: the horizontal flip and/or the input rescaled by each of `scales`
    (1.0 = as given). The default does nothing."""

    flip: bool = False
    scales: tuple[float, ...] = (1.0,)

    def __post_init__(self):
        if _bad_scales(self.scales):
            raise ValueError(f"TTA scales must be in (0, {MAX_SCALE:g}], got {self.scales!r}")

    def __bool__(self) -> bool:
        return self.flip or self.scales != (1.0,)

    def describe(self) -> str:
        parts = (["flip"] if self.flip else []) + (
            ["scales " + ", ".join(f"{s:g}" for s in self.scales)] if self.scales != (1.0,) else []
        )
        return " + ".join(parts) + " TTA" if parts else "no TTA"

    def tag(self) -> str:
        """File-name suffix: _tta for the flip (as before scales existed), _ms1-1.25-1.5 for scales."""
        return ("_tta" if self.flip else "") + (
            "_ms" + "-".join(f"{s:g}" for s in self.scales) if self.scales != (1.0,) else ""
        )


def as_tta(tta: bool | TTA | None) -> TTA:
    """`True` (the --tta flag alone) means the flip; a `TTA` passes through."""
    return tta if isinstance(tta, TTA) else TTA(flip=bool(tta))


def parse_scales(text: str | None) -> tuple[float, ...]:
    """'1,1.25,1.5' -> (1.0, 1.25, 1.5); None -> (1.0,). ValueError names what is wrong."""
    if text is None:
        return (1.0,)
    try:
        scales = tuple(float(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--tta-scales {text!r}: expected numbers separated by commas, e.g. 1,1.25,1.5") from None
    if _bad_scales(scales):
        raise ValueError(f"--tta-scales {text!r}: every scale must be in (0, {MAX_SCALE:g}]")
    return scales


def tta_fn(fn: LogitsFn, tta: bool | TTA | None) -> LogitsFn:
    """fn averaged over the test-time augmentations (fn itself when there are none); returns the log of
    the mean softmax at the input's size, so a later softmax (or argmax) sees the averaged probabilities.
    The flipped copy runs in the same batch as its original; each scale is one more call (the models pad
    any size to their output stride)."""
    tta = as_tta(tta)
    if not tta:
        return fn

    def run(x: torch.Tensor) -> torch.Tensor:
        n, hw = x.shape[0], tuple(x.shape[-2:])
        total = None
        for s in tta.scales:
            xs = x
            if s != 1.0:
                size = (max(1, round(hw[0] * s)), max(1, round(hw[1] * s)))
                xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=s < 1)
            logits = fn(torch.cat([xs, xs.flip(-1)]) if tta.flip else xs).float()
            if tuple(logits.shape[-2:]) != hw:
                logits = F.interpolate(logits, size=hw, mode="bilinear", align_corners=False)
            p = logits.softmax(1)
            p = (p[:n] + p[n:].flip(-1)) / 2 if tta.flip else p
            total = p if total is None else total + p
        assert total is not None  # at least one scale
        return (total / len(tta.scales)).clamp_min(1e-12).log()

    return run


class TTAModel(nn.Module):
    """A model wrapped with test-time augmentation, usable wherever the model is (evaluate, predict, serve)."""

    def __init__(self, model: nn.Module, tta: bool | TTA = True):
        super().__init__()
        self.model = model
        self._fn = tta_fn(model, tta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Window origins covering [0, length): stride window·(1 - overlap), last window flush with the end."""
    if length <= window:
        return [0]
    stride = max(1, int(window * (1 - overlap)))
    n = math.ceil((length - window) / stride) + 1
    return sorted({min(i * stride, length - window) for i in range(n)})


def _blend_weight(h: int, w: int, device) -> torch.Tensor:
    """Raised cosine, 0.1 at the window's rim and 1 in its middle: seams fade instead of stepping.
    (torch.hann_window is 0 at the rim, which would drop image-border pixels covered by one window.)"""

    def ramp(n: int) -> torch.Tensor:
        return (
            0.1 + 0.9 * torch.hann_window(n + 2, periodic=False, device=device)[1:-1]
            if n > 2
            else torch.ones(n, device=device)
        )

    return ramp(h)[:, None] * ramp(w)[None, :]


def sliding_window(
    fn: LogitsFn, x: torch.Tensor, window: tuple[int, int], overlap: float = 0.25, batch_size: int = 8
) -> torch.Tensor:
    """Probabilities N×C×H×W from overlapping windows at native scale (windows run `batch_size` at a time)."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    n, _, h, w = x.shape
    wh, ww = min(window[0], h), min(window[1], w)
    origins = [(y, x0) for y in window_starts(h, wh, overlap) for x0 in window_starts(w, ww, overlap)]
    weight = _blend_weight(wh, ww, x.device)
    out = None
    norm = torch.zeros(h, w, device=x.device)
    for i in range(0, len(origins), max(1, batch_size // n)):
        chunk = origins[i : i + max(1, batch_size // n)]
        crops = torch.cat([x[:, :, y : y + wh, x0 : x0 + ww] for y, x0 in chunk])
        probs = fn(crops).float().softmax(1) * weight
        if out is None:
            out = torch.zeros(n, probs.shape[1], h, w, device=x.device)
        for j, (y, x0) in enumerate(chunk):
            out[:, :, y : y + wh, x0 : x0 + ww] += probs[j * n : (j + 1) * n]
            norm[y : y + wh, x0 : x0 + ww] += weight
    assert out is not None  # the windows cover the image: at least one
    return out / norm


class Predictor:
    """Full-resolution inference for one model: `predictor(image uint8 H×W×3) -> probabilities 1×C×H×W`."""

    def __init__(
        self,
        fn: LogitsFn,
        train_size: tuple[int, int],
        tile: tuple[int, int] | None = None,
        overlap: float = 0.25,
        tta: bool | TTA = False,
        batch_size: int = 8,
        device="cpu",
    ):
        self.train_size = (train_size[0], train_size[1])  # a tuple, whatever sequence was given
        self.tile, self.overlap, self.tta = ((tile[0], tile[1]) if tile else None), overlap, as_tta(tta)
        self.batch_size, self.device = batch_size, torch.device(device)
        self.fn = tta_fn(fn, self.tta)

    def describe(self) -> str:
        if self.tile:
            s = f"sliding window {self.tile[0]}x{self.tile[1]}, overlap {self.overlap:g}"
        else:
            s = f"resized to {self.train_size[0]}x{self.train_size[1]} and back"
        return s + (f", {self.tta.describe()}" if self.tta else "")

    @torch.no_grad()
    def batch(self, images, probs: bool = True) -> list[torch.Tensor]:
        """Several images (any sizes) through one forward pass at the training size, each returned at
        its own size: resize mode only (windows are batched within an image already). For one image
        this is exactly `__call__`; `pixelseg serve --max-batch` uses it. `probs=False` hands back the
        upsampled scores without the softmax, for callers that only take the argmax (softmax keeps it)."""
        if self.tile:
            return [self(img) for img in images]
        logits = self.fn(torch.cat([self._input(img, self.train_size) for img in images]))
        return [self._restore(logits[i : i + 1], img.shape[:2], probs) for i, img in enumerate(images)]

    def _input(self, image, size: tuple[int, int] | None = None) -> torch.Tensor:
        """H×W×C image -> 1×C×h×w float on the device, resized to `size` when given; uint8 is scaled to
        [0, 1], N-band inputs come as [0, 1] floats.

        uint8 photos are resized as uint8 (antialiased bilinear) before the scaling: that is what
        training's PIL / torchvision resize feeds the model, about 30x closer to it than resizing the
        [0, 1] floats, and ~3x faster (docs/benchmarks.md, "Numbers behind choices in the code"). The
        resize runs on the CPU where the photo is, so only the small tensor travels to a GPU."""
        x = torch.as_tensor(image).permute(2, 0, 1)[None]
        if size is not None and tuple(x.shape[-2:]) != size:
            x = F.interpolate(
                x if x.dtype == torch.uint8 else x.float(),
                size=size,
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        x = x.to(self.device)
        return x.float().div_(255) if x.dtype == torch.uint8 else x.float()

    def _restore(self, logits: torch.Tensor, hw, probs: bool) -> torch.Tensor:
        """One image's logits at the training size -> scores (probabilities with `probs`) at its own size."""
        logits = logits.float()
        if tuple(logits.shape[-2:]) != tuple(hw):
            logits = F.interpolate(logits, size=tuple(hw), mode="bilinear", align_corners=False)
        return logits.softmax(1) if probs else logits

    @torch.no_grad()
    def __call__(self, image, probs: bool = True) -> torch.Tensor:
        """1×C×H×W probabilities for one H×W×C image (scores without the softmax with `probs=False`;
        sliding windows blend probabilities, so they always come as probabilities)."""
        if self.tile:
            return sliding_window(self.fn, self._input(image), self.tile, self.overlap, self.batch_size)
        return self._restore(self.fn(self._input(image, self.train_size)), image.shape[:2], probs)


def torch_logits_fn(model: nn.Module, device, amp_dtype=None, channels_last: bool = True) -> LogitsFn:
    """The PyTorch model as a LogitsFn (autocast and memory layout as in training)."""
    from ..core.runtime import autocast

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(torch.device(device), amp_dtype):
            # NCHW logits: bilinear upsampling back to the photo's size is faster on CPU than on the
            # channels-last tensor the model returns, and bit-identical (docs/benchmarks.md)
            return model(x).to(torch.float32, memory_format=torch.contiguous_format)

    return fn


def tile_scale_warning(image_hw: tuple[int, int], train_size: tuple[int, int], window) -> str | None:
    """A warning when --tile probably cannot suit the model, or None.

    pixelseg trains on whole images resized to the training size, so windows at an image's own scale
    show objects at the scale training saw only if the training photos were about that size already
    (CamVid at 360x480). A photo several times the training size - the tutorial's pets, shrunk to 128x128 -
    puts objects several times larger into each window than the model has ever seen, and masks come out
    near-empty."""
    if window is None:
        return None
    factor = max(image_hw[0] / train_size[0], image_hw[1] / train_size[1])
    if factor < 2:
        return None
    return (
        f"warning: --tile runs {window[0]}x{window[1]} windows at the image's own scale, but the model was "
        f"trained on whole images resized to {train_size[0]}x{train_size[1]} and this image is "
        f"{image_hw[0]}x{image_hw[1]} ({factor:.1f}x larger): unless its training photos were this large "
        f"too, the windows show objects about {factor:.0f}x larger than it learnt them and masks come out "
        "near-empty; leave out --tile to resize the whole image, as in training"
    )

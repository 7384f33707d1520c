"""FCN-32s / 16s / 8s (Long, Shelhamer, Darrell, CVPR 2015).

The classifier's fc6/fc7 become conv6 (7x7, 4096) and conv7 (1x1, 4096), each with ReLU and
dropout 0.5, then a 1x1 class-score layer at stride 32. FCN-16s adds a score layer on the
stride-16 stage (pool4 for VGG) after a learned 2x upsampling; FCN-8s adds one on the stride-8
stage (pool3) too. Upsampling layers start as bilinear interpolation; the final 8/16/32x one
stays fixed bilinear as in the paper (``learn_final_upsample=True`` trains it).

Skip stages are picked by stride (16 and 8), which is what the tutorial's ``_fcn_16s`` /
``_fcn_8s`` select per backbone (its ``c4``/``c3`` for VGG/ResNet/MobileNet, ``c3``/``c2``
for DenseNet/Xception, whose ``c4`` already sits at stride 32 there).

The head is big: with VGG16, conv6 alone has 512*7*7*4096 = 102.8M parameters (77% of the
model); with 2048-channel backbones (ResNet, Xception) it is 411M. ``head_channels`` shrinks
it (e.g. 512 for quick experiments and tests).
"""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch import nn

from .base import SegmentationModel


def bilinear_kernel(channels: int, kernel_size: int) -> torch.Tensor:
    """Per-channel bilinear upsampling kernel for ConvTranspose2d (C x C x k x k, diagonal).

    Hand-written because neither torch nor torchvision ships it: this is Caffe's
    ``BilinearFiller`` / the FCN reference ``upsample_filt``.
    """
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float32)
    filt = 1 - (og - center).abs() / factor
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    idx = torch.arange(channels)
    weight[idx, idx] = filt[:, None] * filt[None, :]
    return weight


def bilinear_upsample(channels: int, factor: int, trainable: bool = True) -> nn.ConvTranspose2d:
    """ConvTranspose2d(k=2f, s=f, p=f/2) initialised to bilinear interpolation: exactly f x
    the input size (the padding does the paper's crop by f/2)."""
    up = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, padding=factor // 2, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(channels, 2 * factor))
    up.weight.requires_grad_(trainable)
    return up


def _score(in_channels: int, num_classes: int) -> nn.Conv2d:
    # The paper zero-initialises every class-scoring layer ("random initialization yields
    # neither better performance nor faster convergence").
    conv = nn.Conv2d(in_channels, num_classes, 1)
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:  # always: Conv2d's default
        nn.init.zeros_(conv.bias)
    return conv


class _FCN(SegmentationModel):
    default_backbone = "vgg16"
    options = MappingProxyType(dict(head_channels=4096, dropout=0.5, learn_final_upsample=False))
    n_skips = 0

    @classmethod
    def incompatibility(cls, spec, **options):
        needed = {32, 16, 8}
        if not needed <= set(spec.reductions):
            return "FCN needs stages at strides 8, 16 and 32"
        return None

    def __init__(
        self, encoder, num_classes, mean, std, config, head_channels=4096, dropout=0.5, learn_final_upsample=False
    ):
        super().__init__(encoder, num_classes, 32, mean, std, config)
        hc = int(head_channels)
        self.head = nn.Sequential(
            nn.Conv2d(encoder.channels[-1], hc, 7, padding=3),  # fc6 as a conv
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(hc, hc, 1),  # fc7 as a conv
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            _score(hc, num_classes),  # score_fr
        )
        red = list(encoder.reductions)
        self.skip_index = [red.index(16), red.index(8)][: self.n_skips]
        self.upscore2 = nn.ModuleList(bilinear_upsample(num_classes, 2) for _ in range(self.n_skips))
        self.score_skip = nn.ModuleList(_score(encoder.channels[i], num_classes) for i in self.skip_index)
        final = 32 // 2**self.n_skips
        self.upscore_final = bilinear_upsample(num_classes, final, trainable=learn_final_upsample)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encode(x)
        score = self.head(feats[-1])
        for up, score_skip, i in zip(self.upscore2, self.score_skip, self.skip_index, strict=True):
            score = up(score) + score_skip(feats[i])
        return self.upscore_final(score)


class FCN32s(_FCN):
    arch = "fcn32s"
    n_skips = 0


class FCN16s(_FCN):
    arch = "fcn16s"
    n_skips = 1


class FCN8s(_FCN):
    arch = "fcn8s"
    n_skips = 2

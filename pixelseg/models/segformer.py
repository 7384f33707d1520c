"""SegFormer (Xie, Wang, Yu, Anandkumar, Alvarez, Luo, NeurIPS 2021).

The all-MLP decoder on the four stride-4..32 stages of a Mix Transformer (``mit_b0`` ..
``mit_b5``, from Hugging Face transformers: see mit.py) or of any encoder with those strides: a
per-stage linear layer to the embedding width (256 for B0/B1, 768 for B2-B5, as in the paper),
bilinear upsampling to stride 4, concatenation (deepest first, as the reference code), a linear
fusion + BatchNorm + ReLU, dropout 0.1, a linear classifier, and a 4x bilinear upsampling to the
input. Each "linear" is a 1x1 convolution - the same map on every pixel - so the features never
leave N x C x H x W (no flatten/transpose copies) and BatchNorm fusing applies.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from .base import SegmentationModel
from .blocks import conv_bn_relu, missing_strides, stage_index, upsample_to

STRIDES = (4, 8, 16, 32)


class SegFormer(SegmentationModel):
    arch = "segformer"
    default_backbone = "mit_b0"
    options = MappingProxyType(dict(decoder_channels=None, dropout=0.1))

    @classmethod
    def incompatibility(cls, spec, **options):
        return missing_strides(spec, STRIDES)

    def __init__(self, encoder, num_classes, mean, std, config, decoder_channels=None, dropout=0.1):
        super().__init__(encoder, num_classes, 32, mean, std, config)
        if decoder_channels is None:
            # The paper's widths for MiT; 256 (B0's) for any other encoder.
            decoder_channels = 768 if encoder.name in ("mit_b2", "mit_b3", "mit_b4", "mit_b5") else 256
        self.stages = [stage_index(encoder.reductions, s) for s in STRIDES]
        self.linear = nn.ModuleList(nn.Conv2d(encoder.channels[i], decoder_channels, 1) for i in self.stages)
        self.fuse = conv_bn_relu(decoder_channels * len(STRIDES), decoder_channels, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encode(x)
        maps = [lin(feats[i]) for lin, i in zip(self.linear, self.stages, strict=True)]
        y = torch.cat([upsample_to(m, maps[0]) for m in reversed(maps[1:])] + [maps[0]], dim=1)
        y = self.classifier(self.dropout(self.fuse(y)))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)

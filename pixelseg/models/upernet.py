"""UPerNet (Xiao, Liu, Zhou, Jiang, Sun, ECCV 2018: "Unified Perceptual Parsing"), the
semantic-segmentation head as MMSegmentation's ``UPerHead`` builds it.

PSPNet's pyramid pooling module (bins 1/2/3/6, 512 channels per branch) on the stride-32 stage,
fused by a 3x3 conv-BN-ReLU; 1x1 conv-BN-ReLU laterals on the stride-4/8/16 stages with bilinear
top-down addition and 3x3 conv-BN-ReLU outputs; all four levels upsampled to stride 4,
concatenated, fused by a 3x3 conv-BN-ReLU, dropout 0.1, a 1x1 classifier, and a 4x bilinear
upsampling to the input.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from .base import SegmentationModel
from .blocks import PyramidPooling, conv_bn_relu, missing_strides, require_batch_of_two, stage_index, upsample_to

STRIDES = (4, 8, 16, 32)


class UPerNet(SegmentationModel):
    arch = "upernet"
    default_backbone = "resnet50"
    options = MappingProxyType(dict(channels=512, bins=(1, 2, 3, 6), dropout=0.1))

    @classmethod
    def incompatibility(cls, spec, **options):
        return missing_strides(spec, STRIDES)

    def __init__(self, encoder, num_classes, mean, std, config, channels=512, bins=(1, 2, 3, 6), dropout=0.1):
        super().__init__(encoder, num_classes, 32, mean, std, config)
        self.stages = [stage_index(encoder.reductions, s) for s in STRIDES]
        cins = [encoder.channels[i] for i in self.stages]
        self.ppm = PyramidPooling(cins[-1], channels, bins)
        self.ppm_fuse = conv_bn_relu(self.ppm.out_channels, channels)
        self.lateral = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in cins[:-1])
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels) for _ in cins[:-1])
        self.fuse = conv_bn_relu(channels * len(STRIDES), channels)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        require_batch_of_two(self, x, "the 1x1 pyramid-pooling branch")
        feats = [f for i, f in enumerate(self.encode(x)) if i in self.stages]
        lat = [conv(f) for conv, f in zip(self.lateral, feats[:-1], strict=True)]
        lat.append(self.ppm_fuse(self.ppm(feats[-1])))
        for i in range(len(lat) - 2, -1, -1):  # top-down
            lat[i] = lat[i] + upsample_to(lat[i + 1], lat[i])
        outs = [conv(p) for conv, p in zip(self.fpn_convs, lat[:-1], strict=True)] + [lat[-1]]
        y = torch.cat([outs[0]] + [upsample_to(o, outs[0]) for o in outs[1:]], dim=1)
        y = self.classifier(self.dropout(self.fuse(y)))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)

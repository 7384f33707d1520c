"""Semantic FPN (Kirillov, Girshick, He, Dollar, CVPR 2019: "Panoptic Feature Pyramid Networks").

An FPN over the stride-4..32 encoder stages (1x1 laterals, nearest-neighbour top-down addition,
3x3 output convs, 256 channels), then the paper's semantic branch: each pyramid level is brought
to stride 4 by as many (3x3 conv 128 + GroupNorm + ReLU, 2x bilinear upsample) stages as it needs
(one conv without upsampling for stride 4), the four maps are summed, and a 1x1 classifier plus a
4x bilinear upsampling give the logits.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from .base import SegmentationModel
from .blocks import missing_strides, stage_index

STRIDES = (4, 8, 16, 32)


def _conv_gn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(min(32, cout), cout), nn.ReLU(inplace=True)
    )


class _Upsample2x(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class FPN(SegmentationModel):
    arch = "fpn"
    default_backbone = "resnet50"
    options = MappingProxyType(dict(pyramid_channels=256, segmentation_channels=128))

    @classmethod
    def incompatibility(cls, spec, **options):
        return missing_strides(spec, STRIDES)

    def __init__(self, encoder, num_classes, mean, std, config, pyramid_channels=256, segmentation_channels=128):
        super().__init__(encoder, num_classes, 32, mean, std, config)
        self.stages = [stage_index(encoder.reductions, s) for s in STRIDES]
        self.lateral = nn.ModuleList(nn.Conv2d(encoder.channels[i], pyramid_channels, 1) for i in self.stages)
        self.smooth = nn.ModuleList(nn.Conv2d(pyramid_channels, pyramid_channels, 3, padding=1) for _ in self.stages)
        branches = []
        for level in range(len(STRIDES)):  # level 0 = stride 4
            layers: list[nn.Module] = [_conv_gn_relu(pyramid_channels, segmentation_channels)]
            if level > 0:
                layers.append(_Upsample2x())
            for _ in range(level - 1):
                layers += [_conv_gn_relu(segmentation_channels, segmentation_channels), _Upsample2x()]
            branches.append(nn.Sequential(*layers))
        self.branches = nn.ModuleList(branches)
        self.classifier = nn.Conv2d(segmentation_channels, num_classes, 1)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encode(x)
        lat = [conv(feats[i]) for conv, i in zip(self.lateral, self.stages, strict=True)]
        for i in range(len(lat) - 2, -1, -1):  # top-down
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
        pyramid = [conv(p) for conv, p in zip(self.smooth, lat, strict=True)]
        y = self.branches[0](pyramid[0])
        for branch, p in zip(self.branches[1:], pyramid[1:], strict=True):
            y = y + branch(p)
        y = self.classifier(y)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)

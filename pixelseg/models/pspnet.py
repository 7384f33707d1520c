"""PSPNet (Zhao, Shi, Qi, Wang, Jia, CVPR 2017: "Pyramid Scene Parsing Network").

The deepest feature of a backbone dilated to output stride 8 (the paper's setting; 16 and 32 are
options) goes through the pyramid pooling module - average pooling to 1x1, 2x2, 3x3 and 6x6 bins,
each reduced to C/4 channels by a 1x1 conv-BN-ReLU and upsampled back - concatenated with the
feature itself, then a 3x3 conv-BN-ReLU of 512 channels, dropout 0.1, a 1x1 classifier, and
bilinear upsampling to the input. The auxiliary loss on stage 4 is a training trick left out.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import PixelsegError
from .base import SegmentationModel
from .blocks import PyramidPooling, conv_bn_relu, require_batch_of_two


class PSPNet(SegmentationModel):
    arch = "pspnet"
    default_backbone = "resnet50"
    options = MappingProxyType(dict(output_stride=8, bins=(1, 2, 3, 6), head_channels=512, dropout=0.1))

    @classmethod
    def incompatibility(cls, spec, output_stride=8, **options):
        if output_stride not in spec.output_strides:
            return (
                f"PSPNet at output stride {output_stride} needs a dilated backbone, and "
                f"{spec.source} offers no dilation for {spec.library_name} "
                "(output_stride=32 works with any backbone)"
            )
        return None

    @classmethod
    def encoder_output_stride(cls, output_stride=8, **options):
        if output_stride not in (8, 16, 32):
            raise PixelsegError(f"pspnet output_stride must be 8, 16 or 32 (got {output_stride!r})")
        return output_stride

    def __init__(
        self,
        encoder,
        num_classes,
        mean,
        std,
        config,
        output_stride=8,
        bins=(1, 2, 3, 6),
        head_channels=512,
        dropout=0.1,
    ):
        super().__init__(encoder, num_classes, output_stride, mean, std, config)
        cin = encoder.channels[-1]
        self.ppm = PyramidPooling(cin, max(cin // len(bins), 1), bins)
        self.head = nn.Sequential(
            conv_bn_relu(self.ppm.out_channels, head_channels),
            nn.Dropout2d(dropout),
            nn.Conv2d(head_channels, num_classes, 1),
        )

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        require_batch_of_two(self, x, "the 1x1 pyramid-pooling branch")
        y = self.head(self.ppm(self.encode(x)[-1]))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)

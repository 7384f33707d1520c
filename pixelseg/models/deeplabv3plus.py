"""DeepLabV3+ (Chen, Zhu, Papandreou, Schroff, Adam, ECCV 2018: "Encoder-Decoder with Atrous
Separable Convolution").

DeepLabV3's ASPP on a backbone dilated to output stride 16 (rates 6/12/18) or 8 (12/24/36) -
torchvision's own ``ASPP`` module, 256 channels, image pooling, dropout 0.5 - followed by the
paper's decoder: the stride-4 encoder feature reduced to 48 channels by a 1x1 conv, concatenated
with the 4x-upsampled ASPP output, two 3x3 conv-BN-ReLU layers of 256 channels, a 1x1 classifier,
and a 4x bilinear upsampling to the input size. The decoder convs are dense 3x3 as in the paper's
main results (the separable variant only saves FLOPs on Xception).

Needs a backbone a library can dilate (torchvision ResNets, and every timm model built with
``output_stride``) and a stage at stride 4.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from ..core.errors import PixelsegError
from .base import SegmentationModel
from .blocks import conv_bn_relu, missing_strides, require_batch_of_two, stage_index, upsample_to


class DeepLabV3Plus(SegmentationModel):
    arch = "deeplabv3plus"
    default_backbone = "resnet50"
    options = MappingProxyType(
        dict(output_stride=16, aspp_channels=256, decoder_channels=256, low_level_channels=48, aspp_dropout=0.5)
    )

    @classmethod
    def incompatibility(cls, spec, output_stride=16, **options):
        if output_stride not in spec.output_strides:
            return (
                f"DeepLabV3+ needs a dilated backbone at output stride {output_stride}, and "
                f"{spec.source} offers no dilation for {spec.library_name}"
            )
        return missing_strides(spec, (4,))

    @classmethod
    def encoder_output_stride(cls, output_stride=16, **options):
        if output_stride not in (8, 16):
            raise PixelsegError(f"deeplabv3plus output_stride must be 8 or 16 (got {output_stride!r})")
        return output_stride

    def __init__(
        self,
        encoder,
        num_classes,
        mean,
        std,
        config,
        output_stride=16,
        aspp_channels=256,
        decoder_channels=256,
        low_level_channels=48,
        aspp_dropout=0.5,
    ):
        super().__init__(encoder, num_classes, output_stride, mean, std, config)
        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        self.aspp = ASPP(encoder.channels[-1], list(rates), aspp_channels)
        self.aspp.project[3].p = aspp_dropout
        self.low_index = stage_index(encoder.reductions, 4)
        self.low_level = conv_bn_relu(encoder.channels[self.low_index], low_level_channels, 1)
        self.decoder = nn.Sequential(
            conv_bn_relu(aspp_channels + low_level_channels, decoder_channels),
            conv_bn_relu(decoder_channels, decoder_channels),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        require_batch_of_two(self, x, "the ASPP image-pooling branch")
        feats = self.encode(x)
        low = self.low_level(feats[self.low_index])
        y = upsample_to(self.aspp(feats[-1]), low)
        y = self.classifier(self.decoder(torch.cat([y, low], dim=1)))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)

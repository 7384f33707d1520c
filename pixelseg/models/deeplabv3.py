"""DeepLabV3 (Chen, Papandreou, Schroff, Adam, 2017: "Rethinking Atrous Convolution").

A backbone dilated to output stride 16 (or 8), multi-grid (1, 2, 4) on ResNet's last stage,
ASPP with rates 6/12/18 (doubled at output stride 8) plus image pooling, then a 3x3 conv and
the classifier, bilinearly upsampled to the input size. ASPP and the head are torchvision's
own ``DeepLabHead`` (every branch Conv+BN+ReLU, 1x1 projection + BN + ReLU + dropout), so the
parameter count matches ``torchvision.models.segmentation.deeplabv3_resnet50`` exactly.

Dilation comes from the libraries: torchvision's ``replace_stride_with_dilation`` for ResNets,
timm's ``output_stride`` for mobilenet_v1 and xception65. Backbones neither library can dilate
(VGG, DenseNet, MobileNetV2 from torchvision, legacy Xception) are rejected.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
import torch.nn.functional as F
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from ..core.errors import PixelsegError
from .base import SegmentationModel


class DeepLabV3(SegmentationModel):
    arch = "deeplabv3"
    default_backbone = "resnet50"
    options = MappingProxyType(dict(output_stride=16, multi_grid=(1, 2, 4), aspp_dropout=0.5))

    @classmethod
    def incompatibility(cls, spec, output_stride=16, **options):
        if output_stride not in spec.output_strides:
            return (
                f"DeepLabV3 needs a dilated backbone at output stride {output_stride}, and "
                f"{spec.source} offers no dilation for {spec.library_name}"
            )
        return None

    @classmethod
    def encoder_output_stride(cls, output_stride=16, **options):
        if output_stride not in (8, 16):
            raise PixelsegError(f"deeplabv3 output_stride must be 8 or 16 (got {output_stride!r})")
        return output_stride

    def __init__(
        self, encoder, num_classes, mean, std, config, output_stride=16, multi_grid=(1, 2, 4), aspp_dropout=0.5
    ):
        super().__init__(encoder, num_classes, output_stride, mean, std, config)
        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        self.head = DeepLabHead(encoder.channels[-1], num_classes, atrous_rates=rates)
        self.head[0].project[3].p = aspp_dropout  # torchvision uses 0.5
        layer4 = getattr(encoder.body, "layer4", None)
        if layer4 is not None:  # torchvision ResNet: multi-grid on the last stage
            # (the FX feature extractor keeps layer4 as a plain Module of its blocks)
            layer4 = list(layer4.children())
            if len(multi_grid) != len(layer4):
                raise PixelsegError(
                    f"deeplabv3 multi_grid needs {len(layer4)} values for {encoder.name} (got {list(multi_grid)})"
                )
            rate = 2 if output_stride == 16 else 4
            for block, grid in zip(layer4, multi_grid, strict=False):
                d = rate * int(grid)
                block.conv2.dilation = (d, d)
                block.conv2.padding = (d, d)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            # BatchNorm on ASPP's 1x1 image-pooling branch has one value per channel.
            raise PixelsegError(
                "deeplabv3 needs a batch of at least 2 images in training (BatchNorm on the "
                "image-pooling branch); raise --batch-size"
            )
        size = x.shape[-2:]
        y = self.head(self.encode(x)[-1])
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)

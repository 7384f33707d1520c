"""U-Net with a pretrained-style encoder and the pix2pix upsampling decoder (the tutorial's model).

With ``backbone="mobilenet_v2"`` this is the tutorial's network layer for layer: MobileNetV2
tapped at block_1/3/6/13_expand_relu and block_16_project, four pix2pix upsample blocks
(512, 256, 128, 64 filters) each followed by concatenation with the matching skip, and a
final stride-2 transposed convolution to ``num_classes`` logits at full resolution. Any other
backbone with stages at strides 4, 8, 16 and 32 plugs into the same decoder; when it has no
stride-2 stage (ConvNeXt, Swin, MiT) the last upsample block simply has no skip to concatenate.
"""

from __future__ import annotations

import torch
from torch import nn

from pixelseg.errors import PixelsegError

from .base import SegmentationModel


def pix2pix_upsample(in_channels: int, out_channels: int, dropout: bool = False) -> nn.Sequential:
    """tensorflow_examples' ``pix2pix.upsample(filters, 3)``: ConvTranspose(k3, s2, 'same',
    no bias, N(0, 0.02) init) -> BatchNorm -> [Dropout 0.5] -> ReLU. Dropout is off by default
    there, and the tutorial keeps the default."""
    conv = nn.ConvTranspose2d(
        in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=False
    )
    nn.init.normal_(conv.weight, 0.0, 0.02)
    layers = [conv, nn.BatchNorm2d(out_channels)]
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UNet(SegmentationModel):
    arch = "unet"
    default_backbone = "mobilenet_v2"
    options = dict(decoder_channels=(512, 256, 128, 64), decoder_dropout=False)
    @classmethod
    def incompatibility(cls, spec, **options):
        if spec.reductions[-1] != 32 or not {4, 8, 16} <= set(spec.reductions):
            return ("the U-Net decoder needs stages at strides 4, 8, 16 and 32 (2 optional); "
                    f"{spec.name} gives {', '.join(map(str, spec.reductions))}")
        return None

    def __init__(self, encoder, num_classes, mean, std, config,
                 decoder_channels=(512, 256, 128, 64), decoder_dropout=False):
        reason = self.incompatibility(encoder)
        if reason:
            raise PixelsegError(f"unet cannot use {encoder.name!r}: {reason}")
        if len(decoder_channels) != 4:
            raise PixelsegError(
                f"unet decoder_channels needs 4 values (one per skip), got {list(decoder_channels)}"
            )
        super().__init__(encoder, num_classes, 32, mean, std, config)
        # Deepest skip first: the last stage at each of strides 16, 8, 4, 2 (None: no such stage).
        red = list(encoder.reductions)
        self.skip_index = [max((i for i, r in enumerate(red) if r == s), default=None)
                           for s in (16, 8, 4, 2)]
        ups, in_ch = [], encoder.channels[-1]
        for out_ch, i in zip(decoder_channels, self.skip_index):
            ups.append(pix2pix_upsample(in_ch, out_ch, dropout=decoder_dropout))
            in_ch = out_ch + (encoder.channels[i] if i is not None else 0)
        self.up_stack = nn.ModuleList(ups)
        # Keras Conv2DTranspose(num_classes, 3, strides=2, padding="same") with bias.
        self.last = nn.ConvTranspose2d(
            in_ch, num_classes, 3, stride=2, padding=1, output_padding=1
        )

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encode(x)
        skips = [feats[i] if i is not None else None for i in self.skip_index]
        x = feats[-1]
        for up, skip in zip(self.up_stack, skips):
            x = up(x) if skip is None else torch.cat([up(x), skip], dim=1)
        return self.last(x)

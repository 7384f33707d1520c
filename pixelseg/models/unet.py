"""U-Net with a pretrained-style encoder and the pix2pix upsampling decoder (the tutorial's model).

With ``backbone="mobilenet_v2"`` this is the tutorial's network layer for layer: MobileNetV2
tapped at block_1/3/6/13_expand_relu and block_16_project, four pix2pix upsample blocks
(512, 256, 128, 64 filters) each followed by concatenation with the matching skip, and a
final stride-2 transposed convolution to ``num_classes`` logits at full resolution. Any other
backbone with stages at strides 4, 8, 16 and 32 plugs into the same decoder; when it has no
stride-2 stage (ConvNeXt, Swin, MiT) the last upsample block simply has no skip to concatenate.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch import nn

from ..core.errors import PixelsegError
from .base import SegmentationModel


def pix2pix_upsample(in_channels: int, out_channels: int, dropout: bool = False) -> nn.Sequential:
    """tensorflow_examples' ``pix2pix.upsample(filters, 3)``: ConvTranspose(k3, s2, 'same',
    no bias, N(0, 0.02) init) -> BatchNorm -> [Dropout 0.5] -> ReLU. Dropout is off by default
    there, and the tutorial keeps the default."""
    conv = nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, 0.02)
    layers = [conv, nn.BatchNorm2d(out_channels)]
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UNetDecoder(nn.ModuleList):
    """The pix2pix upsampling path: the deepest feature up through the skips (deepest first), each
    upsample block's output concatenated with its skip. Returns the stride-2 feature the head reads.

    A ModuleList of the upsample blocks, held by the model as ``up_stack``: state-dict keys stay those
    of checkpoints written before the decoder had a class of its own. ``join`` is the one piece
    `runtime` replaces for CPU training (``_SplitSkipConvs``)."""

    def __init__(self, encoder_channels, reductions, decoder_channels=(512, 256, 128, 64), dropout=False):
        # Deepest skip first: the last stage at each of strides 16, 8, 4, 2 (None: no such stage).
        red = list(reductions)
        skip_index = [max((i for i, r in enumerate(red) if r == s), default=None) for s in (16, 8, 4, 2)]
        ups, in_ch = [], encoder_channels[-1]
        for out_ch, i in zip(decoder_channels, skip_index, strict=False):
            ups.append(pix2pix_upsample(in_ch, out_ch, dropout=dropout))
            in_ch = out_ch + (encoder_channels[i] if i is not None else 0)
        super().__init__(ups)
        self.skip_index = skip_index
        self.out_channels = in_ch

    def forward(self, feats: list[torch.Tensor]):
        x = feats[-1]
        for up, i in zip(self, self.skip_index, strict=False):
            x = up(x) if i is None else self.join(up(x), feats[i])
        return x

    def join(self, x: torch.Tensor, skip: torch.Tensor):
        return torch.cat([x, skip], dim=1)


class UNet(SegmentationModel):
    """encoder -> decoder (``up_stack``, a UNetDecoder) -> head (``last``, a stride-2 transposed conv)."""

    arch = "unet"
    default_backbone = "mobilenet_v2"
    options = MappingProxyType(dict(decoder_channels=(512, 256, 128, 64), decoder_dropout=False))

    @classmethod
    def incompatibility(cls, spec, **options):
        if spec.reductions[-1] != 32 or not {4, 8, 16} <= set(spec.reductions):
            return (
                "the U-Net decoder needs stages at strides 4, 8, 16 and 32 (2 optional); "
                f"{spec.name} gives {', '.join(map(str, spec.reductions))}"
            )
        return None

    def __init__(
        self, encoder, num_classes, mean, std, config, decoder_channels=(512, 256, 128, 64), decoder_dropout=False
    ):
        reason = self.incompatibility(encoder)
        if reason:
            raise PixelsegError(f"unet cannot use {encoder.name!r}: {reason}")
        if len(decoder_channels) != 4:
            raise PixelsegError(f"unet decoder_channels needs 4 values (one per skip), got {list(decoder_channels)}")
        super().__init__(encoder, num_classes, 32, mean, std, config)
        self.up_stack = UNetDecoder(encoder.channels, encoder.reductions, decoder_channels, decoder_dropout)
        # Keras Conv2DTranspose(num_classes, 3, strides=2, padding="same") with bias.
        self.last = nn.ConvTranspose2d(
            self.up_stack.out_channels, num_classes, 3, stride=2, padding=1, output_padding=1
        )

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.up_stack(self.encode(x)))

"""The one model interface every architecture shares.

``SegmentationModel`` owns what is common: input normalisation, padding to the output stride
and cropping back (so any H x W works), encoder freezing with Keras ``trainable=False``
semantics, and ``config`` for rebuilding. Subclasses only implement ``decode``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import BackboneSpec, Encoder


def input_normalisation(spec: BackboneSpec, config: dict) -> tuple[int, tuple, tuple]:
    """``(in_channels, mean, std)`` the model normalises its input with.

    Explicit ``mean``/``std`` in the config win (training computes them from the training split
    for non-RGB inputs and stores them in the checkpoint). Otherwise RGB uses the encoder
    weights' statistics, and N != 3 channels get the average of those per channel - the right
    scale for a grey image, a placeholder for other bands until statistics are computed.
    """
    n = int(config.get("in_channels", 3))
    mean, std = config.get("mean"), config.get("std")
    if mean is None:
        mean = spec.mean if n == 3 else (sum(spec.mean) / 3,) * n
    if std is None:
        std = spec.std if n == 3 else (sum(spec.std) / 3,) * n
    return n, tuple(float(v) for v in mean), tuple(float(v) for v in std)


class SegmentationModel(nn.Module):
    """Encoder + decoder mapping N x 3 x H x W images in [0, 1] to N x C x H x W logits.

    The model normalises its input itself with the mean/std the encoder's weights expect
    (the tutorial fed [0, 1] images to a MobileNetV2 trained on [-1, 1]), so callers only
    ever pass [0, 1] pixels.
    """

    arch: ClassVar[str] = ""
    default_backbone: ClassVar[str] = ""
    # keyword options of the architecture and their defaults (read-only: shared by every instance)
    options: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    mean: torch.Tensor  # buffers (register_buffer in __init__)
    std: torch.Tensor

    # -- registry hooks (see factory.create_model) ------------------------------------------
    @classmethod
    def incompatibility(cls, spec: BackboneSpec, **options) -> str | None:
        """Why ``spec`` cannot serve as this architecture's encoder, or None if it can."""
        return None

    @classmethod
    def encoder_output_stride(cls, **options) -> int:
        return 32

    @classmethod
    def from_spec(cls, spec: BackboneSpec, num_classes: int, weights_file, config: dict, **options):
        in_channels, mean, std = input_normalisation(spec, config)
        encoder = spec.build(cls.encoder_output_stride(**options), weights_file, in_channels=in_channels)
        # subclasses take (encoder, num_classes, mean, std, config, **options): the base's output_stride is theirs
        build: Callable[..., SegmentationModel] = cls
        return build(encoder, num_classes, mean, std, config, **options)

    def __init__(self, encoder: Encoder, num_classes: int, output_stride: int, mean, std, config: dict):
        super().__init__()
        self.encoder = encoder
        self.backbone = encoder.name
        self.num_classes = int(num_classes)
        self.output_stride = int(output_stride)
        self.pretrained = False
        self.weights_source = None  # where the encoder weights came from (models/weights.py), for checkpoints
        self.encoder_frozen = False
        self.encoder_bn_frozen = False  # encoder BatchNorm on its running statistics while its weights train
        self._config = dict(config)
        # Not persistent: they follow from the backbone, so state dicts stay portable.
        self.in_channels = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    # -- rebuilding ----------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """Keyword arguments for ``create_model`` that rebuild this architecture.

        ``weights`` is always None so that rebuilding never downloads anything.
        """
        return dict(self._config, weights=None, freeze_encoder=self.encoder_frozen)

    # -- forward -------------------------------------------------------------------------
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a normalised input whose H and W are multiples of ``output_stride``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        # Zero-pad bottom/right up to a multiple of the output stride, *after* normalising,
        # so the padding is the dataset-mean colour (what a conv's own zero padding sees)
        # and every skip connection lines up exactly. The pad amounts are shape arithmetic,
        # not tensor values, so this traces and exports with dynamic H/W.
        s = self.output_stride
        x = F.pad(x, (0, (s - w % s) % s, 0, (s - h % s) % s))
        return self.decode(x)[:, :, :h, :w]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's stage features (``rewrites.optimize_for_training`` may swap in a faster encoder)."""
        return self.encoder(x)

    # -- freezing ------------------------------------------------------------------------
    def set_encoder_frozen(self, frozen: bool) -> None:
        """Freeze (or unfreeze) the encoder: no gradients, and BatchNorm in eval mode even
        under ``model.train()``, like Keras ``trainable=False`` on a pretrained base."""
        self.encoder_frozen = bool(frozen)
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and (self.encoder_frozen or self.encoder_bn_frozen):
            for m in self.encoder.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def extra_repr(self) -> str:
        return (
            f"arch={self.arch!r}, backbone={self.backbone!r}, num_classes={self.num_classes}, "
            f"output_stride={self.output_stride}, pretrained={self.pretrained}"
        )

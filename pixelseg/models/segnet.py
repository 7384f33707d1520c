"""SegNet (Badrinarayanan, Kendall, Cipolla, TPAMI 2017) and Bayesian SegNet (Kendall et al. 2015).

The encoder is VGG's 13 (VGG16) or 16 (VGG19) conv layers with BatchNorm; every 2x2 max-pool
also returns its argmax indices. Each decoder unit unpools with the indices of the matching
encoder pool (what ``MaxUnpool2d`` does - values go back exactly where the maxima came from,
zeros elsewhere - written as a scatter so it exports to ONNX) and then runs a mirrored stack of
3x3 conv + BN + ReLU; a final 3x3 conv gives class scores, as in the authors' Caffe models.

Bayesian SegNet adds dropout p=0.5 after the central units - encoder units 3, 4, 5 (after
pool3/4/5) and decoder units 5, 4, 3 - exactly where the authors'
``bayesian_segnet_camvid.prototxt`` puts it; ``pixelseg.models.mc_predict`` keeps it active
at test time. (The tutorial's Bayesian SegNet adds dropout but never samples at test time,
so it is an ordinary SegNet with extra regularisation.)

``upsample="nearest"`` is the tutorial's variant: the decoder doubles the resolution by
nearest-neighbour upsampling instead of unpooling, so any backbone with a stride-32 output
works (the tutorial uses ResNet50). Pooling indices exist only when every downsampling is a
2x2 max-pool, i.e. for vgg16/vgg19.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import PixelsegError
from .base import SegmentationModel, input_normalisation

# VGG layout the decoder mirrors: conv layers per stage and their widths.
_VGG_CONVS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
_VGG_WIDTHS = (64, 128, 256, 512, 512)


def max_unpool2x2(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Inverse of a 2x2/stride-2 max-pool: each value goes back to the position its maximum
    came from (flat index into the 2H x 2W map, as ``max_pool2d(return_indices=True)`` gives
    it), zeros elsewhere - what ``F.max_unpool2d`` does.

    Hand-written as a scatter because ONNX export has no ``max_unpool2d`` (the TorchScript
    exporter rejects it); a scatter exports with dynamic H/W and runs under bfloat16 autocast.
    """
    n, c, h, w = x.shape
    out = x.new_zeros(n, c, 4 * h * w)
    out = out.scatter(2, indices.flatten(2), x.flatten(2))
    return out.view(n, c, 2 * h, 2 * w)


def max_pool2x2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's 2x2/stride-2 max-pool with argmax indices. A module-level function so that
    export's parity check can substitute the pooling decisions of the runtime it checks."""
    return F.max_pool2d(x, 2, 2, return_indices=True)


def vgg_conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    """VGG-BN's layer (its conv keeps a bias, as vgg16_bn's ImageNet weights and SegNet checkpoints have one);
    blocks.conv_bn_relu, used by the other decoders, has none because BatchNorm follows."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PoolingIndicesEncoder(nn.Module):
    """torchvision ``vgg*_bn().features`` run stage by stage, returning each pool's output
    and its argmax indices. Parameter names stay torchvision's (``features.N.*``)."""

    def __init__(self, features: nn.Sequential, name: str):
        super().__init__()
        self.features = features
        self.name = name
        self.source = "torchvision"
        self.pool_positions = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
        if len(self.pool_positions) != 5:
            raise AssertionError("expected five max-pool stages in a VGG encoder")
        self.channels = tuple(_VGG_WIDTHS)
        self.reductions = (2, 4, 8, 16, 32)

    def forward(self, x: torch.Tensor, after_pool=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``after_pool``: optional dict stage -> module applied to that pool's output before
        the next stage sees it (Bayesian SegNet's encoder dropout)."""
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, layer in enumerate(self.features):
            if i in self.pool_positions:
                x, idx = max_pool2x2(x)
                stage = len(out)
                if after_pool is not None and stage in after_pool:
                    x = after_pool[stage](x)
                out.append((x, idx))
            else:
                x = layer(x)
        return out


class SegNet(SegmentationModel):
    arch = "segnet"
    default_backbone = "vgg16"
    options = MappingProxyType(dict(upsample="indices"))
    dropout = 0.0
    uses_library_model = True  # by default the encoder is the raw VGG ``features``

    @classmethod
    def incompatibility(cls, spec, upsample="indices", **options):
        if upsample == "indices" and not spec.max_pool_stages:
            return (
                "pooling-indices unpooling needs an encoder that downsamples only with 2x2 "
                f"max-pooling (vgg16, vgg19), and {spec.name} does not; pass "
                "upsample='nearest' for the tutorial's plain-upsampling SegNet"
            )
        if spec.reductions[-1] != 32:
            return "SegNet's five decoder units need a stride-32 encoder output"
        return None

    @classmethod
    def from_spec(cls, spec, num_classes, weights_file, config, upsample="indices", **options):
        if upsample not in ("indices", "nearest"):
            raise PixelsegError(f"{cls.arch} upsample must be 'indices' or 'nearest' (got {upsample!r})")
        in_channels, mean, std = input_normalisation(spec, config)
        if upsample == "indices":
            features = spec.build_library_model(32, weights_file, in_channels=in_channels).features
            encoder = PoolingIndicesEncoder(features, spec.name)
        else:
            encoder = spec.build(32, weights_file, in_channels=in_channels)
        convs = _VGG_CONVS.get(spec.name, _VGG_CONVS["vgg16"])
        return cls(encoder, num_classes, mean, std, config, upsample=upsample, stage_convs=convs, **options)

    def __init__(
        self, encoder, num_classes, mean, std, config, upsample="indices", stage_convs=_VGG_CONVS["vgg16"], dropout=None
    ):
        super().__init__(encoder, num_classes, 32, mean, std, config)
        self.upsample = upsample
        p = self.dropout if dropout is None else dropout
        # Decoder units deepest first; unit for stage i mirrors encoder stage i: its convs
        # keep stage i's width except the last, which narrows to stage i-1's width.
        units, cin = [], encoder.channels[-1]
        for i in reversed(range(5)):
            width, n = _VGG_WIDTHS[i], stage_convs[i]
            outs = [width] * (n - 1) + [_VGG_WIDTHS[max(i - 1, 0)]]
            layers = []
            for cout in outs:
                layers.append(vgg_conv_bn_relu(cin, cout))
                cin = cout
            units.append(nn.Sequential(*layers))
        self.decoder = nn.ModuleList(units)
        self.classifier = nn.Conv2d(cin, num_classes, 3, padding=1)
        # Bayesian SegNet: after encoder units 3, 4, 5 and decoder units 5, 4, 3.
        self.enc_dropout = nn.ModuleList(nn.Dropout(p) for _ in range(3)) if p > 0 else None
        self.dec_dropout = nn.ModuleList(nn.Dropout(p) for _ in range(3)) if p > 0 else None

    @property
    def pooling_indices(self) -> bool:
        """Whether values are routed by argmax decisions (see ``export.check_parity``)."""
        return self.upsample == "indices"

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        drop = self.enc_dropout
        if self.upsample == "indices":
            hooks = None if drop is None else {2: drop[0], 3: drop[1], 4: drop[2]}
            feats = self.encoder(x, after_pool=hooks)
            y, indices = feats[-1][0], [i for _, i in feats]
        else:
            # A library encoder cannot take mid-network dropout: only its output gets it
            # (the tutorial's placement).
            y, indices = self.encoder(x)[-1], None
            if drop is not None:
                y = drop[2](y)
        for j, unit in enumerate(self.decoder):  # j = 0 is the deepest unit (stage 5)
            if indices is not None:
                y = max_unpool2x2(y, indices[4 - j])
            else:
                y = F.interpolate(y, scale_factor=2.0, mode="nearest")
            y = unit(y)
            if self.dec_dropout is not None and j < 3:
                y = self.dec_dropout[j](y)
        return self.classifier(y)


class BayesianSegNet(SegNet):
    arch = "bayesian_segnet"
    options = MappingProxyType(dict(upsample="indices", dropout=0.5))
    dropout = 0.5

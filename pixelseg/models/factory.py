"""``create_model`` and the architecture registry (timm / segmentation_models_pytorch style).

``ARCHITECTURES`` maps a name to a ``SegmentationModel`` subclass. Each class declares
``default_backbone``, ``options`` (its keyword options and their defaults) and
``incompatibility(spec, **options)``, which returns why a backbone cannot be used (or None),
so invalid combinations fail up front with a reason instead of deep inside a forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from typing import Any, cast

import torch

from ..core.errors import PixelsegError
from .backbones import BACKBONES, BackboneSpec, get_backbone
from .base import SegmentationModel
from .deeplabv3 import DeepLabV3
from .deeplabv3plus import DeepLabV3Plus
from .fcn import FCN8s, FCN16s, FCN32s
from .fpn import FPN
from .pspnet import PSPNet
from .segformer import SegFormer
from .segnet import BayesianSegNet, SegNet
from .unet import UNet
from .upernet import UPerNet
from .weights import encoder_state, load_encoder_state, load_weights_file, resolve_imagenet

ARCHITECTURES: dict[str, type[SegmentationModel]] = {
    "unet": UNet,
    "fcn8s": FCN8s,
    "fcn16s": FCN16s,
    "fcn32s": FCN32s,
    "segnet": SegNet,
    "bayesian_segnet": BayesianSegNet,
    "deeplabv3": DeepLabV3,
    "deeplabv3plus": DeepLabV3Plus,
    "pspnet": PSPNet,
    "fpn": FPN,
    "upernet": UPerNet,
    "segformer": SegFormer,
}


def _arch(name: str) -> type[SegmentationModel]:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise PixelsegError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHITECTURES)}") from None


def _valid_backbones(cls, options: Mapping[str, Any]) -> list[str]:
    return [b for b, spec in BACKBONES.items() if cls.incompatibility(spec, **options) is None]


def _resolve_options(cls, arch: str, arch_options: dict) -> dict:
    unknown = sorted(set(arch_options) - set(cls.options))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in cls.options.items()) or "none"
        raise PixelsegError(f"unknown option(s) {', '.join(unknown)} for {arch}; valid options: {valid}")
    return {**cls.options, **arch_options}


def check_model(arch: str, backbone: str | None = None, **arch_options) -> str:
    """Validate an architecture/backbone pair without building anything; returns the backbone used."""
    cls = _arch(arch)
    options = _resolve_options(cls, arch, arch_options)
    backbone = backbone or cls.default_backbone
    reason = cls.incompatibility(get_backbone(backbone), **options)
    if reason is not None:
        raise PixelsegError(
            f"{arch} cannot use backbone {backbone!r}: {reason}. "
            f"Valid backbones for {arch}: {', '.join(_valid_backbones(cls, options))}"
        )
    return backbone


def create_model(
    arch: str,
    backbone: str | None = None,
    num_classes: int = 3,
    weights: str | PathLike | None = None,
    freeze_encoder: bool = False,
    in_channels: int = 3,
    mean=None,
    std=None,
    **arch_options,
) -> SegmentationModel:
    """Build a segmentation model.

    ``weights``: None / "none" (random init), "imagenet" (ImageNet weights for the encoder: an installed
    weights package, the torch-hub cache, or downloaded once; see models/weights.py), or a path to a
    whole-model state dict (e.g. a pixelseg checkpoint) or an encoder's alone. ``arch_options`` are
    architecture specific, see ``ARCHITECTURES[arch].options``. ``backbone`` is a registered name or
    ``timm:NAME`` for any timm model with ``features_only``. ``in_channels`` other than 3 adapts the
    encoder's first convolution (pretrained RGB filters via timm's ``adapt_input_conv``);
    ``mean``/``std`` (one value per channel, for [0, 1] inputs) override the encoder's normalisation
    statistics.
    """
    cls = _arch(arch)
    options = _resolve_options(cls, arch, arch_options)
    backbone = check_model(arch, backbone, **options)
    spec = get_backbone(backbone)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise PixelsegError(f"num_classes must be a positive integer (got {num_classes!r})")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise PixelsegError(f"in_channels must be a positive integer (got {in_channels!r})")
    for what, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) != in_channels:
            raise PixelsegError(f"{what} needs {in_channels} values, one per input channel (got {list(values)})")
    if std is not None and min(std) <= 0:
        raise PixelsegError(f"std values must be positive (got {list(std)})")

    weights_file, state_file, resolved = None, None, None
    if isinstance(weights, str) and weights.lower() in ("none", ""):
        weights = None
    if isinstance(weights, str) and weights.lower() == "imagenet":
        resolved = resolve_imagenet(spec)  # a weights package, the hub cache or a download
        weights_file = resolved.file  # None for a package: its state dict is loaded below
    elif weights is not None:
        state_file = weights

    config = dict(arch=arch, backbone=backbone, num_classes=num_classes, **options)
    if in_channels != 3:
        config["in_channels"] = in_channels
    if mean is not None:
        config["mean"] = [float(v) for v in mean]
    if std is not None:
        config["std"] = [float(v) for v in std]
    try:
        model = cls.from_spec(spec, num_classes, weights_file, config, **options)
    except PixelsegError:
        raise
    except Exception as exc:
        if weights_file is None:
            raise
        # A truncated or foreign file in the hub cache: say which one, not a deep traceback.
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PixelsegError(
            f"could not load ImageNet weights for backbone {backbone!r} from {weights_file} "
            f"({reason}); delete that file so it is fetched again, or use --weights none"
        ) from None
    model.pretrained = weights_file is not None
    model.weights_source = resolved.record if resolved is not None else None
    if resolved is not None and resolved.state is not None:
        state = encoder_state(resolved.state, model, resolved.record["file"])
        if state is None:
            raise PixelsegError(f"{resolved.record['file']}: not an encoder state dict for backbone {backbone!r}")
        load_encoder_state(model, state)
        model.pretrained = True
    if state_file is not None:
        kind = load_weights_file(model, state_file)
        model.pretrained = True
        model.weights_source = dict(source="file", loaded=kind, file=str(state_file))
    if freeze_encoder:
        model.set_encoder_frozen(True)
    return model


def list_models() -> list[tuple[str, str]]:
    """Every valid ``(arch, backbone)`` pair with the architecture's default options."""
    return [(arch, backbone) for arch, cls in ARCHITECTURES.items() for backbone in _valid_backbones(cls, cls.options)]


def describe_models() -> list[dict]:
    """``{arch, backbone, default, params}`` for every valid pair with default options (``default``: the
    backbone used when none is given).

    Built on the meta device (no memory, no initialisation). Each encoder is built once and
    shared by every architecture using it - parameter counting does not mind - because
    tracing torchvision encoders is what costs time.
    """
    encoders: dict = {}
    rows = []
    for arch, backbone in list_models():
        cls = ARCHITECTURES[arch]
        spec = _SharedEncoderSpec(BACKBONES[backbone], encoders)
        try:
            if not getattr(cls, "uses_library_model", False):
                spec.build(cls.encoder_output_stride(**cls.options))  # outside the meta context
            config = dict(arch=arch, backbone=backbone, num_classes=3, **cls.options)
            with torch.device("meta"):
                # duck-typed: a BackboneSpec's attributes, memoised builds
                model = cls.from_spec(cast(BackboneSpec, spec), 3, None, config, **cls.options)
        except PixelsegError:  # an optional library missing (transformers for MiT)
            rows.append(dict(arch=arch, backbone=backbone, default=backbone == cls.default_backbone, params=None))
            continue
        rows.append(
            dict(
                arch=arch,
                backbone=backbone,
                default=backbone == cls.default_backbone,
                params=sum(p.numel() for p in model.parameters()),
            )
        )
    return rows


class _SharedEncoderSpec:
    """A BackboneSpec whose (meta-device) builds are memoised, for describe_models only."""

    def __init__(self, spec, cache: dict):
        self._spec, self._cache = spec, cache

    def __getattr__(self, name):
        return getattr(self._spec, name)

    def build(self, output_stride=32, weights_file=None, in_channels=3):
        key = ("encoder", self._spec.name, output_stride)
        if key not in self._cache:
            self._cache[key] = self._spec.build(output_stride, None, device="meta")
        return self._cache[key]

    def build_library_model(self, output_stride=32, weights_file=None, in_channels=3):
        key = ("library", self._spec.name, output_stride)
        if key not in self._cache:
            self._cache[key] = self._spec.build_library_model(output_stride, None, device="meta")
        return self._cache[key]

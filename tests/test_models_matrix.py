"""Every registered (arch, backbone) pair builds and keeps the input size; every backbone
returns the channels and strides it declares. The full matrix is slow (150+ pairs, some with
hundreds of millions of parameters); a representative subset runs by default."""

from __future__ import annotations

import pytest
import torch

from pixelseg.models import BACKBONES, create_model, list_models

# Small widths where an architecture has them: the wiring is what is under test here.
SMALL = {
    "unet": dict(decoder_channels=(32, 16, 16, 8)),
    "fcn8s": dict(head_channels=32),
    "fcn16s": dict(head_channels=32),
    "fcn32s": dict(head_channels=32),
    "deeplabv3plus": dict(aspp_channels=32, decoder_channels=32),
    "pspnet": dict(head_channels=32),
    "fpn": dict(pyramid_channels=32, segmentation_channels=16),
    "upernet": dict(channels=32),
    "segformer": dict(decoder_channels=32),
}

# One pair per backbone family and source library, every architecture at least once.
SUBSET = {
    ("unet", "densenet121"),
    ("unet", "xception"),
    ("fcn8s", "mobilenet_v1"),
    ("fcn16s", "resnet50"),
    ("segnet", "vgg19"),
    ("deeplabv3", "xception65"),
    ("upernet", "mit_b1"),
}
PAIRS = [
    pytest.param(a, b, marks=() if (a, b) in SUBSET else pytest.mark.slow, id=f"{a}-{b}")
    for a, b in list_models()
]


@pytest.mark.parametrize("arch, backbone", PAIRS)
def test_pair_builds_and_keeps_size(arch, backbone):
    torch.manual_seed(0)
    model = create_model(arch, backbone, num_classes=4, **SMALL.get(arch, {})).eval()
    assert (model.arch, model.backbone, model.num_classes) == (arch, backbone, 4)
    with torch.no_grad():
        for size in [(64, 64), (45, 70)]:
            y = model(torch.rand(1, 3, *size))
            assert y.shape == (1, 4, *size)
            assert torch.isfinite(y).all()


NEAREST = [
    pytest.param("segnet", "resnet50", id="segnet-resnet50"),  # any backbone (the one copy of this test)
    pytest.param("bayesian_segnet", "mobilenet_v2", id="bayesian_segnet-mobilenet_v2"),
    pytest.param("segnet", "vgg16", id="segnet-vgg16", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("arch, backbone", NEAREST)
def test_segnet_nearest_upsampling_variant(arch, backbone):
    model = create_model(arch, backbone, upsample="nearest").eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 40, 72)).shape == (1, 3, 40, 72)


def _stride_cases():
    for name, spec in BACKBONES.items():
        for os_ in spec.output_strides:
            quick = (name, os_) in {("vgg16", 32), ("mobilenet_v1", 16), ("densenet121", 32)}
            yield pytest.param(name, os_, marks=() if quick else pytest.mark.slow,
                               id=f"{name}-os{os_}")


@pytest.mark.parametrize("name, output_stride", list(_stride_cases()))
def test_backbone_declares_what_it_returns(name, output_stride):
    spec = BACKBONES[name]
    encoder = spec.build(output_stride).eval()
    with torch.no_grad():
        feats = encoder(torch.rand(1, 3, 64, 96))
    assert [f.shape[1] for f in feats] == list(encoder.channels)
    assert [96 // f.shape[-1] for f in feats] == list(encoder.reductions)
    assert [64 // f.shape[-2] for f in feats] == list(encoder.reductions)
    # The registry's static description is the OS-32 layout; dilation caps the strides.
    assert tuple(encoder.channels) == spec.channels
    assert tuple(encoder.reductions) == tuple(min(r, output_stride) for r in spec.reductions)

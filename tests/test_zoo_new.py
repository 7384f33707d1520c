"""DeepLabV3+, PSPNet, FPN, UPerNet, SegFormer; ``timm:NAME`` encoders; ``in_channels``.

Small backbones and widths keep this cheap: the wiring is under test, the full widths are
exercised by the slow matrix (tests/test_models_matrix.py) and the zoo benchmark."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pixelseg.core.errors import PixelsegError
from pixelseg.models import ARCHITECTURES, create_model, list_models
from pixelseg.models.backbones import get_backbone
from pixelseg.models.blocks import adaptive_avg_pool2d

transformers = pytest.importorskip("transformers", reason="pixelseg[segformer] extra not installed")

from _fakes import NEW_ARCHS as NEW  # noqa: E402  (small backbones and widths per new architecture)


def _model(arch, **kw):
    torch.manual_seed(0)
    backbone, opts = NEW[arch]
    return create_model(arch, kw.pop("backbone", backbone), num_classes=4, **{**opts, **kw})


@pytest.mark.parametrize("arch", list(NEW))
def test_new_arch_keeps_any_size_and_every_parameter_learns(arch):
    model = _model(arch).eval()
    with torch.no_grad():
        for size in [(45, 70), (33, 97)]:
            y = model(torch.rand(1, 3, *size))
            assert y.shape == (1, 4, *size) and torch.isfinite(y).all()
    # Training mode: every decoder parameter gets a finite, non-zero gradient (nothing is left unwired;
    # encoder BatchNorm biases under a stride-32 map of 1x1 legitimately get exactly zero).
    model.train()
    x, t = torch.rand(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    F.cross_entropy(model(x), t).backward()
    dead = [n for n, p in model.named_parameters() if not n.startswith("encoder.")
            and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().max() == 0)]
    assert not dead, dead[:5]
    assert model.config["arch"] == arch and arch in ARCHITECTURES


def test_new_archs_are_registered_with_valid_default_pairs():
    pairs = set(list_models())
    for arch in NEW:
        assert (arch, ARCHITECTURES[arch].default_backbone) in pairs
    # Dilation-only architectures list only dilatable backbones; MiT serves the stride-4..32 decoders.
    assert {b for a, b in pairs if a == "deeplabv3plus"} == {"resnet50", "resnet101", "resnet152",
                                                            "mobilenet_v1", "xception65", "efficientnet_lite0",
                                                            "efficientnet_lite1", "efficientnet_lite2"}
    assert {"mit_b0", "mit_b5"} <= {b for a, b in pairs if a == "segformer"}
    assert ("upernet", "mit_b2") in pairs and ("fpn", "densenet121") in pairs
    assert ("deeplabv3plus", "mit_b0") not in pairs  # MiT cannot be dilated


def test_deeplabv3plus_output_strides_and_low_level_tap():
    m16 = _model("deeplabv3plus").eval()
    m8 = _model("deeplabv3plus", output_stride=8).eval()
    assert m16.output_stride == 16 and m8.output_stride == 8
    assert m16.encoder.reductions[m16.low_index] == 4
    # ASPP rates double at output stride 8, as in the paper.
    rates = lambda m: [b[0].dilation[0] for b in m.aspp.convs[1:4]]  # noqa: E731
    assert rates(m16) == [6, 12, 18] and rates(m8) == [12, 24, 36]
    with torch.no_grad():
        f16 = m16.encoder(torch.rand(1, 3, 64, 64))[-1]
        f8 = m8.encoder(torch.rand(1, 3, 64, 64))[-1]
    assert f16.shape[-1] == 4 and f8.shape[-1] == 8


def test_pyramid_pooling_matches_adaptive_pool_in_export_form(monkeypatch):
    """The ONNX form of adaptive pooling (two averaging matmuls) equals PyTorch's kernel, also
    for sizes the bins do not divide."""
    x = torch.randn(2, 5, 13, 22)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    for bins in (2, 3, 6):
        torch.testing.assert_close(adaptive_avg_pool2d(x, bins), F.adaptive_avg_pool2d(x, bins))
    m = _model("pspnet")
    assert m.ppm.bins == (1, 2, 3, 6) and m.encoder.reductions[-1] == 8


def test_fpn_and_upernet_read_strides_4_to_32():
    for arch in ("fpn", "upernet"):
        m = _model(arch)
        assert [m.encoder.reductions[i] for i in m.stages] == [4, 8, 16, 32]


def test_segformer_decoder_widths_follow_the_paper():
    assert _model("segformer", decoder_channels=None).classifier.in_channels == 256  # B0
    b2 = create_model("segformer", "mit_b2", num_classes=3)
    assert b2.classifier.in_channels == 768 and b2.encoder.channels == (64, 128, 320, 512)
    # MiT-B2 encoder: 24.7M parameters (SegFormer paper Table 6 lists 24.2M for the encoder + 3.3M decoder = 27.5M)
    enc = sum(p.numel() for p in b2.encoder.parameters())
    total = sum(p.numel() for p in b2.parameters())
    assert 24e6 < enc < 25.5e6 and 27e6 < total < 28e6


# ---- timm:NAME encoders -------------------------------------------------------------------------
@pytest.mark.parametrize("arch, name", [
    ("unet", "convnext_atto"),          # 4 stages (no stride-2 skip)
    ("deeplabv3plus", "efficientnet_b0"),  # dilated by timm
    ("segformer", "mambaout_femto"),  # N x H x W x C features
    pytest.param("upernet", "swin_tiny_patch4_window7_224", marks=pytest.mark.slow),  # NHWC, any input size
    ("fcn8s", "regnety_002"),
])
def test_timm_backbone_any_features_only_model(arch, name):
    opts = dict(head_channels=16) if arch.startswith("fcn") else {}
    model = create_model(arch, f"timm:{name}", num_classes=3, **opts).eval()
    spec = get_backbone(f"timm:{name}")
    assert model.backbone == f"timm:{name}" and model.mean.flatten().tolist() == pytest.approx(spec.mean)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 50, 77)).shape == (1, 3, 50, 77)
    # the config rebuilds the same network
    again = create_model(**model.config)
    assert again.state_dict().keys() == model.state_dict().keys()


def test_timm_backbone_normalisation_comes_from_its_pretrained_config():
    assert get_backbone("timm:convnext_atto").mean == (0.485, 0.456, 0.406)
    spec = get_backbone("timm:inception_v3.tf_in1k")
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)
    assert create_model("unet", "timm:inception_v3.tf_in1k", num_classes=2).std.flatten().tolist() == [0.5] * 3


def test_timm_model_without_features_only_is_refused(monkeypatch):
    """Every model of this timm release has features_only, so the refusal is provoked the way timm
    words it for models that lack it."""
    import pixelseg.models.backbones as bb
    real = bb.timm.create_model

    def no_features(name, **kw):
        if kw.get("features_only"):
            raise RuntimeError(f"features_only not implemented for {name}")
        return real(name, **kw)

    monkeypatch.setattr(bb.timm, "create_model", no_features)
    bb.timm_backbone.cache_clear()
    try:
        with pytest.raises(PixelsegError, match=r"timm model 'resnet14t' cannot serve as an encoder: it has no "
                                                r"features_only support \(features_only not implemented"):
            create_model("unet", "timm:resnet14t")
    finally:
        bb.timm_backbone.cache_clear()


def test_timm_backbone_errors_are_one_clear_line():
    with pytest.raises(PixelsegError, match=r"unknown timm model 'convnxt_tiny'; close matches: convnext_tiny"):
        create_model("unet", "timm:convnxt_tiny")
    with pytest.raises(PixelsegError, match=r"no pretrained tag 'bogus'.*convnext_tiny\.fb_in1k"):
        create_model("unet", "timm:convnext_tiny.bogus")
    with pytest.raises(PixelsegError, match=r"fpn cannot use backbone 'timm:vit_tiny_patch16_224': .*strides 4, 8, 16, 32.*gives 16, 16, 16"):
        create_model("fpn", "timm:vit_tiny_patch16_224")
    with pytest.raises(PixelsegError, match=r"needs a dilated backbone at output stride 16.*no dilation for swin"):
        create_model("deeplabv3plus", "timm:swin_tiny_patch4_window7_224")
    with pytest.raises(PixelsegError, match=r"did you mean resnet50"):
        create_model("unet", "resnet5")

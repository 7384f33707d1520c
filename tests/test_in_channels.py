"""Inputs beyond RGB: ``create_model(..., in_channels=N)`` with first-conv adaptation and per-channel
normalisation."""

from __future__ import annotations

import pytest
import torch
import torchvision
from timm.models import adapt_input_conv

from pixelseg.core.errors import PixelsegError
from pixelseg.models import create_model
from pixelseg.models.backbones import BACKBONES, adapt_first_conv


@pytest.mark.parametrize("arch, backbone", [("unet", "mobilenet_v2"), ("segnet", "vgg16"),
                                            ("fpn", "mobilenet_v1"), ("segformer", "mit_b0")])
def test_model_takes_n_channels_and_rebuilds_from_config(arch, backbone):
    if backbone.startswith("mit"):
        pytest.importorskip("transformers")
    opts = dict(pyramid_channels=16, segmentation_channels=16) if arch == "fpn" else {}
    model = create_model(arch, backbone, num_classes=3, in_channels=5, mean=[0.1] * 5, std=[0.2] * 5, **opts).eval()
    assert model.in_channels == 5 and model.mean.shape == (1, 5, 1, 1)
    with torch.no_grad():
        assert model(torch.rand(1, 5, 45, 70)).shape == (1, 3, 45, 70)
    cfg = model.config
    assert cfg["in_channels"] == 5 and cfg["mean"] == pytest.approx([0.1] * 5)
    again = create_model(**cfg)
    again.load_state_dict(model.state_dict())
    assert again.std.flatten().tolist() == pytest.approx([0.2] * 5)


def test_default_normalisation_for_other_channel_counts_averages_the_rgb_stats():
    grey = create_model("unet", "mobilenet_v2", num_classes=2, in_channels=1)
    assert grey.mean.flatten().tolist() == pytest.approx([sum(BACKBONES["mobilenet_v2"].mean) / 3])
    assert "mean" not in grey.config  # derived, not stored


@pytest.mark.parametrize("n", [1, 2, 4, 6, 13])
def test_adapted_first_conv_follows_timms_rule_and_keeps_rgb_responses(n):
    model = torchvision.models.resnet18()
    rgb = model.conv1.weight.detach().clone()
    adapt_first_conv(model, n, pretrained=True)
    assert model.conv1.in_channels == n
    torch.testing.assert_close(model.conv1.weight, adapt_input_conv(n, rgb))
    # The rule's point: a grey image (n=1) or RGB bands repeated (n=6) give the RGB activations.
    x = torch.rand(1, 3, 16, 16)
    ref = torch.nn.functional.conv2d(x, rgb, stride=2, padding=3)
    if n == 1:
        out = model.conv1(x.mean(1, keepdim=True).expand(-1, 1, -1, -1))
        ref = torch.nn.functional.conv2d(x.mean(1, keepdim=True).expand(-1, 3, -1, -1), rgb, stride=2, padding=3)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if n == 6:
        torch.testing.assert_close(model.conv1(torch.cat([x, x], 1)), ref, atol=1e-5, rtol=1e-5)


def test_timm_encoder_adapts_pretrained_stem_from_a_weights_file(tmp_path):
    """timm applies the same adapt_input_conv when a (local) pretrained file meets in_chans != 3."""
    import timm
    src = timm.create_model("mobilenetv1_100")
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    enc = BACKBONES["mobilenet_v1"].build(32, weights_file=path, in_channels=4)
    stem = enc.body.conv_stem.weight
    torch.testing.assert_close(stem, adapt_input_conv(4, src.conv_stem.weight.detach()))


def test_mit_hub_weights_load_and_stem_adapts(tmp_path):
    transformers = pytest.importorskip("transformers")
    from pixelseg.models.mit import build_mit, mit_config
    src = transformers.SegformerModel(mit_config("mit-b0"))
    # The Hub's nvidia/mit-bX files are pickled state dicts (pytorch_model.bin); safetensors works too.
    torch.save(src.state_dict(), tmp_path / "pytorch_model.bin")
    src.save_pretrained(tmp_path / "hub")
    assert build_mit("mit-b0", tmp_path / "hub" / "model.safetensors").model.state_dict().keys() == src.state_dict().keys()
    enc = build_mit("mit-b0", tmp_path / "pytorch_model.bin", in_channels=2)
    got = enc.model.stages[0].patch_embeddings.proj.weight
    want = adapt_input_conv(2, src.stages[0].patch_embeddings.proj.weight.detach())
    torch.testing.assert_close(got, want)
    same = [n for n in src.state_dict() if n != "stages.0.patch_embeddings.proj.weight"]
    assert len(same) > 100
    assert all(torch.equal(src.state_dict()[n], enc.model.state_dict()[n]) for n in same)
    (tmp_path / "junk.bin").write_bytes(b"junk")
    with pytest.raises(PixelsegError, match="not a loadable mit-b0 checkpoint"):
        build_mit("mit-b0", tmp_path / "junk.bin")


def test_bad_channel_options_are_one_line():
    with pytest.raises(PixelsegError, match="mean needs 4 values"):
        create_model("unet", in_channels=4, mean=[0.5] * 3)
    with pytest.raises(PixelsegError, match="in_channels must be a positive integer"):
        create_model("unet", in_channels=0)
    with pytest.raises(PixelsegError, match="std values must be positive"):
        create_model("unet", in_channels=2, std=[0.5, 0.0])

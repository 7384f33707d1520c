"""Shared test helpers (not a test module)."""
import torch

from pixelseg.core.checkpoint import atomic_save, model_checkpoint
from pixelseg.data import synthetic
from pixelseg.models import create_model

# One backbone per architecture, with options that keep CPU tests cheap.
ONE_PER_ARCH = {
    "unet": ("mobilenet_v2", {}),
    "fcn32s": ("vgg16", dict(head_channels=64)),
    "fcn16s": ("vgg16", dict(head_channels=64)),
    "fcn8s": ("vgg16", dict(head_channels=64)),
    "segnet": ("vgg16", {}),
    "bayesian_segnet": ("vgg16", {}),
    "deeplabv3": ("resnet50", {}),
}

# The architectures added in issue 14, each with a small backbone and widths: the wiring is under test.
NEW_ARCHS = {
    "deeplabv3plus": ("mobilenet_v1", dict(aspp_channels=32, decoder_channels=32, low_level_channels=8)),
    "pspnet": ("mobilenet_v1", dict(head_channels=32)),
    "fpn": ("mobilenet_v2", dict(pyramid_channels=32, segmentation_channels=16)),
    "upernet": ("timm:resnet10t", dict(channels=32)),
    "segformer": ("mit_b0", dict(decoder_channels=32)),
}


def fake_checkpoint(path, arch="unet", backbone=None, size=32, seed=0, **options):
    """A checkpoint as train writes it, random weights and non-trivial BatchNorm statistics, so masks vary."""
    torch.manual_seed(seed)
    model = create_model(arch, backbone=backbone, num_classes=3, **options)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    atomic_save(model_checkpoint(model, synthetic.INFO, {"image_size": size, "dataset": "synthetic", "val_split": "val",
                                                         "data_root": None}), path)
    return path


def write_id_folder(root, n: int = 14):
    """A folder dataset of n lossless 8x8 images whose first pixel encodes the sample id (all in train):
    a reader can tell exactly which samples it saw."""
    import numpy as np
    from PIL import Image
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        img = np.zeros((8, 8, 3), np.uint8)
        img[..., 0] = i
        Image.fromarray(img).save(root / "images" / f"s{i:03d}.png")
        Image.fromarray(np.full((8, 8), i % 2, np.uint8)).save(root / "masks" / f"s{i:03d}.png")
    (root / "train.txt").write_text("\n".join(f"s{i:03d}" for i in range(n)))
    (root / "val.txt").write_text("")
    return root

"""Shared test helpers (not a test module)."""
import torch

from pixelseg.checkpoint import atomic_save
from pixelseg.data import synthetic
from pixelseg.models import create_model


def fake_checkpoint(path, arch="unet", backbone=None, size=32, seed=0, **options):
    """A checkpoint as train writes it, random weights and non-trivial BatchNorm statistics, so masks vary."""
    torch.manual_seed(seed)
    model = create_model(arch, backbone=backbone, num_classes=3, **options)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    atomic_save({"model": model.state_dict(), "model_config": model.config, "dataset": synthetic.INFO.to_dict(),
                 "config": {"image_size": size, "dataset": "synthetic", "val_split": "val", "data_root": None}}, path)
    return path

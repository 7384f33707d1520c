"""pixelseg: train, evaluate and run semantic-segmentation models (U-Net, FCN, SegNet, DeepLabV3)."""

from ._version import __version__


def __getattr__(name):
    # Lazy, so `import pixelseg` (and `pixelseg --help`) stays fast and does not import torch.
    if name in ("create_model", "list_models"):
        from . import models
        return getattr(models, name)
    raise AttributeError(name)


__all__ = ["__version__", "create_model", "list_models"]

"""pixelseg: train, evaluate and run semantic-segmentation models: 12 architectures (U-Net, FCN-8s/16s/32s,
SegNet, Bayesian SegNet, DeepLabV3, DeepLabV3+, PSPNet, FPN, UPerNet, SegFormer) on torchvision/timm encoders.

The package face is `create_model` and `list_models` (lazy: `import pixelseg` does not import torch) and the
`pixelseg` command (cli.py). The code lives in six wings, imports only going down: core <- labels, models <-
data <- training <- inference <- cli (README "Layout")."""

from ._version import __version__


def __getattr__(name):
    # Lazy, so `import pixelseg` (and `pixelseg --help`) stays fast and does not import torch.
    if name in ("create_model", "list_models"):
        from . import models

        return getattr(models, name)
    raise AttributeError(name)


__all__ = ["__version__", "create_model", "list_models"]

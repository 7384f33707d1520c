"""The model zoo: U-Net, FCN-32s/16s/8s, SegNet, Bayesian SegNet and DeepLabV3 over
torchvision / timm backbones, all behind ``create_model`` (timm / SMP naming)."""

from .backbones import BACKBONES, BackboneSpec, Encoder
from .base import SegmentationModel
from .factory import ARCHITECTURES, check_model, create_model, describe_models, list_models
from .uncertainty import mc_predict

__all__ = [
    "ARCHITECTURES",
    "BACKBONES",
    "BackboneSpec",
    "Encoder",
    "SegmentationModel",
    "check_model",
    "create_model",
    "describe_models",
    "list_models",
    "mc_predict",
]

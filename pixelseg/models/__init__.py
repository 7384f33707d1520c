"""The model zoo: 12 architectures (U-Net, FCN-32s/16s/8s, SegNet, Bayesian SegNet, DeepLabV3, DeepLabV3+,
PSPNet, FPN, UPerNet, SegFormer) over torchvision / timm / Mix-Transformer encoders, all behind
``create_model`` (timm / SMP naming): encoder -> decoder -> head. weights.py says where encoder weights come
from; rewrites.py holds the module rewrites that make training and inference faster without changing them."""

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

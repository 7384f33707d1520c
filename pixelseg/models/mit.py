"""Mix Transformer (MiT-B0..B5), SegFormer's encoder, taken from Hugging Face ``transformers``.

timm has no MiT (``timm.list_models('*mit*')`` is empty), so the encoder is transformers'
``SegformerEncoder`` - the implementation the NVIDIA checkpoints on the Hub (``nvidia/mit-b0`` ..
``nvidia/mit-b5``) load into. Cost of that choice: an optional dependency
(``pip install pixelseg[segformer]``: transformers + tokenizers, ~15 MB of wheels) and ~2-4 s of
import time, paid only when a MiT backbone is built. Writing MiT by hand would avoid both but
means owning a transformer implementation and its weight-name mapping.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ..core.errors import PixelsegError

# Per variant: hidden sizes, blocks per stage (Xie et al. 2021, Table 6); heads 1/2/5/8,
# spatial-reduction ratios 8/4/2/1 and MLP ratio 4 are shared (transformers' defaults).
MIT_VARIANTS = {
    "mit-b0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit-b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "mit-b2": ((64, 128, 320, 512), (3, 4, 6, 3)),
    "mit-b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
    "mit-b4": ((64, 128, 320, 512), (3, 8, 27, 3)),
    "mit-b5": ((64, 128, 320, 512), (3, 6, 40, 3)),
}
HUB_IDS = {v: f"nvidia/{v}" for v in MIT_VARIANTS}
HUB_FILENAME = "pytorch_model.bin"


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise PixelsegError(
            "MiT backbones (mit_b0..mit_b5, SegFormer's encoders) need Hugging Face transformers: "
            "pip install pixelseg[segformer]"
        ) from None
    return transformers


class MiTEncoder(nn.Module):
    """transformers' ``SegformerModel`` (MiT stages only) returning the four stage maps, strides 4..32.

    The stages are run one by one rather than through ``SegformerModel.forward``, whose
    ``output_hidden_states`` machinery (forward hooks) does not trace for ONNX/TorchScript export.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model: Any = model  # a transformers SegformerModel (its .stages are read below)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.model.stages:
            x = stage(x)
            feats.append(x)
        return feats


def mit_config(variant: str, in_channels: int = 3):
    transformers = require_transformers()
    hidden, depths = MIT_VARIANTS[variant]
    return transformers.SegformerConfig(hidden_sizes=list(hidden), depths=list(depths), num_channels=in_channels)


def build_mit(variant: str, weights_file=None, device=None, in_channels: int = 3) -> MiTEncoder:
    transformers = require_transformers()
    if weights_file is not None:
        model = load_hub_weights(variant, weights_file, in_channels)
        return MiTEncoder(model.to(device) if device is not None else model)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        # SegformerModel(config) applies transformers' weight init (truncated normal).
        return MiTEncoder(transformers.SegformerModel(mit_config(variant, in_channels)))


def load_hub_weights(variant: str, path, in_channels: int = 3) -> nn.Module:
    """A ``SegformerModel`` with the weights of an ``nvidia/mit-bX`` file, loaded by transformers'
    own ``from_pretrained`` (safe tensor loading, and it maps the Hub files' older key names to
    the installed version's). The stem's RGB filters are then adapted to ``in_channels`` with
    timm's ``adapt_input_conv`` rule, as for every other backbone."""
    import os
    import tempfile
    from pathlib import Path

    transformers = require_transformers()
    from timm.models import adapt_input_conv

    path = Path(path).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        mit_config(variant).save_pretrained(tmp)
        name = "model.safetensors" if path.suffix == ".safetensors" else HUB_FILENAME
        os.symlink(path, Path(tmp) / name)
        try:
            model = transformers.SegformerModel.from_pretrained(tmp)
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise PixelsegError(f"{path} is not a loadable {variant} checkpoint ({reason})") from None
    if in_channels != 3:
        stem = model.stages[0].patch_embeddings.proj
        new = nn.Conv2d(in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding)
        with torch.no_grad():
            new.weight.copy_(adapt_input_conv(in_channels, stem.weight))
            if new.bias is not None:  # always: a Conv2d built with its default bias=True
                new.bias.copy_(stem.bias)
        model.stages[0].patch_embeddings.proj = new
        model.config.num_channels = in_channels
    return model

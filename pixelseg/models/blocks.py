"""Pieces the newer decoders share: conv-BN-ReLU, picking encoder stages by stride, and the
pyramid pooling module (PSPNet, UPerNet) with an adaptive average pool that exports to ONNX."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import PixelsegError


def conv_bn_relu(cin: int, cout: int, k: int = 3, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias: BatchNorm follows) + BN + ReLU; an nn.Sequential so BatchNorm fusing
    (rewrites.fuse_batchnorm) sees the pair."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def stage_index(reductions, stride: int) -> int:
    """Index of the deepest encoder stage at ``stride`` (dilated encoders repeat their last stride)."""
    idx = [i for i, r in enumerate(reductions) if r == stride]
    if not idx:
        raise PixelsegError(f"encoder has no stage at stride {stride} (strides {list(reductions)})")
    return idx[-1]


def missing_strides(spec, needed) -> str | None:
    """The registry's reason when a backbone lacks stages at the strides a decoder reads."""
    have = set(spec.reductions)
    if not set(needed) <= have:
        return (
            f"it needs encoder stages at strides {', '.join(map(str, needed))} and "
            f"{spec.name} gives {', '.join(map(str, spec.reductions))}"
        )
    return None


def require_batch_of_two(model: nn.Module, x: torch.Tensor, what: str) -> None:
    if model.training and x.shape[0] < 2:
        # BatchNorm over a 1x1 pooled map has one value per channel: training statistics are undefined.
        raise PixelsegError(
            f"{model.arch} needs a batch of at least 2 images in training (BatchNorm on {what}); raise --batch-size"
        )


def _pool_matrix(size, bins: int, like: torch.Tensor) -> torch.Tensor:
    """bins x size averaging matrix with adaptive_avg_pool's bin edges: floor(i*n/b) .. ceil((i+1)*n/b)."""
    i = torch.arange(bins, device=like.device)
    start = torch.div(i * size, bins, rounding_mode="floor")
    end = torch.div((i + 1) * size + bins - 1, bins, rounding_mode="floor")
    pos = torch.arange(size, device=like.device)
    inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


def adaptive_avg_pool2d(x: torch.Tensor, bins: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, bins)``, written as two averaging matmuls when exporting to ONNX.

    Hand-written because ONNX has no adaptive pooling: torch's exporter handles only output size 1
    (GlobalAveragePool) or inputs whose size it knows to be divisible, so PSPNet/UPerNet's 2/3/6 bins
    would not export with dynamic H/W. The matrices are built from the input's shape, so the graph
    stays dynamic; eager PyTorch keeps the native kernel.
    """
    if bins == 1 or not torch.onnx.is_in_onnx_export():
        return F.adaptive_avg_pool2d(x, bins)
    h, w = x.shape[-2], x.shape[-1]
    mh = _pool_matrix(h, bins, x)
    mw = _pool_matrix(w, bins, x)
    return torch.matmul(torch.matmul(mh, x), mw.t())


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module: average-pool to b x b for each bin, 1x1 conv-BN-ReLU,
    upsample back bilinearly, and concatenate with the input (Zhao et al. 2017)."""

    def __init__(self, in_channels: int, branch_channels: int, bins=(1, 2, 3, 6)):
        super().__init__()
        self.bins = tuple(int(b) for b in bins)
        self.branches = nn.ModuleList(conv_bn_relu(in_channels, branch_channels, 1) for _ in self.bins)
        self.out_channels = in_channels + branch_channels * len(self.bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        out = [x]
        for b, branch in zip(self.bins, self.branches, strict=True):
            y = branch(adaptive_avg_pool2d(x, b))
            out.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        return torch.cat(out, dim=1)


def upsample_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

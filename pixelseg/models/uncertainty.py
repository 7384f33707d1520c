"""Monte Carlo dropout inference (Kendall et al. 2015, Bayesian SegNet).

Dropout stays active at test time while everything else (BatchNorm included) runs in eval
mode; the spread of the sampled softmax outputs is the model uncertainty.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import PixelsegError

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def has_dropout(model: nn.Module) -> bool:
    """Whether the model has a dropout layer that samples (p > 0): what MC dropout needs."""
    return any(isinstance(m, _DROPOUT) and m.p > 0 for m in model.modules())


@torch.no_grad()
def mc_predict(model: nn.Module, x: torch.Tensor, samples: int = 8, max_batch: int = 8) -> dict:
    """Sample ``samples`` stochastic forward passes.

    Returns ``mean`` (N x C x H x W mean softmax), ``entropy`` (N x H x W predictive entropy
    of the mean softmax, in nats) and ``variance`` (N x H x W: per-class variance of the
    softmax over samples, population form 1/S, averaged over classes). Samples are run as
    one batch of up to ``max_batch`` images (copies of the input get independent dropout
    masks), so a small input costs one forward pass per ``max_batch // N`` samples.
    """
    if not has_dropout(model):
        name = getattr(model, "arch", type(model).__name__)
        raise PixelsegError(
            f"model {name!r} has no dropout layers, so MC-dropout sampling gives no "
            "uncertainty; train with --model bayesian_segnet"
        )
    if samples < 1:
        raise PixelsegError(f"samples must be >= 1 (got {samples})")
    was_training = model.training
    model.eval()
    for m in model.modules():
        if isinstance(m, _DROPOUT) and m.p > 0:
            m.train()
    try:
        n = x.shape[0]
        copies = max(1, max_batch // max(n, 1))
        s1: torch.Tensor | None = None  # running sum and sum of squares of the softmax
        s2: torch.Tensor | None = None
        done = 0
        while done < samples:
            k = min(copies, samples - done)
            probs = model(x.repeat(k, 1, 1, 1)).float().softmax(dim=1)
            probs = probs.view(k, n, *probs.shape[1:])
            ps, ps2 = probs.sum(0), (probs * probs).sum(0)
            s1 = ps if s1 is None else s1 + ps
            s2 = ps2 if s2 is None else s2 + ps2
            done += k
    finally:
        model.train(was_training)
    assert s1 is not None and s2 is not None  # samples >= 1: the loop ran
    mean = s1 / samples
    variance = (s2 / samples - mean * mean).clamp_min(0).mean(dim=1)
    entropy = -(mean * mean.clamp_min(1e-12).log()).sum(dim=1)
    return {"mean": mean, "entropy": entropy, "variance": variance}

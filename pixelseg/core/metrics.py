"""Segmentation metrics from one confusion matrix accumulated over a whole split.

Averaging per-batch IoUs is biased (small batches, absent classes); summing the confusion matrix
first and computing the scores once is what the papers (FCN, SegNet, DeepLab) report.
"""

from __future__ import annotations

import torch

# The label value that marks pixels to skip (unlabelled, void, trimap borders of padded crops); datasets
# carry their own in DatasetInfo.ignore_index, and this is the default everywhere else.
IGNORE_INDEX = 255


def class_ids(scores: torch.Tensor) -> torch.Tensor:
    """The class of each pixel: index of the largest score along dim 1 (first one on ties, as argmax).

    ``max(1).indices`` rather than ``argmax(1)``: on CPU (torch 2.14) argmax over the class dim of a
    contiguous N×C×H×W tensor is a slow strided reduction, many times this (docs/benchmarks.md, "Numbers
    behind choices in the code"); it was most of `pixelseg serve`'s per-request time.
    """
    return scores.max(1).indices


class ConfusionMatrix:
    """Rows are true classes, columns predicted classes; pixels labelled `ignore_index` are skipped."""

    def __init__(self, num_classes: int, ignore_index: int | None = IGNORE_INDEX, device="cpu"):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        # Skipped pixels go to one extra bin instead of being masked out: a boolean index costs a
        # nonzero() and two gathers per batch (docs/benchmarks.md, "Numbers behind choices in the code").
        c = self.num_classes
        pred = pred.reshape(-1).to(self.mat.device)
        target = target.reshape(-1).to(self.mat.device).long()
        idx = target * c + pred.long()
        skip = (target < 0) | (target >= c)  # ignore_index included: it is never a class id here
        if self.ignore_index is not None and 0 <= self.ignore_index < c:
            skip |= target == self.ignore_index
        idx = idx.masked_fill_(skip, c * c)
        self.mat += torch.bincount(idx, minlength=c * c + 1)[: c * c].reshape(c, c)

    def reset(self) -> None:
        self.mat.zero_()

    def compute(self) -> dict:
        return scores_from_confusion(self.mat)


def scores_from_confusion(mat: torch.Tensor) -> dict:
    """Pixel accuracy, mean class accuracy, per-class IoU/Dice, mIoU; classes absent from both the
    target and the prediction get NaN and are left out of the means."""
    m = mat.double().cpu()
    tp = m.diag()
    gt = m.sum(1)
    pred = m.sum(0)
    total = m.sum()
    union = gt + pred - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    dice = torch.where(gt + pred > 0, 2 * tp / (gt + pred).clamp(min=1), nan)
    class_acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
    return {
        "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_class_acc": float(class_acc.nanmean()),
        "miou": float(iou.nanmean()),
        "mean_dice": float(dice.nanmean()),
        "iou": iou.tolist(),
        "dice": dice.tolist(),
        "class_acc": class_acc.tolist(),
    }

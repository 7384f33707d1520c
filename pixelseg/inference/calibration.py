"""How much a model's uncertainty is worth, measured over a whole split.

Two questions, asked of the single deterministic pass (softmax entropy, any model) and, for models
with dropout, of Monte-Carlo dropout sampling (Kendall et al., Bayesian SegNet):

* **Does uncertainty find the errors?** Accuracy of the pixels kept when the most uncertain p% are
  dropped (the Bayesian SegNet paper's accuracy-vs-uncertainty-percentile curve). A useful
  uncertainty makes this curve rise steeply; a useless one keeps it flat.
* **Are the probabilities calibrated?** Expected calibration error of the (mean) softmax: pixels
  binned by confidence (15 equal-width bins, Guo et al. 2017), ECE = sum over bins of
  |accuracy - mean confidence| weighted by the bin's share of pixels; and a reliability diagram.

Everything is accumulated in fixed-size histograms on the device, so a split of any size costs the
same memory. Percentile thresholds are therefore resolved to 1/``UNC_BINS`` of the uncertainty
range; within the bin that straddles a threshold its pixels are dropped pro rata (hand-written
because no library keeps these curves streaming).
"""

from __future__ import annotations

import math

import numpy as np
import torch

CONF_BINS = 15
UNC_BINS = 4096
DROP_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)


class UncertaintyStats:
    """Streaming statistics of one prediction source (e.g. "softmax" or "mc") over valid pixels."""

    def __init__(self, unc_ranges: dict[str, float], device="cpu"):
        self.conf_count = torch.zeros(CONF_BINS, dtype=torch.float64, device=device)
        self.conf_sum = torch.zeros(CONF_BINS, dtype=torch.float64, device=device)
        self.conf_correct = torch.zeros(CONF_BINS, dtype=torch.float64, device=device)
        # per uncertainty measure: its range and (count, correct) histograms
        self.unc_ranges = dict(unc_ranges)
        self.unc_count = {k: torch.zeros(UNC_BINS, dtype=torch.float64, device=device) for k in unc_ranges}
        self.unc_correct = {k: torch.zeros(UNC_BINS, dtype=torch.float64, device=device) for k in unc_ranges}

    @torch.no_grad()
    def update(
        self,
        probs: torch.Tensor,
        target: torch.Tensor,
        ignore_index: int | None,
        uncertainties: dict[str, torch.Tensor],
    ) -> None:
        """probs N×C×H×W (rows sum to 1), target N×H×W, uncertainties name -> N×H×W (higher = less sure)."""
        conf, pred = probs.float().max(1)
        valid = (target >= 0) & (target < probs.shape[1])
        if ignore_index is not None:
            valid &= target != ignore_index
        conf, correct = conf[valid], (pred == target)[valid].double()
        b = (conf * CONF_BINS).long().clamp_(0, CONF_BINS - 1)
        self.conf_count += torch.bincount(b, minlength=CONF_BINS).double()
        self.conf_sum += torch.bincount(b, weights=conf.double(), minlength=CONF_BINS)
        self.conf_correct += torch.bincount(b, weights=correct, minlength=CONF_BINS)
        for name, u in uncertainties.items():
            top = self.unc_ranges[name]
            ub = (u.float()[valid] / top * UNC_BINS).long().clamp_(0, UNC_BINS - 1)
            self.unc_count[name] += torch.bincount(ub, minlength=UNC_BINS).double()
            self.unc_correct[name] += torch.bincount(ub, weights=correct, minlength=UNC_BINS)

    def ece(self) -> float:
        n = self.conf_count.sum()
        if n == 0:
            return float("nan")
        gap = (self.conf_correct - self.conf_sum).abs()  # = count * |acc - mean conf| per bin
        return float(gap.sum() / n)

    def reliability(self) -> dict:
        c = self.conf_count.clamp(min=1)
        return {
            "bin_edges": np.linspace(0, 1, CONF_BINS + 1).tolist(),
            "count": self.conf_count.tolist(),
            "accuracy": torch.where(self.conf_count > 0, self.conf_correct / c, torch.nan).tolist(),
            "confidence": torch.where(self.conf_count > 0, self.conf_sum / c, torch.nan).tolist(),
        }

    def accuracy(self) -> float:
        n = self.conf_count.sum()
        return float(self.conf_correct.sum() / n) if n > 0 else float("nan")

    def kept_accuracy(self, name: str, drop: float) -> float:
        """Accuracy of the pixels left after dropping the `drop` fraction with the highest uncertainty."""
        count, correct = self.unc_count[name].cpu(), self.unc_correct[name].cpu()
        total = float(count.sum())
        keep = total * (1.0 - drop)
        if keep <= 0:
            return float("nan")
        cum = torch.cumsum(count, 0)  # from the most certain bin upwards
        full = int(torch.searchsorted(cum, torch.tensor(keep, dtype=torch.float64)))
        full = min(full, UNC_BINS - 1)
        kept_n = float(cum[full - 1]) if full > 0 else 0.0
        kept_c = float(correct[:full].sum())
        part = keep - kept_n  # pixels taken from the straddling bin, pro rata
        if count[full] > 0 and part > 0:
            kept_c += float(correct[full]) * part / float(count[full])
        return kept_c / keep

    def curve(self, name: str, fractions=None) -> list[float]:
        fractions = np.linspace(0, 0.95, 39) if fractions is None else fractions
        return [self.kept_accuracy(name, float(f)) for f in fractions]

    def summary(self) -> dict:
        return {
            "pixel_acc": self.accuracy(),
            "ece": self.ece(),
            "reliability": self.reliability(),
            "kept_accuracy": {
                name: {f"{round(100 * f)}%": self.kept_accuracy(name, f) for f in DROP_FRACTIONS}
                for name in self.unc_count
            },
        }


def softmax_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each pixel's class distribution, N×C×H×W -> N×H×W."""
    p = probs.float()
    return -(p * p.clamp_min(1e-12).log()).sum(1)


def entropy_range(num_classes: int) -> float:
    return math.log(max(num_classes, 2))


def reliability_figure(sources: dict[str, UncertaintyStats], path, title: str = "") -> None:
    """Left: reliability diagram per source; right: kept accuracy vs fraction of most uncertain pixels dropped."""
    from ..core.viz import _save_fig, plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
    ax1.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="perfect calibration")
    width = 1.0 / CONF_BINS
    centers = (np.arange(CONF_BINS) + 0.5) * width
    for i, (label, st) in enumerate(sources.items()):
        rel = st.reliability()
        acc = np.asarray(rel["accuracy"], dtype=float)
        off = (i - (len(sources) - 1) / 2) * width / max(len(sources), 1)
        ax1.bar(
            centers + off,
            np.nan_to_num(acc),
            width=width / max(len(sources), 1),
            alpha=0.75,
            label=f"{label} (ECE {100 * st.ece():.2f}%)",
        )
    ax1.set_xlabel("confidence (max softmax)")
    ax1.set_ylabel("accuracy")
    ax1.set_xlim(0, 1)
    ax1.set_ylim(0, 1)
    ax1.set_title("reliability")
    ax1.legend(loc="upper left", fontsize=8)
    fr = np.linspace(0, 0.95, 39)
    for label, st in sources.items():
        for name in st.unc_count:
            ax2.plot(100 * fr, 100 * np.asarray(st.curve(name, fr)), label=f"{label}: {name}")
    ax2.set_xlabel("most uncertain pixels dropped (%)")
    ax2.set_ylabel("accuracy of the kept pixels (%)")
    ax2.set_title("does uncertainty find the errors?")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    _save_fig(fig, path)

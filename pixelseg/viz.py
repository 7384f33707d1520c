"""Figures people would rather see than read: prediction grids, overlays, curves, confusion matrices."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from .checkpoint import atomic_write_bytes  # noqa: E402


def colorize(mask: np.ndarray, palette, ignore_index: int = 255) -> np.ndarray:
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)
    lut[ignore_index] = (255, 0, 255) if ignore_index >= len(palette) else lut[ignore_index]
    return lut[mask.astype(np.uint8)]


def overlay(image: np.ndarray, mask: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
    color = colorize(mask, palette).astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + color * alpha).round().astype(np.uint8)


def _save_fig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def prediction_grid(images, true_masks, pred_masks, palette, path: Path, title: str = "",
                    class_names=None) -> None:
    """Rows of input | true mask | predicted mask (the tutorial's DisplayCallback, saved)."""
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.6 * n), squeeze=False)
    for i in range(n):
        for j, (arr, name) in enumerate([(images[i], "Input image"),
                                         (colorize(true_masks[i], palette), "True mask"),
                                         (colorize(pred_masks[i], palette), "Predicted mask")]):
            axes[i, j].imshow(arr, interpolation="nearest")
            axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title(name)
    if class_names:
        handles = [matplotlib.patches.Patch(color=np.asarray(c) / 255, label=nm) for nm, c in zip(class_names, palette)]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    if title:
        fig.suptitle(title)
    _save_fig(fig, path)


def training_curves(history: list[dict], path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(epochs, [h["train_loss"] for h in history], "r-o", ms=3, label="train loss")
    ax1.plot(epochs, [h["val_loss"] for h in history], "b-o", ms=3, label="val loss")
    ax1.set_xlabel("epoch"); ax1.set_ylabel("loss"); ax1.set_title("Loss"); ax1.legend(); ax1.grid(alpha=0.3)
    if "train_miou" in history[0]:
        ax2.plot(epochs, [h["train_miou"] for h in history], "r-o", ms=3, label="train mIoU")
    ax2.plot(epochs, [h["val_miou"] for h in history], "b-o", ms=3, label="val mIoU")
    ax2.set_xlabel("epoch"); ax2.set_ylabel("mIoU"); ax2.set_title("Mean IoU"); ax2.set_ylim(0, 1)
    ax2.legend(); ax2.grid(alpha=0.3)
    _save_fig(fig, path)


def confusion_figure(mat: np.ndarray, class_names, path: Path, title: str = "") -> None:
    """Row-normalised (recall) colours, raw pixel counts printed in each cell when it fits."""
    mat = np.asarray(mat, dtype=np.float64)
    norm = mat / np.maximum(mat.sum(1, keepdims=True), 1)
    k = len(class_names)
    size = max(4.0, 0.55 * k + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted"); ax.set_ylabel("true")
    if k <= 16:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true-class pixels")
    ax.set_title(title or "Confusion matrix (row-normalised)")
    _save_fig(fig, path)


def heatmap_rgb(values: np.ndarray, vmax: float | None = None, cmap: str = "inferno") -> np.ndarray:
    """A per-pixel map (e.g. uncertainty) colour-mapped to RGB uint8 at its own resolution."""
    v = np.asarray(values, dtype=np.float32)
    vmax = float(vmax if vmax is not None else max(v.max(), 1e-8))
    return matplotlib.colormaps[cmap](np.clip(v / vmax, 0, 1), bytes=True)[..., :3]


def heatmap_png(values: np.ndarray, path: Path, vmax: float | None = None, cmap: str = "inferno") -> None:
    atomic_write_bytes(Path(path), png_bytes(heatmap_rgb(values, vmax, cmap)))


def png_bytes(arr: np.ndarray, palette=None) -> bytes:
    """PNG-encode uint8 H×W (grey, or class ids with `palette` as a palette PNG) or H×W×3 (RGB)."""
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), mode="P" if palette is not None else None)
    if palette is not None:
        pal = np.zeros((256, 3), np.uint8)
        pal[: len(palette)] = np.asarray(palette, np.uint8)
        img.putpalette(pal.ravel().tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_index_png(mask: np.ndarray, palette, path: Path) -> None:
    """Class ids as an 8-bit palette PNG: values are ids, viewers show colours."""
    atomic_write_bytes(Path(path), png_bytes(mask, palette))


def save_rgb_png(arr: np.ndarray, path: Path) -> None:
    atomic_write_bytes(Path(path), png_bytes(arr))

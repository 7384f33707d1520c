"""Figures people would rather see than read: prediction grids, overlays, curves, confusion matrices."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

from .files import atomic_write_bytes
from .metrics import IGNORE_INDEX

IGNORE_COLOR = (255, 0, 255)  # magenta: no dataset palette uses it, so "ignored" stands out
IGNORE_LABEL = "ignored"
LEGEND_EDGE = "#404040"  # outline of legend swatches: a white or pale class stays visible


def rgb_view(image: np.ndarray, bands=None) -> np.ndarray:
    """A displayable uint8 RGB picture of an H x W x C input: RGB uint8 images as they are; otherwise
    the chosen ``bands`` (default the first three, or the first one as grey), each stretched between
    its 2nd and 98th percentile - multispectral and 16-bit data rarely fill their range."""
    if image.dtype == np.uint8 and image.shape[-1] == 3 and bands is None:
        return image
    c = image.shape[-1]
    if bands is None:
        bands = (0, 1, 2) if c >= 3 else (0, 0, 0)
    bands = [int(b) for b in bands]
    if len(bands) == 1:
        bands = bands * 3
    if len(bands) != 3 or not all(0 <= b < c for b in bands):
        from .errors import PixelsegError

        raise PixelsegError(f"--rgb-bands {','.join(map(str, bands))}: need 1 or 3 band indices in 0..{c - 1}")
    out = image[..., bands].astype(np.float32)
    lo = np.percentile(out, 2, axis=(0, 1), keepdims=True)
    hi = np.percentile(out, 98, axis=(0, 1), keepdims=True)
    return (np.clip((out - lo) / np.maximum(hi - lo, 1e-8), 0, 1) * 255).round().astype(np.uint8)


def colorize(mask: np.ndarray, palette, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)
    lut[ignore_index] = IGNORE_COLOR if ignore_index >= len(palette) else lut[ignore_index]
    return lut[mask.astype(np.uint8)]


def pick_samples(masks, n: int, num_classes: int) -> list[int]:
    """Indices of `n` images for the per-epoch figure: together they show as many classes as possible
    (rarest first), and otherwise lie far apart in the split. The first n images of a split are often
    one breed or consecutive video frames, which makes the figure say little."""
    total = len(masks)
    if n <= 0 or total == 0:
        return []
    cand = np.unique(np.linspace(0, total - 1, min(total, 256)).round().astype(int))
    present = np.zeros((len(cand), num_classes), bool)
    for row, i in enumerate(cand):
        counts = np.bincount(np.asarray(masks[i]).ravel(), minlength=256)[:num_classes]
        present[row] = counts > 0
    rarity = 1.0 / np.maximum(present.sum(0), 1)  # a class few images show is worth more
    chosen: list[int] = []
    covered = np.zeros(num_classes, bool)
    for _ in range(min(n, len(cand))):
        gain = (present & ~covered) @ rarity
        if chosen:
            spread = np.min(np.abs(cand[:, None] - cand[chosen][None, :]), axis=1) / max(total, 1)
        else:
            spread = 1.0 - np.abs(cand - (total - 1) / 2) / max(total, 1)  # start mid-split, then spread out
        score = gain * 10 + spread  # classes first, distance breaks ties
        score[chosen] = -np.inf
        best = int(np.argmax(score))
        chosen.append(best)
        covered |= present[best]
    return sorted(int(cand[c]) for c in chosen)


def legend_handles(class_names, palette, with_ignore: bool = False):
    handles = [
        matplotlib.patches.Patch(facecolor=tuple(v / 255 for v in c), edgecolor=LEGEND_EDGE, label=nm)
        for nm, c in zip(class_names, palette, strict=False)
    ]
    if with_ignore:
        r, g, b = IGNORE_COLOR
        handles.append(
            matplotlib.patches.Patch(facecolor=(r / 255, g / 255, b / 255), edgecolor=LEGEND_EDGE, label=IGNORE_LABEL)
        )
    return handles


def overlay(image: np.ndarray, mask: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
    color = colorize(mask, palette).astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + color * alpha).round().astype(np.uint8)


def with_legend(image: np.ndarray, mask: np.ndarray, palette, class_names) -> np.ndarray:
    """`image` with a legend strip below it naming the classes present in `mask` (outlined swatches on grey,
    so white and pale classes show). Drawn with PIL, not matplotlib: the overlay keeps its pixel size."""
    w = image.shape[1]
    present = [i for i in np.unique(mask) if i < len(class_names)]
    font_px = int(np.clip(w / 40, 11, 28))
    try:
        font = ImageFont.load_default(size=font_px)
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        font = ImageFont.load_default()
    pad, box = max(2, font_px // 3), font_px
    items, x, y, rows = [], pad, pad, 1
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for i in present:
        tw = int(probe.textlength(class_names[i], font=font))
        need = box + pad + tw + 2 * pad
        if x + need > w and x > pad:
            x, y, rows = pad, y + box + pad, rows + 1
        items.append((i, x, y))
        x += need
    strip = Image.new("RGB", (w, rows * (box + pad) + pad), (225, 225, 225))
    draw = ImageDraw.Draw(strip)
    for i, x0, y0 in items:
        draw.rectangle([x0, y0, x0 + box, y0 + box], fill=tuple(int(v) for v in palette[i]), outline=(64, 64, 64))
        draw.text((x0 + box + pad, y0 + box / 2), class_names[i], fill=(0, 0, 0), font=font, anchor="lm")
    return np.concatenate([image, np.asarray(strip)], axis=0)


def _save_fig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def prediction_grid(images, true_masks, pred_masks, palette, path: Path, title: str = "", class_names=None) -> None:
    """Rows of input | true mask | predicted mask (the tutorial's DisplayCallback, saved)."""
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.6 * n), squeeze=False)
    for i in range(n):
        for j, (arr, name) in enumerate(
            [
                (images[i], "Input image"),
                (colorize(true_masks[i], palette), "True mask"),
                (colorize(pred_masks[i], palette), "Predicted mask"),
            ]
        ):
            axes[i, j].imshow(arr, interpolation="nearest")
            axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title(name)
    if class_names:
        ignored = any(bool((np.asarray(m) >= len(palette)).any()) for m in true_masks)
        handles = legend_handles(class_names, palette, with_ignore=ignored)
        fig.legend(
            handles=handles,
            loc="lower center",
            ncol=min(len(handles), 6),
            frameon=True,
            facecolor="#e6e6e6",
            edgecolor="none",
        )
    if title:
        fig.suptitle(title)
    _save_fig(fig, path)


def training_curves(history: list[dict], path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(epochs, [h["train_loss"] for h in history], "r-o", ms=3, label="train loss")
    ax1.plot(epochs, [h["val_loss"] for h in history], "b-o", ms=3, label="val loss")
    ax1.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    if "train_miou" in history[0]:
        ax2.plot(epochs, [h["train_miou"] for h in history], "r-o", ms=3, label="train mIoU")
    ax2.plot(epochs, [h["val_miou"] for h in history], "b-o", ms=3, label="val mIoU")
    ax2.set(xlabel="epoch", ylabel="mIoU", title="Mean IoU", ylim=(0, 1))
    ax2.legend()
    ax2.grid(alpha=0.3)
    for ax in (ax1, ax2):  # whole epochs only: a 2-epoch run gets ticks 1 and 2, not 1.0, 1.2, ...
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
    ax.set(xlabel="predicted", ylabel="true")
    if k <= 16:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    f"{norm[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
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


def png_bytes(arr: np.ndarray, palette=None, compress_level: int = 6) -> bytes:
    """PNG-encode uint8 H×W (grey, or class ids with `palette` as a palette PNG) or H×W×3 (RGB).
    `compress_level` 1 (the server's answers) encodes a mask ~2.5x faster for a slightly larger file."""
    if palette is None and np.ndim(arr) == 2:
        return grey_png(np.asarray(arr, dtype=np.uint8), compress_level)
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), mode="P" if palette is not None else None)
    if palette is not None:
        pal = np.zeros((256, 3), np.uint8)
        pal[: len(palette)] = np.asarray(palette, np.uint8)
        img.putpalette(pal.ravel().tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def grey_png(arr: np.ndarray, compress_level: int = 6) -> bytes:
    """8-bit greyscale PNG of uint8 H×W, every row with filter type 0 (none).

    Hand-written because PIL filters each row of a greyscale image adaptively (it tries all five PNG
    filters) and offers no way to choose: that costs more than the compression itself, and predicted
    class-id masks, long runs of one value, come out about as small without it (docs/benchmarks.md,
    "Numbers behind choices in the code"). Every PNG reader decodes it: it is the format's plainest form."""
    h, w = arr.shape
    if h == 0 or w == 0:
        raise ValueError(f"cannot write an empty {h}x{w} image as PNG")
    rows = np.zeros((h, w + 1), np.uint8)  # a leading 0 per row: filter type None
    rows[:, 1:] = arr

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), compress_level))
        + chunk(b"IEND", b"")
    )


def save_index_png(mask: np.ndarray, palette, path: Path) -> None:
    """Class ids as an 8-bit palette PNG: values are ids, viewers show colours."""
    atomic_write_bytes(Path(path), png_bytes(mask, palette))


def save_rgb_png(arr: np.ndarray, path: Path) -> None:
    atomic_write_bytes(Path(path), png_bytes(arr))

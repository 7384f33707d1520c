"""Random images and blob masks: a dataset for benchmarks and smoke tests that needs no files."""

from __future__ import annotations

import numpy as np

from .base import ArrayDataset, DatasetInfo

INFO = DatasetInfo("synthetic", ["background", "object", "edge"], [(0, 0, 0), (200, 60, 60), (240, 240, 240)])
DEFAULT_SPLITS = {"train": "train", "val": "val"}


def load(root, split: str, image_size: tuple[int, int], limit: int | None = None, **_):
    n = limit or (256 if split == "train" else 64)
    rng = np.random.default_rng(0 if split == "train" else 1)
    h, w = image_size
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0.3, 0.7, (2, n, 1, 1)) * np.array([h, w]).reshape(2, 1, 1, 1)
    r = rng.uniform(0.15, 0.35, (n, 1, 1)) * min(h, w)
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    masks = np.where(d < r - 2, 1, np.where(d < r + 2, 2, 0)).astype(np.uint8)
    noise = rng.integers(0, 80, (n, h, w, 3), dtype=np.uint8)
    colors = np.array([[40, 40, 40], [200, 80, 60], [220, 220, 220]], np.uint8)
    images = np.clip(colors[masks].astype(np.int16) + noise - 40, 0, 255).astype(np.uint8)
    return ArrayDataset(images, masks, [f"synthetic_{i}" for i in range(n)], INFO)


def write_folder(root, n: int, size=(512, 512), seed: int = 0, vary: bool = False) -> None:
    """An on-disk `--dataset folder` of JPEG photos with shapes and PNG index masks (0 background,
    1 disc, 2 box): structure to learn and realistic file sizes, for tests and benchmarks.
    `vary`: sizes differ per image (up to `size`), as real photo collections do."""
    from pathlib import Path

    from PIL import Image, ImageDraw

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = size
        if vary:
            h, w = int(rng.integers(h // 2, h + 1)), int(rng.integers(w // 2, w + 1))
        _, xx = np.mgrid[0:h, 0:w]
        base = rng.integers(0, 256, 3)
        img = (base + 60 * np.sin(xx / rng.uniform(8, 40))[..., None] * rng.uniform(-1, 1, 3)).clip(0, 255)
        img = Image.fromarray((img + rng.normal(0, 8, (h, w, 3))).clip(0, 255).astype(np.uint8))
        mask = Image.new("L", (w, h), 0)
        di, dm = ImageDraw.Draw(img), ImageDraw.Draw(mask)
        for _ in range(int(rng.integers(1, 4))):
            cls = int(rng.integers(1, 3))
            x0, y0 = int(rng.integers(0, w * 3 // 4)), int(rng.integers(0, h * 3 // 4))
            box = (x0, y0, x0 + int(rng.integers(8, w // 3 + 9)), y0 + int(rng.integers(8, h // 3 + 9)))
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            (di.ellipse if cls == 1 else di.rectangle)(box, fill=color)
            (dm.ellipse if cls == 1 else dm.rectangle)(box, fill=cls)
        img.save(root / "images" / f"img_{i:05d}.jpg", quality=90)
        mask.save(root / "masks" / f"img_{i:05d}.png")

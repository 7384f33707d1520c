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

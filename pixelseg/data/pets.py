"""Oxford-IIIT Pet (Parkhi et al. 2012) in its official layout.

Trimap values, checked on the files: 1 = pet, 2 = background, 3 = border ("not classified").
The TensorFlow tutorial's text calls 2 the border and 3 the background; that is wrong.
We subtract 1: 0 = pet, 1 = background, 2 = border.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import PixelsegError
from .base import CacheArg, DatasetInfo, Sample, decode_samples, paired_mask

INFO = DatasetInfo(
    name="oxford-pet",
    class_names=["pet", "background", "border"],
    palette=[(230, 159, 0), (40, 40, 60), (240, 240, 240)],
    ignore_index=255,
)
SPLITS = ("trainval", "test")
DEFAULT_SPLITS = {"train": "trainval", "val": "test"}
TRIMAP_TO_CLASS = np.full(256, 255, dtype=np.uint8)
TRIMAP_TO_CLASS[1:4] = [0, 1, 2]


def list_samples(root: Path, split: str) -> list[Sample]:
    if split not in SPLITS:
        raise PixelsegError(f"--split {split!r}: Oxford-IIIT Pet has splits {', '.join(SPLITS)}")
    lst = root / "annotations" / f"{split}.txt"
    if not lst.is_file():
        raise PixelsegError(
            f"{lst}: split list not found; --data-root must hold images/ and annotations/ "
            "as extracted from images.tar.gz and annotations.tar.gz"
        )
    samples = []
    for line in lst.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = line.split()[0]
        samples.append(Sample(name, root / "images" / f"{name}.jpg", root / "annotations" / "trimaps" / f"{name}.png"))
    if not samples:
        raise PixelsegError(f"{lst}: the split is empty")
    return samples


def check_root(root: Path) -> None:
    if not root.is_dir():
        raise PixelsegError(
            f"--data-root {root}: directory not found (omit --data-root to download the dataset "
            "into $PIXELSEG_DATA or ~/.cache/pixelseg)"
        )
    for sub in ("images", "annotations/trimaps"):
        if not (root / sub).is_dir():
            raise PixelsegError(
                f"--data-root {root}: missing {sub}/; expected the official Oxford-IIIT Pet layout "
                "(images/, annotations/trimaps/, annotations/trainval.txt, test.txt)"
            )


def load(
    root: Path | None,
    split: str,
    image_size: tuple[int, int],
    limit: int | None = None,
    use_cache: CacheArg = True,
    download: bool = True,
):
    if root is None:
        from .download import ensure_oxford_pet

        root = ensure_oxford_pet(None, download=download)
    root = Path(root)
    check_root(root)
    samples = list_samples(root, split)
    if limit:
        samples = samples[:limit]
    missing = [paired_mask(s) for s in samples if not paired_mask(s).is_file()]
    if missing:
        raise PixelsegError(f"{missing[0]}: trimap missing for {len(missing)} image(s) of split {split}")
    return decode_samples(
        samples,
        image_size,
        INFO,
        label_map=TRIMAP_TO_CLASS,
        valid_values=(1, 2, 3),
        use_cache=use_cache,
        desc=f"decoding {split}",
    )


def full_res_samples(root: Path | None, split: str):
    """Oxford-IIIT Pet at full resolution, from the loader's own listing and trimap table."""
    from .io import read_mask

    if root is None:
        from .download import ensure_oxford_pet

        root = ensure_oxford_pet(None, download=True)
    root = Path(root)
    check_root(root)

    def read_target(s):
        mask = read_mask(s.mask)
        bad = np.setdiff1d(np.unique(mask), (1, 2, 3))
        if bad.size:
            raise PixelsegError(f"{s.mask}: trimap values {bad.tolist()} are outside 1..3")
        return TRIMAP_TO_CLASS[mask]

    return list_samples(root, split), read_target

"""CamVid (Brostow et al. 2008) at 360×480 in the SegNet tutorial's layout.

    train/*.png  trainannot/*.png  val/ valannot/  [test/ testannot/]  train.txt val.txt [test.txt]

The list files pair "image annotation" with absolute paths of the publisher's machine
(/SegNet/CamVid/...), so entries are resolved by file name inside --data-root. Annotations are
8-bit class ids 0..10 plus 11 = Unlabelled, which becomes ignore_index (255) so that loss and
metrics skip it, as SegNet's own evaluation does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import PixelsegError
from .base import CacheArg, DatasetInfo, Sample, decode_samples, paired_mask

# Class order and colours of the SegNet tutorial (Scripts/test_segmentation_camvid.py); its 11-class
# set folds Road_marking into Road. Pavement is SegNet's (60, 40, 222), not original CamVid's (0, 0, 192).
CLASSES = [
    ("Sky", (128, 128, 128)),
    ("Building", (128, 0, 0)),
    ("Pole", (192, 192, 128)),
    ("Road", (128, 64, 128)),
    ("Pavement", (60, 40, 222)),
    ("Tree", (128, 128, 0)),
    ("SignSymbol", (192, 128, 128)),
    ("Fence", (64, 64, 128)),
    ("Car", (64, 0, 128)),
    ("Pedestrian", (64, 64, 0)),
    ("Bicyclist", (0, 128, 192)),
]
UNLABELLED = 11
INFO = DatasetInfo(
    name="camvid", class_names=[n for n, _ in CLASSES], palette=[c for _, c in CLASSES], ignore_index=255
)
SPLITS = ("train", "val", "test")
DEFAULT_SPLITS = {"train": "train", "val": "val"}
LABEL_MAP = np.full(256, 255, dtype=np.uint8)
LABEL_MAP[:UNLABELLED] = np.arange(UNLABELLED)  # 11 (Unlabelled) stays 255 = ignore
VALID_VALUES = tuple(range(UNLABELLED + 1))


def _check_root(root: Path | None) -> Path:
    if root is None:
        raise PixelsegError(
            "--dataset camvid needs --data-root: CamVid is not downloaded automatically; point it "
            "at the SegNet layout (train/, trainannot/, val/, valannot/, train.txt, val.txt)"
        )
    root = Path(root)
    if not root.is_dir():
        raise PixelsegError(f"--data-root {root}: directory not found")
    if not (root / "train").is_dir() and not (root / "val").is_dir():
        raise PixelsegError(
            f"--data-root {root}: no train/ or val/ folder; expected CamVid in the SegNet layout "
            "(train/, trainannot/, val/, valannot/, train.txt, val.txt)"
        )
    return root


def list_samples(root: Path | None, split: str) -> list[Sample]:
    """Pairs of one split, from <split>.txt when present, else from the <split>/ folder by file name."""
    root = _check_root(root)
    if split not in SPLITS:
        raise PixelsegError(f"--split {split!r}: CamVid has splits {', '.join(SPLITS)}")
    img_dir, ann_dir, lst = root / split, root / f"{split}annot", root / f"{split}.txt"
    if not img_dir.is_dir() or not ann_dir.is_dir():
        present = [s for s in SPLITS if (root / s).is_dir() and (root / f"{s}annot").is_dir()]
        raise PixelsegError(
            f"--split {split}: CamVid split {split!r} is not in {root} (no {split}/ and "
            f"{split}annot/ folders); available: {', '.join(present) or 'none'}"
        )
    samples = []
    if lst.is_file():
        for n, line in enumerate(lst.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise PixelsegError(f"{lst}:{n}: expected 'image annotation', got {line.strip()!r}")
            # Paths are the publisher's (/SegNet/CamVid/...): keep only the file names.
            img, ann = img_dir / Path(parts[0]).name, ann_dir / Path(parts[1]).name
            samples.append(Sample(img.stem, img, ann))
    else:
        samples = [Sample(p.stem, p, ann_dir / p.name) for p in sorted(img_dir.glob("*.png"))]
    missing = [s for s in samples if not s.image.is_file() or not paired_mask(s).is_file()]
    if missing:
        s = missing[0]
        gone = s.image if not s.image.is_file() else s.mask
        raise PixelsegError(
            f"{gone}: listed for CamVid split {split} but not found ({len(missing)} pair(s) "
            f"incomplete); is --data-root the folder that holds {split}/ and {split}annot/?"
        )
    if not samples:
        raise PixelsegError(f"{img_dir}: CamVid split {split} is empty")
    return samples


def read_target(sample: Sample) -> np.ndarray:
    """Full-resolution class ids (Unlabelled -> 255) for evaluate --full-res."""
    from .io import read_id_mask

    return read_id_mask(sample.mask, LABEL_MAP, VALID_VALUES, "are not CamVid labels 0..11")


def full_res_samples(root: Path | None, split: str) -> tuple[list[Sample], object]:
    """Samples and a reader of their full-resolution targets (used by evaluate --full-res)."""
    return list_samples(root, split), read_target


def load(
    root: Path | None, split: str, image_size: tuple[int, int], limit: int | None = None, use_cache: CacheArg = True
):
    samples = list_samples(root, split)
    if limit:
        samples = samples[:limit]
    return decode_samples(
        samples,
        image_size,
        INFO,
        label_map=LABEL_MAP,
        valid_values=VALID_VALUES,
        use_cache=use_cache,
        desc=f"decoding camvid {split}",
    )

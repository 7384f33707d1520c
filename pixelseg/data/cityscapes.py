"""Cityscapes (Cordts et al. 2016), fine annotations, the 19-class benchmark.

Layout, as ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` extract into --data-root:

    leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Downloads need a login, so pixelseg never fetches them: register at
https://www.cityscapes-dataset.com/downloads/, download those two zips (packages 3 and 1) and
unzip both into one folder, which is --data-root. ``*_labelIds.png`` holds the 34 label ids
0..33; they map to the 19 train ids of cityscapesScripts' ``labels.py``, every other id (void,
ground, parking, rail track, guard rail, bridge, tunnel, pole group, caravan, trailer) to 255 =
ignore. The ``test`` split's public labels are all void, so only train (2,975) and val (500) are
offered.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import PixelsegError
from .base import CacheArg, DatasetInfo, Sample, decode_samples, paired_mask

# (train id order) name, colour, label id — cityscapesScripts helpers/labels.py.
CLASSES = [
    ("road", (128, 64, 128), 7),
    ("sidewalk", (244, 35, 232), 8),
    ("building", (70, 70, 70), 11),
    ("wall", (102, 102, 156), 12),
    ("fence", (190, 153, 153), 13),
    ("pole", (153, 153, 153), 17),
    ("traffic light", (250, 170, 30), 19),
    ("traffic sign", (220, 220, 0), 20),
    ("vegetation", (107, 142, 35), 21),
    ("terrain", (152, 251, 152), 22),
    ("sky", (70, 130, 180), 23),
    ("person", (220, 20, 60), 24),
    ("rider", (255, 0, 0), 25),
    ("car", (0, 0, 142), 26),
    ("truck", (0, 0, 70), 27),
    ("bus", (0, 60, 100), 28),
    ("train", (0, 80, 100), 31),
    ("motorcycle", (0, 0, 230), 32),
    ("bicycle", (119, 11, 32), 33),
]
INFO = DatasetInfo(
    name="cityscapes", class_names=[n for n, _, _ in CLASSES], palette=[c for _, c, _ in CLASSES], ignore_index=255
)
SPLITS = ("train", "val")
DEFAULT_SPLITS = {"train": "train", "val": "val"}
VALID_VALUES = tuple(range(34))
LABEL_MAP = np.full(256, 255, dtype=np.uint8)
for _train_id, (_name, _color, _label_id) in enumerate(CLASSES):
    LABEL_MAP[_label_id] = _train_id

HOW_TO_GET = (
    "register at https://www.cityscapes-dataset.com/downloads/, download gtFine_trainvaltest.zip and "
    "leftImg8bit_trainvaltest.zip and unzip both into one folder; pass that folder as --data-root"
)


def check_root(root: Path | None) -> Path:
    if root is None:
        raise PixelsegError("--dataset cityscapes needs --data-root (Cityscapes downloads need a login): " + HOW_TO_GET)
    root = Path(root)
    if not root.is_dir():
        raise PixelsegError(f"--data-root {root}: directory not found; " + HOW_TO_GET)
    for sub in ("leftImg8bit", "gtFine"):
        if not (root / sub).is_dir():
            raise PixelsegError(
                f"{root / sub}: not found; Cityscapes needs leftImg8bit/ and gtFine/ side by side "
                f"(gtFine_trainvaltest.zip holds gtFine/): " + HOW_TO_GET
            )
    return root


def list_samples(root: Path, split: str) -> list[Sample]:
    if split not in SPLITS:
        raise PixelsegError(
            f"--split {split!r}: Cityscapes has labelled splits train and val (test labels are not public)"
        )
    img_dir, ann_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise PixelsegError(f"{d}: split folder not found")
    samples = []
    for p in sorted(img_dir.glob("*/*_leftImg8bit.png")):
        stem = p.name[: -len("_leftImg8bit.png")]
        samples.append(Sample(stem, p, ann_dir / p.parent.name / f"{stem}_gtFine_labelIds.png"))
    if not samples:
        raise PixelsegError(f"{img_dir}: no <city>/*_leftImg8bit.png images")
    missing = [paired_mask(s) for s in samples if not paired_mask(s).is_file()]
    if missing:
        raise PixelsegError(
            f"{missing[0]}: label file not found ({len(missing)} of {len(samples)} images of "
            f"{split} lack their gtFine labelIds)"
        )
    return samples


def read_target(sample: Sample) -> np.ndarray:
    from .io import read_id_mask

    return read_id_mask(
        sample.mask,
        LABEL_MAP,
        VALID_VALUES,
        "are not Cityscapes label ids 0..33 (use the *_gtFine_labelIds.png files, not trainIds or color)",
    )


def full_res_samples(root: Path | None, split: str):
    return list_samples(check_root(root), split), read_target


def load(
    root: Path | None, split: str, image_size: tuple[int, int], limit: int | None = None, use_cache: CacheArg = True
):
    samples = list_samples(check_root(root), split)
    if limit:
        samples = samples[:limit]
    return decode_samples(
        samples,
        image_size,
        INFO,
        label_map=LABEL_MAP,
        valid_values=VALID_VALUES,
        use_cache=use_cache,
        desc=f"decoding cityscapes {split}",
    )

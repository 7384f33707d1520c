"""ADE20K SceneParsing (Zhou et al. 2017, the MIT Scene Parsing Benchmark): 150 classes.

Layout, as ``ADEChallengeData2016.zip`` extracts into --data-root:

    ADEChallengeData2016/images/{training,validation}/*.jpg        20,210 / 2,000 images
    ADEChallengeData2016/annotations/{training,validation}/*.png   8-bit: 0 = other (ignored), 1..150
    ADEChallengeData2016/objectInfo150.txt

Annotation value v becomes class v - 1 and 0 becomes ignore (255), the "reduce zero label" every
benchmark number on this set uses. ``train``/``val`` are accepted for ``training``/``validation``.
--data-root may be ``ADEChallengeData2016`` itself. Without --data-root the zip is downloaded
(sha1 checked) into ``$PIXELSEG_DATA/ade20k``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import PixelsegError
from .base import CacheArg, DatasetInfo, Sample, decode_samples, paired_mask

# objectInfo150.txt's names (first synonym), in id order 1..150.
CLASS_NAMES = [
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
]


def _palette(n: int) -> list[tuple[int, int, int]]:
    """Distinct, reproducible colours (golden-ratio hue steps); 150 is too many for a named map."""
    import colorsys

    def rgb(i: int) -> tuple[int, int, int]:
        r, g, b = colorsys.hsv_to_rgb(
            (i * 0.618033988749895) % 1.0, 0.65 + 0.35 * (i % 2), 0.55 + 0.45 * ((i // 2) % 2)
        )
        return int(255 * r), int(255 * g), int(255 * b)

    return [rgb(i) for i in range(n)]


INFO = DatasetInfo(name="ade20k", class_names=CLASS_NAMES, palette=_palette(150), ignore_index=255)
SPLITS = {"training": "training", "validation": "validation", "train": "training", "val": "validation"}
DEFAULT_SPLITS = {"train": "training", "val": "validation"}
VALID_VALUES = tuple(range(151))
LABEL_MAP = np.full(256, 255, dtype=np.uint8)
LABEL_MAP[1:151] = np.arange(150)  # 0 ("other") stays 255 = ignore

HOMEPAGE = "http://sceneparsing.csail.mit.edu/"
# sha1 as GluonCV's ade20k downloader gives it (download_file tells sha1 from md5 by length).
URL = (
    "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
    "219e1696abb36c8ba3a3afe7fb2f4b4606a897c7",
)


def _ade_dir(root: Path) -> Path | None:
    for cand in (root / "ADEChallengeData2016", root):
        if (cand / "images").is_dir() and (cand / "annotations").is_dir():
            return cand
    return None


def resolve_root(root: Path | None, download: bool = True) -> Path:
    if root is None:
        from .download import ensure_archives

        ade = _ade_dir(
            ensure_archives(
                "ADE20K SceneParsing",
                "ade20k",
                [URL],
                lambda p: [] if _ade_dir(p) else ["ADEChallengeData2016/images/"],
                HOMEPAGE,
                download,
            )
        )
        assert ade is not None, "ensure_archives returns a complete tree"
        return ade
    root = Path(root)
    if not root.is_dir():
        raise PixelsegError(f"--data-root {root}: directory not found")
    ade = _ade_dir(root)
    if ade is None:
        raise PixelsegError(
            f"--data-root {root}: no ADEChallengeData2016/images/ and annotations/; expected ADE20K "
            "SceneParsing as ADEChallengeData2016.zip extracts, or omit --data-root to download it"
        )
    return ade


def list_samples(ade: Path, split: str) -> list[Sample]:
    if split not in SPLITS:
        raise PixelsegError(f"--split {split!r}: ADE20K has splits training (train) and validation (val)")
    folder = SPLITS[split]
    img_dir, ann_dir = ade / "images" / folder, ade / "annotations" / folder
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise PixelsegError(
                f"{d}: split folder not found; ADEChallengeData2016 must hold images/{folder}/ and "
                f"annotations/{folder}/"
            )
    samples = [Sample(p.stem, p, ann_dir / f"{p.stem}.png") for p in sorted(img_dir.glob("*.jpg"))]
    if not samples:
        raise PixelsegError(f"{img_dir}: no .jpg images in split {folder}")
    missing = [paired_mask(s) for s in samples if not paired_mask(s).is_file()]
    if missing:
        raise PixelsegError(
            f"{missing[0]}: annotation not found ({len(missing)} of {len(samples)} images in {folder} lack one)"
        )
    return samples


def read_target(sample: Sample) -> np.ndarray:
    from .io import read_id_mask

    return read_id_mask(sample.mask, LABEL_MAP, VALID_VALUES, "are outside ADE20K's ids 0..150")


def full_res_samples(root: Path | None, split: str):
    return list_samples(resolve_root(root), split), read_target


def load(
    root: Path | None,
    split: str,
    image_size: tuple[int, int],
    limit: int | None = None,
    use_cache: CacheArg = True,
    download: bool = True,
):
    samples = list_samples(resolve_root(root, download), split)
    if limit:
        samples = samples[:limit]
    return decode_samples(
        samples,
        image_size,
        INFO,
        label_map=LABEL_MAP,
        valid_values=VALID_VALUES,
        use_cache=use_cache,
        desc=f"decoding ade20k {SPLITS[split]}",
    )

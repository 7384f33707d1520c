"""What the annotation-format datasets (coco, cvat, labelstudio, labelme, yolo) share: a parsed export
(pixelseg.labels) -> splits of samples -> build_split, exactly as `--dataset folder` does with its pairs.

Each sample carries its shapes as COCO RLE; `ShapeReader` rasterises them at the image's own size (one
overlap rule, labels/raster.py) and resizes the mask with NEAREST, so the decode cache, `--cache none`
workers, shards and `evaluate --full-res` all see the same masks. Images are read upright as their EXIF
Orientation says, because the tools annotate what a viewer shows (labels/rules.py). Splits: the export's own (Roboflow's
train/valid/test, COCO's instances_<split>, CVAT's subset, sub-folders); where there is no val split,
folder's seeded `--val-fraction` (grouped by `--val-group`) holds one out.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.errors import PixelsegError
from ..core.logs import logger as log
from ..labels.raster import OVERLAP_RULES, LabelSet, rasterize
from .base import CacheArg, DatasetInfo, Sample, build_split, fit_size
from .folder import _fraction_split
from .io import _open, read_image

COMMON_OPTIONS = {"val_fraction": 0.2, "val_group": None, "overlap": "smaller", "skip_bad": False}
DEFAULT_SPLITS = {"train": "train", "val": "val"}
_PARSED: dict = {}


@dataclass
class LabelSample(Sample):
    height: int = 0
    width: int = 0
    shapes: list = field(default_factory=list)
    orientation: int = 1  # EXIF Orientation: != 1 -> the pixels are turned upright before use (labels/rules.py)


def upright_size(s: LabelSample) -> tuple[int, int]:
    """(width, height) of the sample's file as viewers show it."""
    w, h = _open(s.image).size
    return (h, w) if s.orientation in (5, 6, 7, 8) else (w, h)


@dataclass
class ShapeReader:
    """(image, class ids) of one labelled image; a plain dataclass so DataLoader workers can receive it."""

    overlap: str = "smaller"

    def __call__(self, s: LabelSample, size=None, max_side=None):
        isz = upright_size(s)
        if isz != (s.width, s.height):
            raise PixelsegError(
                f"{s.image}: the file is {isz[0]}×{isz[1]} but its annotations ({s.mask}) were "
                f"read for {s.width}×{s.height}; it changed since"
            )
        target = fit_size((s.height, s.width), size, max_side)
        img = read_image(s.image, target, exif_transpose=s.orientation != 1)
        return img, self.target(s, target)

    def target(self, s: LabelSample, size=None) -> np.ndarray:
        mask = rasterize(s.shapes, s.height, s.width, self.overlap)
        if size is not None and tuple(size) != mask.shape:
            mask = np.asarray(Image.fromarray(mask).resize((size[1], size[0]), Image.Resampling.NEAREST))
        return mask


def options(defaults: dict, given: dict) -> dict:
    return {k: (defaults[k] if given.get(k) is None else given[k]) for k in defaults}


def parse(name: str, read, root: Path | None, o: dict) -> LabelSet:
    """The export at `root`, parsed once per process and options; its report logged once."""
    if root is None:
        raise PixelsegError(f"--dataset {name} needs --data-root: the folder of the export (see docs/datasets.md)")
    root = Path(root)
    if not root.exists():
        raise PixelsegError(f"--data-root {root}: not found")
    if o["overlap"] not in OVERLAP_RULES:
        raise PixelsegError(f"--overlap {o['overlap']}: choose one of {', '.join(OVERLAP_RULES)}")
    reader_opts = {k: v for k, v in o.items() if k not in ("val_fraction", "val_group", "overlap")}
    key = (name, str(root.resolve()), tuple(sorted(reader_opts.items())))
    if key not in _PARSED:
        labels = read(root, **reader_opts)
        log.info(report_line(labels, root))
        _PARSED[key] = labels
    return _PARSED[key]


def report_line(labels: LabelSet, root) -> str:
    n = sum(len(it.shapes) for it in labels.items)
    lines = [
        f"{labels.format} dataset {root}: "
        + ", ".join(f"{s} {len(v)}" for s, v in labels.splits().items())
        + f" images, {n} shapes, {len(labels.class_names)} classes ({', '.join(labels.class_names)})"
    ]
    lines += [f"  note: {t}" for t in labels.notes]
    if labels.clipped:
        lines.append(f"  {labels.clipped} shape(s) reach past the image border (clipped)")
    for why, k in labels.dropped.items():
        lines.append(f"  {k} shape(s) left out: {why}")
    if labels.bad:
        lines.append(f"  --skip-bad skipped {len(labels.bad)} damaged item(s), e.g. {labels.bad[0]}")
    return "\n".join(lines)


def splits(labels: LabelSet, o: dict) -> dict[str, list[LabelSample]]:
    out: dict[str, list[LabelSample]] = {}
    for split, items in labels.splits().items():
        out[split] = [
            LabelSample(it.name, it.image, it.source, it.height, it.width, it.shapes, it.orientation) for it in items
        ]
    if "train" not in out and len(out) == 1:  # one unnamed split (CVAT's "default", a single file)
        out = {"train": next(iter(out.values()))}
    if "train" in out and "val" not in out:
        out["train"], out["val"] = _fraction_split(out["train"], float(o["val_fraction"]), o["val_group"])
    return out


def info(name: str, labels: LabelSet) -> DatasetInfo:
    return DatasetInfo(name, list(labels.class_names), list(labels.palette), 255)


def _split(name: str, root, parts: dict, split: str) -> list[LabelSample]:
    if split not in parts:
        raise PixelsegError(f"--split {split}: the {name} export at {root} has splits {', '.join(parts)}")
    return parts[split]


def _signature(labels: LabelSet, o: dict) -> str:
    h = hashlib.sha1(repr(sorted(o.items())).encode())
    for it in labels.items:
        if it.orientation != 1:  # read upright: not the pixels an older cache holds
            h.update(f"{it.name}|exif{it.orientation}".encode())
        for s in it.shapes:
            h.update(s.rle["counts"] if isinstance(s.rle["counts"], bytes) else str(s.rle["counts"]).encode())
            h.update(f"{s.class_id}|{s.z}|{s.order}".encode())
    return h.hexdigest()[:12]


def load(
    name: str, read, defaults: dict, root, split: str, image_size, limit=None, use_cache: CacheArg = True, **given
):
    o = options(defaults, given)
    labels = parse(name, read, root, o)
    samples = _split(name, root, splits(labels, o), split)
    if limit:
        samples = samples[:limit]
    ds = build_split(
        samples,
        ShapeReader(o["overlap"]),
        info(name, labels),
        tuple(image_size),
        use_cache,
        f"{name}|{_signature(labels, o)}",
        f"decoding {split}",
        min(8, max(1, len(samples))),
    )
    if split == "train":  # the export's damaged items, counted once in the run summary
        ds.skipped = list(getattr(ds, "skipped", [])) + list(labels.bad)
    return ds


def dataset_info(name: str, read, defaults: dict, root, **given) -> DatasetInfo:
    o = options(defaults, given)
    return info(name, parse(name, read, root, o))


def full_res_samples(name: str, read, defaults: dict, root, split: str, **given):
    o = options(defaults, given)
    labels = parse(name, read, root, o)
    reader = ShapeReader(o["overlap"])
    return _split(name, root, splits(labels, o), split), reader.target


class AnnotationFormat:
    """One annotation tool's export as a dataset of the registry (data/__init__.py's protocol: INFO,
    DEFAULT_SPLITS, OPTIONS, load, dataset_info, full_res_samples): the five formats differ only in their
    parser (pixelseg/labels/<format>.py) and their own options, so one object per format, not five modules."""

    def __init__(self, name: str, read, doc: str, **options):
        self.NAME, self.read, self.__doc__ = name, read, doc
        self.OPTIONS = {**COMMON_OPTIONS, **options}
        self.DEFAULT_SPLITS = DEFAULT_SPLITS
        self.INFO = DatasetInfo(name, ["background"], [(0, 0, 0)])  # the real classes come from the export

    def load(self, root, split, image_size, limit=None, use_cache: CacheArg = True, **options):
        return load(self.NAME, self.read, self.OPTIONS, root, split, image_size, limit, use_cache, **options)

    def dataset_info(self, root, **options) -> DatasetInfo:
        return dataset_info(self.NAME, self.read, self.OPTIONS, root, **options)

    def full_res_samples(self, root, split, **options):
        return full_res_samples(self.NAME, self.read, self.OPTIONS, root, split, **options)

    def __repr__(self) -> str:
        return f"AnnotationFormat({self.NAME!r})"


def formats() -> dict[str, AnnotationFormat]:
    """--dataset coco|cvat|labelstudio|labelme|yolo."""
    from ..labels import coco, cvat, labelme, labelstudio, yolo

    return {
        "coco": AnnotationFormat(
            "coco",
            coco.read,
            "COCO instances JSON (Roboflow train/valid/test, or annotations/instances_<split>.json + images/)",
            iscrowd="class",
        ),
        "cvat": AnnotationFormat("cvat", cvat.read, "CVAT for images 1.1 XML (annotations.xml + images/)", boxes=False),
        "labelstudio": AnnotationFormat(
            "labelstudio",
            labelstudio.read,
            "Label Studio JSON export (polygonlabels, brushlabels) + images",
            boxes=False,
        ),
        "labelme": AnnotationFormat("labelme", labelme.read, "LabelMe JSON, one per image", boxes=False),
        "yolo": AnnotationFormat("yolo", yolo.read, "YOLO-seg: data.yaml + images/ + labels/*.txt", boxes=False),
    }

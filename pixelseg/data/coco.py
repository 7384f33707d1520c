"""COCO instances JSON (Roboflow train/valid/test or annotations/instances_<split>.json + images/), as a dataset: the parsing is pixelseg.labels.coco, the rest data/labelled.py."""
from __future__ import annotations

from ..labels import coco as fmt
from . import labelled
from .base import DatasetInfo

NAME = "coco"
OPTIONS = {**labelled.COMMON_OPTIONS, "iscrowd": "class"}
DEFAULT_SPLITS = labelled.DEFAULT_SPLITS
INFO = DatasetInfo(NAME, ["background"], [(0, 0, 0)])  # the real classes come from the export: dataset_info


def load(root, split, image_size, limit=None, use_cache=True, **options):
    return labelled.load(NAME, fmt.read, OPTIONS, root, split, image_size, limit, use_cache, **options)


def dataset_info(root, **options) -> DatasetInfo:
    return labelled.dataset_info(NAME, fmt.read, OPTIONS, root, **options)


def full_res_samples(root, split, **options):
    return labelled.full_res_samples(NAME, fmt.read, OPTIONS, root, split, **options)

"""Label Studio JSON export (polygonlabels, brushlabels) + images, as a dataset: the parsing is pixelseg.labels.labelstudio, the rest data/labelled.py."""
from __future__ import annotations

from ..labels import labelstudio as fmt
from . import labelled
from .base import DatasetInfo

NAME = "labelstudio"
OPTIONS = {**labelled.COMMON_OPTIONS, "boxes": False}
DEFAULT_SPLITS = labelled.DEFAULT_SPLITS
INFO = DatasetInfo(NAME, ["background"], [(0, 0, 0)])  # the real classes come from the export: dataset_info


def load(root, split, image_size, limit=None, use_cache=True, **options):
    return labelled.load(NAME, fmt.read, OPTIONS, root, split, image_size, limit, use_cache, **options)


def dataset_info(root, **options) -> DatasetInfo:
    return labelled.dataset_info(NAME, fmt.read, OPTIONS, root, **options)


def full_res_samples(root, split, **options):
    return labelled.full_res_samples(NAME, fmt.read, OPTIONS, root, split, **options)

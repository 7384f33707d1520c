"""Datasets: one name -> loader registry; every loader returns an ArrayDataset with DatasetInfo.

`load_split(dataset, root, split, image_size, ...)` is the single entry point used by train,
evaluate and predict alike.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import PixelsegError
from . import pets, synthetic
from .base import ArrayDataset, DatasetInfo, collate_batch

# name -> module with load(root, split, image_size, limit=..., use_cache=...), INFO, DEFAULT_SPLITS
DATASETS = {
    "oxford-pet": pets,
    "synthetic": synthetic,
}


def get_dataset_module(name: str):
    if name not in DATASETS:
        raise PixelsegError(f"--dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def default_split(name: str, role: str) -> str:
    return get_dataset_module(name).DEFAULT_SPLITS[role]


def load_split(name: str, root: str | Path | None, split: str, image_size, limit: int | None = None,
               use_cache: bool = True, **kwargs) -> ArrayDataset:
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    ds = get_dataset_module(name).load(Path(root) if root else None, split, tuple(image_size), limit=limit,
                                       use_cache=use_cache, **kwargs)
    if len(ds) == 0:
        raise PixelsegError(f"dataset {name} split {split!r} at {root} has no usable samples")
    return ds


__all__ = ["DATASETS", "ArrayDataset", "DatasetInfo", "collate_batch", "load_split", "default_split",
           "get_dataset_module"]

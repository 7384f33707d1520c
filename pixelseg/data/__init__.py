"""Datasets: one name -> loader registry (pets, camvid, voc, ade20k, cityscapes, folder, coco, cvat, labelstudio,
labelme, yolo, synthetic, shards); every loader returns an ArrayDataset with DatasetInfo. Also here: decoding and
the disk cache (base.py, io.py), augmentation, the DataLoader (loader.py), `pixelseg convert` and WebDataset
shards (shards.py reads, shards_write.py writes). Imports core/ and labels/ only.

`load_split(dataset, root, split, image_size, ...)` is the single entry point used by train,
evaluate and predict alike; `iter_full_res` serves the same split at each image's own resolution
(evaluate --full-res).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..core.errors import PixelsegError
from ..core.logs import logger as log
from ..core.sizes import size_hw
from . import ade20k, camvid, cityscapes, folder, labelled, pets, shards, synthetic, voc
from .base import ArrayDataset, CacheArg, DatasetInfo, check_same_size, collate_batch

# name -> dataset module. The protocol every module follows:
#   INFO (DatasetInfo), DEFAULT_SPLITS {"train": ..., "val": ...},
#   load(root, split, image_size, limit=..., use_cache=..., **OPTIONS) -> ArrayDataset;
# and optionally: OPTIONS (dataset-specific keyword options and their defaults),
#   full_res_samples(root, split, **OPTIONS) -> (samples, read_target) for evaluate --full-res,
#   dataset_info(root, **OPTIONS) -> DatasetInfo when the classes come from the data (folder).
DATASETS = {
    "oxford-pet": pets,
    "camvid": camvid,
    "voc": voc,
    "ade20k": ade20k,
    "cityscapes": cityscapes,
    "folder": folder,
    **labelled.formats(),  # coco, cvat, labelstudio, labelme, yolo
    "synthetic": synthetic,
    "shards": shards,
}
# Train-config keys that are dataset options (flags --images-dir, --masks-dir, --val-fraction, --overlap, ...).
DATASET_OPTION_KEYS = tuple(dict.fromkeys(k for m in DATASETS.values() for k in getattr(m, "OPTIONS", {})))


def get_dataset_module(name: str):
    if name not in DATASETS:
        raise PixelsegError(f"--dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def default_split(name: str, role: str) -> str:
    return get_dataset_module(name).DEFAULT_SPLITS[role]


def dataset_options(cfg: dict) -> dict:
    """The dataset options set in a train config (None = the dataset's default)."""
    return {k: cfg[k] for k in DATASET_OPTION_KEYS if cfg.get(k) is not None}


def _check_options(name: str, kwargs: dict) -> dict:
    accepted = getattr(get_dataset_module(name), "OPTIONS", {})
    given = {k: v for k, v in kwargs.items() if v is not None}
    wrong = [k for k in given if k not in accepted]
    if wrong:
        flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
        users = [n for n, m in DATASETS.items() if set(wrong) <= set(getattr(m, "OPTIONS", {}))]
        raise PixelsegError(
            f"{flags}: not an option of --dataset {name}" + (f" (only of {', '.join(users)})" if users else "")
        )
    return given


def _check_channels(name: str, channels: int) -> dict:
    if channels == 3:
        return {}
    if name != "folder":
        raise PixelsegError(
            f"--in-channels {channels}: only --dataset folder reads images with other than 3 channels ({name} is RGB)"
        )
    return {"channels": channels}


def load_split(
    name: str,
    root: str | Path | None,
    split: str,
    image_size,
    limit: int | None = None,
    use_cache: CacheArg = True,
    channels: int = 3,
    **kwargs,
) -> ArrayDataset:
    image_size = size_hw(image_size)
    options = {**_check_options(name, kwargs), **_check_channels(name, channels)}
    if root and name != "shards":  # shard roots may be URLs, which Path would mangle
        root = Path(root)
    ds = get_dataset_module(name).load(
        root or None, split, tuple(image_size), limit=limit, use_cache=use_cache, **options
    )
    if len(ds) == 0:
        raise PixelsegError(f"dataset {name} split {split!r} at {root} has no usable samples")
    return ds


def dataset_info(name: str, root, split: str | None = None, **kwargs) -> DatasetInfo:
    """Class names and palette without decoding a split (a folder dataset's come from its masks, shards'
    from their index)."""
    options = _check_options(name, kwargs)
    if name == "shards":
        return shards.info(root, split or shards.DEFAULT_SPLITS["val"])
    module = get_dataset_module(name)
    if hasattr(module, "dataset_info"):
        return module.dataset_info(Path(root) if root else None, **options)
    return module.INFO


def iter_full_res(
    name: str,
    root,
    split: str,
    image_size,
    limit: int | None = None,
    skipped: list | None = None,
    channels: int = 3,
    **kwargs,
):
    """Yield (name, image uint8 H×W×3, target uint8 H×W class ids) at each file's own resolution.

    One image is decoded ahead on a thread while the caller runs the model; nothing else is held,
    so a split of 4000×3000 photos costs the memory of two. Unreadable images are skipped and
    appended to `skipped`. Datasets without files (synthetic) yield their arrays as they are.
    """
    from .io import UnreadableImage, read_input

    options = _check_options(name, kwargs)
    _check_channels(name, channels)
    module = get_dataset_module(name)
    if name == "shards":
        yield from shards.full_res_iter(root, split, limit, skipped)
        return
    root = Path(root) if root else None
    if hasattr(module, "full_res_samples"):
        samples, read_target = module.full_res_samples(root, split, **options)
    else:
        ds = load_split(name, root, split, image_size, limit, channels=channels, **options)
        for i in range(len(ds)):
            yield ds.names[i], np.asarray(ds.images[i]), np.asarray(ds.masks[i])
        return
    if limit:
        samples = samples[:limit]

    def work(s):
        try:
            img = read_input(s.image, channels, exif_transpose=getattr(s, "orientation", 1) != 1)  # labels/rules.py
        except UnreadableImage as exc:
            return None, None, str(exc)
        target = read_target(s)
        check_same_size(s.mask, s.image.name, img.shape[1::-1], target.shape[1::-1])
        return img, target, None

    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(work, samples[0]) if samples else None
        for i, s in enumerate(samples):
            assert nxt is not None  # submitted for every sample before its turn
            img, target, err = nxt.result()
            nxt = pool.submit(work, samples[i + 1]) if i + 1 < len(samples) else None
            if err is not None:
                log.warning(f"skipping {err}")
                if skipped is not None:
                    skipped.append(str(s.image))
                continue
            yield s.name, img, target


__all__ = [
    "DATASETS",
    "DATASET_OPTION_KEYS",
    "ArrayDataset",
    "DatasetInfo",
    "collate_batch",
    "dataset_info",
    "dataset_options",
    "default_split",
    "get_dataset_module",
    "iter_full_res",
    "load_split",
]

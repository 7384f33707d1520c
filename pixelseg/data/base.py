"""What every dataset produces: decoded uint8 arrays held in memory, plus class metadata.

Decoding JPEGs is the slow part of a small-image pipeline, so datasets decode once (in parallel),
store the resized uint8 arrays in an on-disk cache, and serve whole batches by fancy indexing.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import PixelsegError
from .io import UnreadableImage, read_image, read_mask, _open

CACHE_VERSION = 1


@dataclass
class DatasetInfo:
    name: str
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    ignore_index: int = 255

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict:
        return {"name": self.name, "class_names": list(self.class_names),
                "palette": [list(c) for c in self.palette], "ignore_index": self.ignore_index}

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetInfo":
        return cls(d["name"], list(d["class_names"]), [tuple(c) for c in d["palette"]], d.get("ignore_index", 255))


@dataclass
class Sample:
    name: str
    image: Path
    mask: Path | None


@dataclass
class ArrayDataset(torch.utils.data.Dataset):
    """images N×H×W×3 uint8, masks N×H×W uint8 (or lists of arrays when sizes differ)."""
    images: np.ndarray | list
    masks: np.ndarray | list
    names: list[str]
    info: DatasetInfo
    skipped: list[str] = field(default_factory=list)
    transform: object = None  # callable(image uint8 3×H×W, mask H×W) -> same, applied per sample

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):
        img = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)
        mask = torch.from_numpy(np.ascontiguousarray(self.masks[i])).long()
        if self.transform is not None:
            img, mask = self.transform(img, mask)
        return img, mask

    def __getitems__(self, indices):
        """Whole-batch fetch: one fancy-index instead of N Python calls (DataLoader uses this)."""
        if self.transform is None and isinstance(self.images, np.ndarray):
            idx = np.asarray(indices)
            imgs = torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2)
            masks = torch.from_numpy(self.masks[idx]).long()
            return imgs, masks
        items = [self[i] for i in indices]
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


def collate_batch(batch):
    """DataLoader collate for `__getitems__`, which already returns a batch."""
    return batch


def cache_dir() -> Path:
    if os.environ.get("PIXELSEG_CACHE"):
        return Path(os.environ["PIXELSEG_CACHE"]).expanduser()
    return Path(os.environ.get("PIXELSEG_DATA", "~/.cache/pixelseg")).expanduser() / "cache"


def _cache_key(samples: list[Sample], size, extra: str) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION}|{size}|{extra}".encode())
    for s in samples:
        for p in (s.image, s.mask):
            if p is None:
                continue
            st = p.stat() if p.exists() else None
            h.update(f"{p.resolve()}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}\n".encode())
    return h.hexdigest()[:16]


def decode_samples(samples: list[Sample], size: tuple[int, int], info: DatasetInfo, *, label_map=None,
                   valid_values=None, use_cache: bool = True, workers: int | None = None,
                   desc: str = "decoding") -> ArrayDataset:
    """Decode + resize every sample once (threads: PIL releases the GIL), cached on disk by file+size.

    `label_map`: uint8 lookup table applied to raw mask values (e.g. trimap 1..3 -> 0..2).
    `valid_values`: raw mask values that are allowed; anything else is an error naming the file.
    """
    key = _cache_key(samples, size, f"{info.name}|{None if label_map is None else bytes(label_map).hex()}")
    cdir = cache_dir() / "decoded"
    cfile = cdir / f"{info.name}-{size[0]}x{size[1]}-{key}"
    if use_cache and (cfile / "meta.json").is_file():
        meta = json.loads((cfile / "meta.json").read_text())
        return ArrayDataset(np.load(cfile / "images.npy"), np.load(cfile / "masks.npy"),
                            meta["names"], info, meta["skipped"])

    def work(s: Sample):
        try:
            if s.mask is not None:
                isz, msz = _open(s.image).size, _open(s.mask).size
                if isz != msz:
                    raise PixelsegError(f"{s.mask}: mask is {msz[0]}×{msz[1]} but its image {s.image.name} is "
                                        f"{isz[0]}×{isz[1]}; image and mask must have the same size")
            img = read_image(s.image, size)
        except UnreadableImage as exc:
            return None, None, str(exc)
        mask = read_mask(s.mask, size) if s.mask is not None else np.zeros(size, np.uint8)
        if valid_values is not None:
            bad = np.setdiff1d(np.unique(mask), valid_values)
            if bad.size:
                raise PixelsegError(f"{s.mask}: mask values {bad.tolist()} are outside the expected "
                                    f"{list(valid_values)}; is this the right dataset/annotation folder?")
        if label_map is not None:
            mask = label_map[mask]
        return img, mask, None

    return decode_in_parallel(samples, work, info, cfile if use_cache else None, desc, workers)


def decode_in_parallel(samples, work, info: DatasetInfo, cfile: Path | None, desc: str,
                       workers: int | None = None) -> ArrayDataset:
    """Run `work(sample) -> (image, mask, error)` on a thread pool (PIL releases the GIL), skip and report
    unreadable files, stack the arrays and write the decode cache (when `cfile` is given)."""
    workers = workers or min(8, os.cpu_count() or 1)
    images, masks, names, skipped = [], [], [], []
    with ThreadPoolExecutor(workers) as pool:
        for s, (img, mask, err) in tqdm(zip(samples, pool.map(work, samples)), total=len(samples), desc=desc,
                                        unit="img", leave=False, disable=None):
            if err is not None:
                print(f"warning: skipping {err}", file=sys.stderr)
                skipped.append(str(s.image))
                continue
            images.append(img)
            masks.append(mask)
            names.append(s.name)
    if not names:
        raise PixelsegError(f"no readable images among {len(samples)} listed for {info.name} ({desc})")
    images, masks = np.stack(images), np.stack(masks)
    if cfile is not None:
        _write_cache(cfile, images, masks, {"names": names, "skipped": skipped})
    return ArrayDataset(images, masks, names, info, skipped)


def _write_cache(cfile: Path, images, masks, meta) -> None:
    """Write into a temp dir and rename, so a killed run never leaves a half cache behind."""
    import shutil
    import tempfile
    try:
        cfile.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=cfile.name + ".", dir=cfile.parent))
        np.save(tmp / "images.npy", images)
        np.save(tmp / "masks.npy", masks)
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, cfile)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        print(f"warning: could not write decode cache {cfile} ({exc}); continuing without it", file=sys.stderr)

"""What every dataset produces: decoded uint8 arrays plus class metadata, held one of three ways.

Decoding JPEGs is the slow part of a small-image pipeline, so by default a split is decoded once (in
parallel threads) into an on-disk store of raw uint8 pixels (`--cache mmap`). Reads go through the OS
page cache, which every process on the machine shares, so memory does not grow with the dataset and
torchrun's ranks do not each hold a copy. `--cache memory` keeps today's private in-RAM arrays (no disk
writes); `--cache none` decodes each sample when a DataLoader worker asks for it.

The store is two flat files (images.u8, masks.u8) and meta.json (format version, names, per-sample
shapes). It is written into a temporary directory and renamed into place, under an exclusive file lock:
the first process decodes, the others wait and then read the same files; a half-written store is never
visible under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar, TypeAlias

import numpy as np
import torch
from tqdm import tqdm

from ..core.errors import PixelsegError
from ..core.files import cache_dir
from ..core.logs import logger as log
from ..core.metrics import IGNORE_INDEX
from .io import UnreadableImage, _open, read_image, read_mask

CACHE_VERSION = 2  # meta.json "version"; a store of another version is decoded again and replaced
CACHE_MODES = ("mmap", "memory", "none")

# A per-sample training transform: (image uint8 3×H×W, mask H×W) -> the same pair, transformed.
Transform: TypeAlias = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class DatasetInfo:
    name: str
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    ignore_index: int = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "class_names": list(self.class_names),
            "palette": [list(c) for c in self.palette],
            "ignore_index": self.ignore_index,
        }

    @classmethod
    def from_dict(cls, d: dict) -> DatasetInfo:
        return cls(d["name"], list(d["class_names"]), [tuple(c) for c in d["palette"]], d.get("ignore_index", 255))


@dataclass
class Sample:
    name: str
    image: Path
    mask: Path | None


def paired_mask(s: Sample) -> Path:
    """The mask of a sample of a dataset that lists image/mask pairs (every such sample has one)."""
    assert s.mask is not None, f"{s.image}: listed as a pair but has no mask"
    return s.mask


@dataclass
class CacheSpec:
    """How a split is held: `mode` (mmap | memory | none) and at which resolution. `full_res` keeps each
    image's source size (capped so the longer side is at most `max_side`) for random scale + crop in
    the training transform; otherwise every sample is resized to the requested image size."""

    mode: str = "mmap"
    full_res: bool = False
    max_side: int | None = None

    def __post_init__(self):
        if self.mode not in CACHE_MODES:
            raise PixelsegError(f"--cache {self.mode}: choose one of {', '.join(CACHE_MODES)}")

    def __bool__(self) -> bool:  # truthy where small side caches (folder mask scan) may be written
        return self.mode != "memory"


# What the loaders' `use_cache` takes: True/False (mmap / memory), None (mmap), a mode name, or a CacheSpec.
CacheArg: TypeAlias = bool | str | CacheSpec | None


def cache_spec(use_cache: CacheArg) -> CacheSpec:
    """True/False (mmap / memory: what the loaders' use_cache means), a mode name, or a CacheSpec."""
    if isinstance(use_cache, CacheSpec):
        return use_cache
    if use_cache is None or use_cache is True:
        return CacheSpec("mmap")
    if use_cache is False:
        return CacheSpec("memory")
    return CacheSpec(str(use_cache).lower())


# ---- the on-disk store ----------------------------------------------------------------------------
def _pread_into(fd: int, arr: np.ndarray, offset: int, path: Path) -> None:
    n = os.preadv(fd, [arr], offset)  # type: ignore[list-item]  # numpy's stub gives ndarray __buffer__ only on 3.12+
    if n != arr.nbytes:
        raise PixelsegError(
            f"{path}: decode cache is shorter than its meta.json says (changed while in use?); "
            "delete the directory and run again"
        )


class DiskStore:
    """Raw uint8 pixels of N samples. Reads use pread into fresh buffers rather than a mapping: bytes come
    from the shared page cache and only the batch being built counts in the process's RSS (mapped pages
    that were touched would count in every process until evicted)."""

    def __init__(self, root: Path, shapes: np.ndarray):
        self.root = Path(root)
        self.shapes = np.asarray(shapes, np.int64).reshape(-1, 2)
        px = self.shapes[:, 0] * self.shapes[:, 1]
        self.mask_off = np.concatenate([[0], np.cumsum(px)]).astype(np.int64)
        self.fixed = bool((self.shapes == self.shapes[0]).all())
        self._fds: tuple | None = None

    def __len__(self) -> int:
        return len(self.shapes)

    def path(self, which: str) -> Path:
        return self.root / f"{which}.u8"

    def expected_bytes(self, which: str) -> int:
        return int(self.mask_off[-1]) * (3 if which == "images" else 1)

    def _fd(self, which: str) -> int:
        if self._fds is None or self._fds[0] != os.getpid():  # a forked DataLoader worker opens its own
            self._fds = (
                os.getpid(),
                os.open(self.path("images"), os.O_RDONLY),
                os.open(self.path("masks"), os.O_RDONLY),
            )
        return self._fds[1] if which == "images" else self._fds[2]

    def _shape(self, which: str, i: int) -> tuple:
        h, w = (int(v) for v in self.shapes[i])
        return (h, w, 3) if which == "images" else (h, w)

    def _offset(self, which: str, i: int) -> int:
        return int(self.mask_off[i]) * (3 if which == "images" else 1)

    def read(self, which: str, i: int) -> np.ndarray:
        out = np.empty(self._shape(which, i), np.uint8)
        _pread_into(self._fd(which), out, self._offset(which, i), self.path(which))
        return out

    def read_batch(self, which: str, indices) -> np.ndarray:
        """Fixed-size stores: one N×... array filled by one pread per sample (no Python-level stacking)."""
        out = np.empty((len(indices), *self._shape(which, 0)), np.uint8)
        fd = self._fd(which)
        for j, i in enumerate(indices):
            _pread_into(fd, out[j], self._offset(which, int(i)), self.path(which))
        return out

    def arrays(self, which: str):
        """Whole-split view: a read-only np.memmap for fixed-size stores (array code keeps working), else a
        lazy sequence of per-sample arrays."""
        if self.fixed:
            return np.memmap(self.path(which), np.uint8, "r", shape=(len(self), *self._shape(which, 0)))
        return _LazySamples(self, which)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"] = None
        return state

    def __del__(self):
        if self._fds is not None and self._fds[0] == os.getpid():
            for fd in self._fds[1:]:
                with contextlib.suppress(OSError):
                    os.close(fd)


class _LazySamples:
    """Sequence of variable-size arrays read from a DiskStore on access."""

    def __init__(self, store: DiskStore, which: str):
        self.store, self.which = store, which

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.store.read(self.which, int(i) % len(self))

    def __iter__(self):
        return (self[i] for i in range(len(self)))


# ---- datasets -------------------------------------------------------------------------------------
@dataclass
class ArrayDataset(torch.utils.data.Dataset):
    """images N×H×W×3 uint8, masks N×H×W uint8 (or sequences of arrays when sizes differ); with `store`
    the arrays live in the on-disk decode cache and batches are read from it."""

    images: np.ndarray | list
    masks: np.ndarray | list
    names: list[str]
    info: DatasetInfo
    skipped: list[str] = field(default_factory=list)
    transform: Transform | None = None  # applied per sample
    store: DiskStore | None = None
    full_res: bool = False  # samples keep their source sizes: a transform must crop/resize them
    streamed: ClassVar[bool] = False  # data.protocol.SplitDataset
    reads_files: ClassVar[bool] = False

    def __len__(self) -> int:
        return len(self.names)

    def open_skip_channel(self) -> None:  # decoded up front: nothing is read in workers
        pass

    def collect_skipped(self) -> list[str]:
        return self.skipped

    def read_sample(self, i):
        return self[i]

    def _arrays(self, i):
        if self.store is not None:
            return self.store.read("images", i), self.store.read("masks", i)
        return np.ascontiguousarray(self.images[i]), np.ascontiguousarray(self.masks[i])

    def __getitem__(self, i):
        img, mask = self._arrays(int(i))
        img = torch.from_numpy(img).permute(2, 0, 1)
        mask = torch.from_numpy(mask).long()
        if self.transform is not None:
            img, mask = self.transform(img, mask)
        return img, mask

    def __getitems__(self, indices):
        """Whole-batch fetch: one read per sample straight into the batch array instead of N Python calls
        (DataLoader uses this)."""
        if self.transform is None:
            if self.store is not None and self.store.fixed:
                return (
                    torch.from_numpy(self.store.read_batch("images", indices)).permute(0, 3, 1, 2),
                    torch.from_numpy(self.store.read_batch("masks", indices)).long(),
                )
            if self.store is None and isinstance(self.images, np.ndarray):
                idx = np.asarray(indices)
                return torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2), torch.from_numpy(self.masks[idx]).long()
        items = [self[i] for i in indices]
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

    def iter_masks(self):
        """Every mask once, one at a time (class statistics without holding the split)."""
        for i in range(len(self)):
            yield self.store.read("masks", i) if self.store is not None else np.asarray(self.masks[i])

    def __getstate__(self):  # DataLoader workers reopen the store instead of receiving a pickled memmap
        state = dict(self.__dict__)
        if self.store is not None:
            state["images"] = state["masks"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.store is not None:
            self.images, self.masks = self.store.arrays("images"), self.store.arrays("masks")


class SkipReport:
    """Names of unreadable samples. Those met inside DataLoader workers (`--cache none`, shards) would stay
    in the workers' copies of the dataset: `open_skip_channel()` (before the loader starts its workers)
    gives them a multiprocessing Manager list to report through, and `collect_skipped()` reads it back.
    A Manager rather than a Queue: a pipe nobody drains until the end would block a worker once full."""

    skipped: list[str]  # set by the subclass
    _skip_channel: Any = None  # a Manager list proxy once opened

    def open_skip_channel(self) -> None:
        if self._skip_channel is None:
            import multiprocessing

            self._skip_manager = multiprocessing.Manager()
            self._skip_channel = self._skip_manager.list()

    def _skip(self, name: str) -> bool:
        """Record `name`; False when this process already had it (warn once per file)."""
        if name in self.skipped:
            return False
        self.skipped.append(name)
        if self._skip_channel is not None and torch.utils.data.get_worker_info() is not None:
            with contextlib.suppress(Exception):  # the main process is gone (shutdown): nothing to tell
                self._skip_channel.append(name)
        return True

    def collect_skipped(self) -> list[str]:
        """Every sample skipped so far, in this process or its DataLoader workers, each once."""
        if self._skip_channel is not None:
            for name in list(self._skip_channel):
                if name not in self.skipped:
                    self.skipped.append(name)
        return self.skipped

    def __getstate__(self):  # the Manager itself stays in the main process; workers get the list proxy
        state = dict(self.__dict__)
        state.pop("_skip_manager", None)
        return state


class FileDataset(SkipReport, torch.utils.data.Dataset):
    """`--cache none`: nothing is decoded up front; each sample is read from its files when a DataLoader
    worker asks for it (same reader, same resize, so the same arrays as the cached modes). Unreadable
    files are skipped from their batch, reported by the process that meets them, and counted there."""

    streamed, reads_files = False, True  # data.protocol.SplitDataset

    def __init__(self, samples: Sequence[Sample], reader, info: DatasetInfo, size, max_side=None, full_res=False):
        self.samples, self.reader, self.info = list(samples), reader, info
        self.size, self.max_side, self.full_res = size, max_side, full_res
        self.names = [s.name for s in self.samples]
        self.skipped: list[str] = []
        self.transform: Transform | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def read_sample(self, i):
        """The sample, or None when its files are unreadable (reported)."""
        s = self.samples[int(i)]
        try:
            img, mask = self.reader(s, self.size, self.max_side)
        except UnreadableImage as exc:
            if self._skip(str(s.image)):
                log.warning(f"skipping {exc}")
            return None
        img = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
        mask = torch.from_numpy(np.ascontiguousarray(mask)).long()
        return self.transform(img, mask) if self.transform is not None else (img, mask)

    def __getitem__(self, i):
        item = self.read_sample(i)
        if item is None:
            raise PixelsegError(f"{self.samples[int(i)].image}: unreadable (see the warning above)")
        return item

    def __getitems__(self, indices):
        items = [it for it in (self.read_sample(i) for i in indices) if it is not None]
        if not items:
            first = ", ".join(str(self.samples[i].image) for i in indices[:3])
            raise PixelsegError(f"every file of a batch is unreadable ({first} ...)")
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

    @property
    def masks(self):
        """Lazy per-sample masks (read from the files on access), for code that samples a few of them."""
        return _LazyFileMasks(self)

    def iter_masks(self):
        for s in self.samples:
            with contextlib.suppress(UnreadableImage):
                yield self.reader(s, self.size, self.max_side)[1]


class _LazyFileMasks:
    def __init__(self, ds: FileDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        try:
            return self.ds.reader(self.ds.samples[int(i)], self.ds.size, self.ds.max_side)[1]
        except UnreadableImage:
            return np.zeros((1, 1), np.uint8)


def collate_batch(batch):
    """DataLoader collate for `__getitems__`, which already returns a batch."""
    return batch


# ---- reading one sample ---------------------------------------------------------------------------
def check_same_size(mask, image_name: str | None, image_wh: tuple[int, int], mask_wh: tuple[int, int]) -> None:
    """The one image/mask size check (file readers, shards; sizes as (width, height)): a one-line error naming
    the mask (``image_name`` None: the pair has one name, e.g. a shard sample)."""
    if tuple(image_wh) != tuple(mask_wh):
        image = f"its image {image_name}" if image_name is not None else "the image"
        raise PixelsegError(
            f"{mask}: mask is {mask_wh[0]}×{mask_wh[1]} but {image} is "
            f"{image_wh[0]}×{image_wh[1]}; image and mask must have the same size"
        )


def fit_size(hw: tuple[int, int], size, max_side: int | None):
    """Target (h, w): `size` when given; else the source size `hw` scaled down to `max_side` (None: as is)."""
    if size is not None:
        return tuple(int(v) for v in size)
    h, w = hw
    if max_side and max(h, w) > max_side:
        s = max_side / max(h, w)
        return max(1, round(h * s)), max(1, round(w * s))
    return None


@dataclass
class LabelReader:
    """(image, class-id mask) of one sample for datasets whose masks are index images (pets, CamVid, ...).

    `label_map`: uint8 lookup table applied to raw mask values (e.g. trimap 1..3 -> 0..2).
    `valid_values`: raw mask values that are allowed; anything else is an error naming the file.
    A plain dataclass so that DataLoader workers can receive it (`--cache none`)."""

    label_map: np.ndarray | None = None
    valid_values: tuple | None = None

    def __call__(self, s: Sample, size=None, max_side=None):
        isz = _open(s.image).size
        if s.mask is not None:
            check_same_size(s.mask, s.image.name, isz, _open(s.mask).size)
        target = fit_size((isz[1], isz[0]), size, max_side)
        img = read_image(s.image, target)
        mask = read_mask(s.mask, target) if s.mask is not None else np.zeros(img.shape[:2], np.uint8)
        if self.valid_values is not None:
            bad = np.setdiff1d(np.unique(mask), self.valid_values)
            if bad.size:
                raise PixelsegError(
                    f"{s.mask}: mask values {bad.tolist()} are outside the expected "
                    f"{list(self.valid_values)}; is this the right dataset/annotation folder?"
                )
        if self.label_map is not None:
            mask = self.label_map[mask]
        return img, mask


class _Work:
    """reader + resolution -> the (image, mask, error) triple the parallel decoder consumes."""

    def __init__(self, reader, size, max_side):
        self.reader, self.size, self.max_side = reader, size, max_side

    def __call__(self, s: Sample):
        try:
            img, mask = self.reader(s, self.size, self.max_side)
        except UnreadableImage as exc:
            return None, None, str(exc)
        return img, mask, None


# ---- building a split ----------------------------------------------------------------------------
def _cache_key(samples: Sequence[Sample], size, extra: str) -> str:
    """Files (path, size, mtime) + resolution + dataset extras. The format version is not in the key:
    it is checked in meta.json so that an old store is reported and replaced, not silently kept."""
    h = hashlib.sha1(f"{size}|{extra}".encode())
    for s in samples:
        for p in (s.image, s.mask):
            if p is None:
                continue
            st = p.stat() if p.exists() else None
            h.update(f"{p.resolve()}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}\n".encode())
    return h.hexdigest()[:16]


def build_split(
    samples: Sequence[Sample],
    reader,
    info: DatasetInfo,
    size,
    use_cache: CacheArg = True,
    key_extra: str = "",
    desc: str = "decoding",
    workers: int | None = None,
):
    """The one path every file-backed dataset goes through: `reader(sample, size, max_side) -> (image,
    mask)` (raising UnreadableImage to skip a file), held as `use_cache` says (see CacheSpec)."""
    spec = cache_spec(use_cache)
    target = None if spec.full_res else tuple(int(v) for v in size)
    max_side = spec.max_side if spec.full_res else None
    if spec.mode == "none":
        return FileDataset(samples, reader, info, target, max_side, full_res=spec.full_res)
    work = _Work(reader, target, max_side)
    if spec.mode == "memory":
        return decode_in_parallel(samples, work, info, None, desc, workers, full_res=spec.full_res)
    res = f"{target[0]}x{target[1]}" if target else f"full{max_side or ''}"
    cfile = cache_dir() / "decoded" / f"{info.name}-{res}-{_cache_key(samples, res, f'{info.name}|{key_extra}')}"
    try:
        return cached_split(samples, work, info, cfile, desc, workers, full_res=spec.full_res)
    except CacheWriteError as exc:
        log.warning(f"{exc}; reading the files on the fly instead (--cache none)")
        return FileDataset(samples, reader, info, target, max_side, full_res=spec.full_res)


def decode_samples(
    samples: Sequence[Sample],
    size: tuple[int, int],
    info: DatasetInfo,
    *,
    label_map=None,
    valid_values=None,
    use_cache: CacheArg = True,
    workers: int | None = None,
    desc: str = "decoding",
):
    """Index-mask datasets (pets, CamVid, ...): decode every sample once, held as `use_cache` says."""
    extra = "" if label_map is None else bytes(label_map).hex()
    return build_split(samples, LabelReader(label_map, valid_values), info, size, use_cache, extra, desc, workers)


def _parallel(samples, work, workers: int, desc: str):
    """(sample, work(sample)) in order, on threads (PIL releases the GIL), with a bounded number in
    flight so that decoding a large split never holds more than a few dozen decoded images."""
    with ThreadPoolExecutor(workers) as pool:
        it = iter(samples)
        pending = deque((s, pool.submit(work, s)) for s in islice(it, 4 * workers))
        with tqdm(total=len(samples), desc=desc, unit="img", leave=False, disable=None) as bar:
            while pending:
                s, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(work, nxt)))
                result = fut.result()
                bar.update(1)
                yield s, result


def decode_in_parallel(
    samples, work, info: DatasetInfo, cfile: Path | None, desc: str, workers: int | None = None, full_res: bool = False
):
    """Run `work(sample) -> (image, mask, error)` on a thread pool, skip and report unreadable files.
    With `cfile` the result goes to the on-disk store (see cached_split), else into memory."""
    if cfile is not None:
        return cached_split(samples, work, info, cfile, desc, workers, full_res)
    workers = workers or min(8, os.cpu_count() or 1)
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    names: list[str] = []
    skipped: list[str] = []
    for s, (img, mask, err) in _parallel(samples, work, workers, desc):
        if err is not None:
            log.warning(f"skipping {err}")
            skipped.append(str(s.image))
            continue
        images.append(img)
        masks.append(mask)
        names.append(s.name)
    if not names:
        raise PixelsegError(f"no readable images among {len(samples)} listed for {info.name} ({desc})")
    if len({a.shape for a in images}) == 1:
        return ArrayDataset(np.stack(images), np.stack(masks), names, info, skipped, full_res=full_res)
    return ArrayDataset(images, masks, names, info, skipped, full_res=full_res)


class CacheWriteError(PixelsegError):
    """The decode cache cannot be written (read-only or full disk, ...)."""


_STALE = object()


def _open_cache(cfile: Path, info: DatasetInfo, full_res: bool):
    """The complete store at `cfile`, None when there is none, _STALE when one is there but unusable
    (other format version, damaged): that one is reported in one line and replaced."""
    meta_path = cfile / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        version = meta.get("version", 1) if isinstance(meta, dict) else None
    except (OSError, ValueError):
        version, meta = None, None
    if version != CACHE_VERSION:
        log.warning(
            f"decode cache {cfile} was written by an older pixelseg (cache format "
            f"{version if version is not None else 'unreadable'}, this version reads {CACHE_VERSION}); decoding "
            "again and replacing it"
        )
        return _STALE
    store = DiskStore(cfile, np.asarray(meta["shapes"], np.int64))
    for which in ("images", "masks"):
        p = store.path(which)
        got = p.stat().st_size if p.is_file() else -1
        if got != store.expected_bytes(which):
            log.warning(
                f"decode cache {p} holds {got} bytes, its meta.json says {store.expected_bytes(which)} "
                "(damaged or edited); decoding again and replacing it"
            )
            return _STALE
    return ArrayDataset(
        store.arrays("images"),
        store.arrays("masks"),
        list(meta["names"]),
        info,
        list(meta["skipped"]),
        store=store,
        full_res=full_res,
    )


@contextlib.contextmanager
def _exclusive(lock_path: Path, what: str):
    """flock on `lock_path`: one process per machine (and per shared filesystem where flock works there,
    e.g. NFSv4) decodes; the others wait here and then read its result."""
    import fcntl

    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise CacheWriteError(
            f"cannot write the decode cache in {lock_path.parent} ({exc.strerror}); set "
            "PIXELSEG_CACHE to a writable disk with free space, or pass --cache none"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning(f"waiting for another process that is decoding {what} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def cached_split(
    samples, work, info: DatasetInfo, cfile: Path, desc: str, workers: int | None = None, full_res: bool = False
) -> ArrayDataset:
    found = _open_cache(cfile, info, full_res)
    if isinstance(found, ArrayDataset):
        return found
    with _exclusive(cfile.parent / f"{cfile.name}.lock", cfile.name):
        found = _open_cache(cfile, info, full_res)  # finished by another process while we waited
        if isinstance(found, ArrayDataset):
            return found
        _decode_to_store(
            samples,
            work,
            info,
            cfile,
            desc,
            workers or min(8, os.cpu_count() or 1),
            replace=found is _STALE or cfile.exists(),
        )  # no meta.json: not a store of ours
    found = _open_cache(cfile, info, full_res)
    if not isinstance(found, ArrayDataset):
        raise CacheWriteError(f"decode cache {cfile} could not be read back after writing it")
    return found


def _decode_to_store(samples, work, info: DatasetInfo, cfile: Path, desc: str, workers: int, replace: bool):
    """Stream decoded samples into a temporary directory (memory stays flat), then rename it into place."""

    def fail(exc: OSError, where: Path):
        hint = (
            "the disk is full"
            if exc.errno == errno.ENOSPC
            else "the directory is read-only"
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
            else exc.strerror
        )
        return CacheWriteError(
            f"cannot write the decode cache at {where} ({hint}); set PIXELSEG_CACHE to a "
            "writable disk with free space, or pass --cache none"
        )

    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{cfile.name}.tmp-", dir=cfile.parent))
    except OSError as exc:
        raise fail(exc, cfile.parent) from None
    names, skipped, shapes = [], [], []
    try:
        with open(tmp / "images.u8", "wb") as fi, open(tmp / "masks.u8", "wb") as fm:
            for s, (img, mask, err) in _parallel(samples, work, workers, desc):
                if err is not None:
                    log.warning(f"skipping {err}")
                    skipped.append(str(s.image))
                    continue
                try:
                    fi.write(np.ascontiguousarray(img, np.uint8).data)
                    fm.write(np.ascontiguousarray(mask, np.uint8).data)
                except OSError as exc:
                    raise fail(exc, tmp) from None
                names.append(s.name)
                shapes.append(img.shape[:2])
        if not names:
            raise PixelsegError(f"no readable images among {len(samples)} listed for {info.name} ({desc})")
        meta = {
            "version": CACHE_VERSION,
            "dataset": info.name,
            "names": names,
            "skipped": skipped,
            "shapes": [list(map(int, hw)) for hw in shapes],
        }
        (tmp / "meta.json").write_text(json.dumps(meta))  # written last: a store without it is incomplete
        if replace and cfile.exists():
            old = cfile.with_name(f"{cfile.name}.old-{os.getpid()}")
            os.rename(cfile, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, cfile)
        except OSError:
            if not (cfile / "meta.json").is_file():  # not another writer's finished store: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another machine on the shared filesystem won the race
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise fail(exc, tmp) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

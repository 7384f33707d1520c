"""Streaming shards in the WebDataset format: `pixelseg shards` writes them, `--dataset shards` reads them.

Why WebDataset (over LitData and MosaicML Streaming): its shards are plain POSIX tar files that any tool
can list, write or repair, they stream sequentially from a local disk, `http(s)://`, `pipe:` (s3, gs via
their CLIs) with no index server or custom binary format, and the package is a small pure-Python
dependency already used across PyTorch projects. LitData and Streaming bring their own chunk formats and
cloud/caching runtimes, which pixelseg would have to wrap without needing.

Layout written by `pixelseg shards`:

    OUT/<split>-000000.tar ...   samples: <key>.img.<jpg|png|...> (the source file's bytes, untouched),
                                 <key>.seg.png (class ids after the dataset's label mapping, 8-bit grey),
                                 <key>.name.txt (the sample's name); keys are the sample's position
    OUT/<split>.json             {"format": "pixelseg-shards", "version", "info": classes and palette,
                                  "count", "shards": [{"url": file name, "count"}]}

`--data-root` is the directory or URL that holds them; a brace pattern picks shards explicitly
(`https://host/pets/trainval-{000000..000003}.tar`, the `{split}` token is replaced by the split name);
the index next to them supplies classes and counts.

Splitting across ranks and DataLoader workers (every sample exactly once per epoch): shards go to
ranks round-robin (each rank reads only its shards) when there are at least as many shards as ranks,
else every rank reads every shard and keeps samples i % world == rank; inside a rank, sample j goes to
worker j % workers. For training, every rank yields the same number of batches (sizes differ by at most
one sample), so DDP ranks stay in step without padding or duplicate samples (the one exception: a batch
size of 1 per rank with a sample count that does not divide by the ranks, see ShardDataset).
"""

from __future__ import annotations

import io
import json
import random

import numpy as np
import torch

from ..core.errors import PixelsegError
from ..core.logs import logger as log
from . import remote
from .base import DatasetInfo, SkipReport, Transform, check_same_size, fit_size
from .io import UnreadableImage, read_image, read_mask

INDEX_FORMAT = "pixelseg-shards"
INDEX_VERSION = 2  # 2: every shard starts with a __info__ record (its classes)
INFO_KEY = "__info__"
DEFAULT_SPLITS = {"train": "train", "val": "val"}
SHUFFLE_BUFFER = 128  # encoded samples per worker (bytes, not decoded pixels: memory stays small)


def _classes(names) -> str:
    names = list(names)
    return ", ".join(names[:4]) + (f", ... {len(names)} in all" if len(names) > 4 else "")


def _writable(a: np.ndarray) -> np.ndarray:
    return a if a.flags.writeable else a.copy()


# ---- reading --------------------------------------------------------------------------------------
def _is_pattern(root: str) -> bool:
    return any(c in root for c in "{}") or root.endswith(".tar")


def _join(base: str, name: str) -> str:
    return name if "://" in name or name.startswith(("/", "pipe:")) else base.rstrip("/") + "/" + name


def _read_text(url: str) -> str:
    import webdataset as wds

    if remote.is_s3(url):
        return remote.read_bytes(url).decode("utf-8")
    try:
        with wds.gopen(url, "rb") as f:
            return f.read().decode("utf-8")
    except Exception as exc:  # gopen raises many kinds (OSError, IOError from pipes, HTTP errors)
        raise PixelsegError(
            f"{url}: cannot read the shard index ({exc}); write shards with `pixelseg shards "
            "--out DIR` and pass that DIR (or URL) as --data-root"
        ) from None


def _read_index_text(base: str, index_url: str) -> str:
    """The index's text; under an s3:// prefix without one, say whether the prefix holds shards at all."""
    if not remote.is_s3(index_url):
        return _read_text(index_url)
    try:
        return _read_text(index_url)
    except PixelsegError as exc:
        if not str(exc).endswith(": not found"):
            raise
    tars = [u for u in remote.listing(base) if u.endswith(".tar")]
    what = f"{len(tars)} .tar object(s) but no {index_url.rsplit('/', 1)[-1]}" if tars else "no shards"
    raise PixelsegError(
        f"{base.rstrip('/')}/: {what}; write shards there with `pixelseg shards --out "
        f"{base.rstrip('/')}/` (the index names the split's shards)"
    )


def read_index(root, split: str) -> tuple[dict, list[str], list[int]]:
    """(index, shard urls, their sample counts) for `split` at `root` (directory, URL or brace pattern)."""
    import braceexpand

    root = str(root)
    if _is_pattern(root):
        pattern = root.replace("{split}", split)
        base = pattern.rsplit("/", 1)[0] if "/" in pattern else "."
        urls = list(braceexpand.braceexpand(pattern))
    else:
        base, urls = root, None
    index_url = _join(base, f"{split}.json")
    try:
        index = json.loads(_read_index_text(base, index_url))
    except ValueError:
        raise PixelsegError(f"{index_url}: not a pixelseg shard index (invalid JSON)") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise PixelsegError(f"{index_url}: not a pixelseg shard index; write shards with `pixelseg shards`")
    if index.get("version", 0) > INDEX_VERSION:
        raise PixelsegError(
            f"{index_url}: shard index version {index['version']} is newer than this pixelseg "
            f"reads ({INDEX_VERSION}); upgrade pixelseg"
        )
    counts = {_join(base, s["url"]): int(s["count"]) for s in index["shards"]}
    if urls is None:
        urls = list(counts)
    missing = [u for u in urls if u not in counts]
    if missing:
        raise PixelsegError(
            f"{missing[0]}: not listed in {index_url}; the pattern must name shards of split "
            f"{split!r} written by `pixelseg shards`"
        )
    return index, urls, [counts[u] for u in urls]


def _rank_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank `rank`'s stretch [lo, hi) of the epoch's sample stream: contiguous, so a rank reads only the
    shards that overlap it (about 1/world of the bytes), and sizes differ by at most one sample."""
    return rank * n // world, (rank + 1) * n // world


def _open_shard(url: str, errors: list) -> list[dict]:
    """[{"url", "stream"}] for webdataset's tar reader, or [] with the error recorded (missing shard)."""
    import webdataset as wds

    try:
        return [{"url": url, "stream": remote.open_read(url) if remote.is_s3(url) else wds.gopen(url, "rb")}]
    except PixelsegError:
        raise  # s3fs missing: not a per-shard problem
    except Exception as exc:
        errors.append(exc)
        return []


def _cause(exc) -> str:
    return "not found" if isinstance(exc, FileNotFoundError) else remote.cause(exc)


class ShardDataset(SkipReport, torch.utils.data.IterableDataset):
    """Batches streamed from WebDataset shards; each worker decodes only its own samples.

    Batch policy (the folder path's, so that both give the same optimiser steps and batch sizes): every
    rank plans ceil(n / world) samples in batches of `batch_size` with a partial last batch, as
    DistributedSampler + DataLoader(drop_last=False) do; a rank that holds one sample fewer makes its last
    batch one smaller (DistributedSampler would repeat a sample there), or the one before it when the last
    holds a single sample, so no sample is read twice. Only at a batch size of 1 per rank, where the short
    rank has fewer samples than the others have steps, does it repeat one sample. Batch b goes to DataLoader
    worker b % workers, the order in which the DataLoader takes batches from its workers, so the batch
    sequence does not depend on the worker count.
    """

    streamed, reads_files = True, True  # data.protocol.SplitDataset

    def __init__(
        self,
        urls: list[str],
        counts: list[int],
        info: DatasetInfo,
        size,
        batch_size: int = 1,
        full_res: bool = False,
        max_side: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        even: bool = False,
        limit: int | None = None,
    ):
        self.urls, self.counts, self.info = list(urls), list(counts), info
        self.size, self.full_res, self.max_side = size, full_res, max_side
        self.batch_size, self.shuffle, self.seed, self.rank, self.world = batch_size, shuffle, seed, rank, world
        self.even, self.limit = even, limit
        self.transform: Transform | None = None
        self.num_workers = 0  # set by whoever builds the DataLoader
        # shared memory: persistent DataLoader workers see set_epoch() without being re-created
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.skipped: list[str] = []
        self.names: list[str] = []

    def configure(
        self, batch_size: int, num_workers: int, rank: int, world: int, shuffle: bool, even: bool, seed: int = 0
    ):
        self.batch_size, self.num_workers, self.rank, self.world = batch_size, num_workers, rank, world
        self.shuffle, self.even, self.seed = shuffle, even, seed
        if self.even and self._total() < world:
            raise PixelsegError(
                f"{self.urls[0]}: {self._total()} training samples for {world} processes; "
                "every process needs at least one"
            )
        return self

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def _counts(self) -> list[int]:
        """Samples per shard after --limit (the split's first `limit` samples, as for folders)."""
        if not self.limit:
            return list(self.counts)
        left, out = self.limit, []
        for c in self.counts:
            out.append(min(c, left))
            left -= out[-1]
        return out

    def _total(self) -> int:
        return sum(self._counts())

    def __len__(self) -> int:  # samples in the whole split (as len() of the map-style datasets)
        return self._total()

    def batch_sizes(self, rank: int | None = None) -> list[int]:
        """This rank's batch sizes for one epoch, in order (see the class docstring)."""
        rank = self.rank if rank is None else rank
        n, b = self._total(), self.batch_size
        lo, hi = _rank_range(n, rank, self.world)
        m = hi - lo
        if not self.even:
            return [min(b, m - i) for i in range(0, m, b)]
        target = -(-n // self.world)
        steps = -(-target // b)
        sizes = [b] * (steps - 1) + [target - (steps - 1) * b]
        if m < target:  # one sample short: one batch one smaller, never an empty or a padded one
            if sizes[-1] > 1:
                sizes[-1] -= 1
            elif len(sizes) > 1 and b > 1:  # the last batch holds one sample: the one before it shrinks
                sizes[-2] -= 1
        return sizes

    def num_batches(self) -> int:
        """Batches this rank's DataLoader yields per epoch (the same on every rank when training)."""
        return len(self.batch_sizes())

    # -- the stream --
    def _records(self, rank: int):
        """(rank-local position, shard url, raw sample dict) of this rank's stretch, in epoch order."""
        import webdataset as wds

        counts = self._counts()
        shard_ids = [i for i, c in enumerate(counts) if c > 0]
        if self.shuffle:  # one order for all ranks: their stretches must tile the same stream
            random.Random(hash((self.seed, self.epoch)) % 2**32).shuffle(shard_ids)
        lo, hi = _rank_range(sum(counts), rank, self.world)
        start = 0
        for sid in shard_ids:
            first, start = start, start + counts[sid]
            if start <= lo or first >= hi:  # no sample of this rank: not read at all
                continue
            url = self.urls[sid]
            errors: list[Exception | str] = []

            def handler(exc, errors=errors):
                errors.append(exc)
                return False  # stop this shard; it is reported below

            stream = _open_shard(url, errors)
            try:
                files = wds.tariterators.tar_file_expander(stream, handler=handler)
                samples = self._checked(url, wds.tariterators.group_by_keys(files, handler=handler))
                read = 0
                for pos, sample in enumerate(samples, first):
                    if pos >= min(hi, start):
                        break
                    read += 1  # noqa: SIM113  samples read from this shard; pos already enumerates from `first`
                    if pos >= lo:
                        yield pos - lo, url, sample
                else:  # the whole shard was read: a tar cut at a member boundary ends without an error
                    if stream and not errors and read < self.counts[sid]:
                        errors.append(f"{read} of the {self.counts[sid]} samples its index lists")
            finally:
                for opened in stream:
                    opened["stream"].close()
            if errors and self._skip(url):
                if not stream:
                    self._warn(f"{url}: cannot open the shard ({_cause(errors[0])}); its samples are skipped")
                else:
                    self._warn(
                        f"{url}: shard is truncated or corrupt ({str(errors[0]).split(' @ ')[0]}); the "
                        "samples before the damage were used, the rest of the shard is skipped; rewrite it "
                        "with `pixelseg shards`"
                    )

    def _checked(self, url: str, samples):
        """The shard's samples without its __info__ record, refusing a shard of other classes."""
        for sample in samples:
            if sample.get("__key__") != INFO_KEY:
                yield sample
                continue
            try:
                head = json.loads(sample["info.json"])
                theirs = head["info"]["class_names"]
            except (KeyError, TypeError, ValueError):
                raise PixelsegError(f"{url}: unreadable {INFO_KEY} record; rewrite it with `pixelseg shards`") from None
            if list(theirs) != list(self.info.class_names):
                raise PixelsegError(
                    f"{url}: a shard of {head.get('dataset', '?')} with other classes "
                    f"({_classes(theirs)}) mixed into shards of {self.info.name} "
                    f"({_classes(self.info.class_names)}); refused: keep one dataset per directory "
                    "or prefix"
                )

    def _warn(self, msg: str) -> None:
        log.warning(msg)

    def decode(self, url: str, sample: dict):
        """(name, image uint8 H×W×3, mask uint8 H×W) at the source resolution capped by max_side, or at
        `size` when not full_res; None (reported) when the sample cannot be used."""
        key = sample.get("__key__", "?")
        where = f"{url} sample {key}"
        img_key = next((k for k in sample if k.startswith("img.")), None)
        name = sample.get("name.txt", key.encode() if isinstance(key, str) else b"?").decode()
        if img_key is None or "seg.png" not in sample:
            missing = "image (img.*)" if img_key is None else "mask (seg.png)"
            self._warn(
                f"{where} ({name}): no {missing} in the shard; sample skipped (rewrite the shard with "
                "`pixelseg shards`)"
            )
            self._skip(where)
            return None
        try:
            from PIL import Image

            isz = Image.open(io.BytesIO(sample[img_key])).size
            msz = Image.open(io.BytesIO(sample["seg.png"])).size
            try:
                check_same_size(f"{where} ({name})", None, isz, msz)
            except PixelsegError as exc:
                self._warn(f"{exc}; sample skipped")
                self._skip(where)
                return None
            target = fit_size((isz[1], isz[0]), None if self.full_res else self.size, self.max_side)
            img = read_image(io.BytesIO(sample[img_key]), target, name=f"{where} {img_key}")
            mask = read_mask(io.BytesIO(sample["seg.png"]), target, name=f"{where} seg.png")
        except (UnreadableImage, OSError, SyntaxError, ValueError) as exc:
            self._warn(f"skipping {where} ({name}): {exc}")
            self._skip(where)
            return None
        return name, img, mask

    def _tensors(self, img, mask):
        img = torch.from_numpy(_writable(img)).permute(2, 0, 1)
        mask = torch.from_numpy(_writable(mask)).long()
        return self.transform(img, mask) if self.transform is not None else (img, mask)

    def _shares(self, rank: int, workers: int) -> tuple[np.ndarray, int | None]:
        """(the DataLoader worker of each rank-local sample position, the worker that repeats position 0
        to fill the planned repeat, or None): batch b belongs to worker b % workers."""
        sizes = self.batch_sizes(rank)
        lo, hi = _rank_range(self._total(), rank, self.world)
        owners = np.repeat(np.arange(len(sizes)) % workers, sizes)
        return owners[: hi - lo], (int(owners[-1]) if len(owners) > hi - lo else None)

    def iter_samples(self, rank: int | None = None, k: int = 0, workers: int = 1):
        """(name, image, mask) of this rank's (and worker's) share, decoded, in stream order."""
        rank = self.rank if rank is None else rank
        owners, repeats = self._shares(rank, workers)
        buf: list = []
        rng = random.Random(hash((self.seed, self.epoch, rank, k)) % 2**32)
        for j, url, sample in self._records(rank):
            copies = int(owners[j] == k) + int(j == 0 and repeats == k)
            if not copies:
                continue
            if not self.shuffle:
                out = self.decode(url, sample)
                for _ in range(copies if out is not None else 0):
                    yield out
                continue
            buf += [(url, sample)] * copies  # shuffle buffer of encoded samples
            if len(buf) >= SHUFFLE_BUFFER:
                out = self.decode(*buf.pop(rng.randrange(len(buf))))
                if out is not None:
                    yield out
        rng.shuffle(buf)
        for url, sample in buf:
            out = self.decode(url, sample)
            if out is not None:
                yield out

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        k, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        sizes = self.batch_sizes()[k::workers]
        it = self.iter_samples(self.rank, k, workers)
        last = None
        for b, size in enumerate(sizes):
            items = []
            for _, img, mask in it:
                items.append(self._tensors(img, mask))
                if len(items) == size:
                    break
            if not items:
                if last is None or not self.even:
                    return
                # samples were skipped (damaged shard): repeat the last batch so DDP ranks stay in step
                self._warn(
                    f"rank {self.rank} worker {k}: {len(sizes) - b} batch(es) short after skipped samples; "
                    "repeating the last one to keep processes in step"
                )
                yield last
                continue
            last = torch.stack([a for a, _ in items]), torch.stack([m for _, m in items])
            yield last

    def iter_masks(self):
        """Every mask of the split once (class statistics), at the training resolution."""
        for _, _, mask in ShardDataset(self.urls, self.counts, self.info, self.size, limit=self.limit).iter_samples():
            yield mask

    def __getitems__(self, indices):
        """The first samples of this rank's stream (epoch figures); not for training."""
        want, items = max(indices) + 1, []
        for _, img, mask in self.iter_samples():
            items.append((torch.from_numpy(_writable(img)).permute(2, 0, 1), torch.from_numpy(_writable(mask)).long()))
            if len(items) == want:
                break
        picked = [items[i] for i in indices if i < len(items)]
        return torch.stack([a for a, _ in picked]), torch.stack([m for _, m in picked])


def load(root, split: str, image_size, limit: int | None = None, use_cache=True, **_):
    """`--dataset shards`: the split's shards as a ShardDataset (`use_cache` only picks the resolution)."""
    from .base import cache_spec

    if root is None:
        raise PixelsegError(
            "--dataset shards needs --data-root: the directory, URL or brace pattern of shards "
            "written by `pixelseg shards`"
        )
    index, urls, counts = read_index(root, split)
    spec = cache_spec(use_cache)
    return ShardDataset(
        urls,
        counts,
        DatasetInfo.from_dict(index["info"]),
        tuple(image_size),
        full_res=spec.full_res,
        max_side=spec.max_side,
        limit=limit,
    )


def info(root, split: str = "train") -> DatasetInfo:
    return DatasetInfo.from_dict(read_index(root, split)[0]["info"])


def full_res_iter(root, split: str, limit=None, skipped=None):
    """(name, image, mask) at the source resolution, every sample once (evaluate --full-res)."""
    ds = load(root, split, (64, 64), limit, use_cache=None)
    ds.full_res = True
    yield from ds.iter_samples()
    if skipped is not None:
        skipped.extend(ds.skipped)

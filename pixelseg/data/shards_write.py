"""Writing a split as WebDataset shards (`pixelseg shards`, `convert --to shards`): tar files of encoded
image/mask pairs plus an index, published atomically; reading them back is shards.py's."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..core.errors import PixelsegError
from ..core.logs import logger as log
from . import remote
from .base import DatasetInfo
from .io import UnreadableImage, read_image
from .shards import INDEX_FORMAT, INDEX_VERSION, INFO_KEY, _classes


# ---- writing --------------------------------------------------------------------------------------
def write_shards(
    dataset: str,
    root,
    split: str,
    out,
    maxcount: int = 1000,
    limit: int | None = None,
    progress: bool = True,
    **options,
) -> dict:
    """Write one split of any dataset pixelseg reads as WebDataset shards plus its index; each shard is
    written under a temporary name and renamed, and the index last, so readers never see a partial set."""
    import webdataset as wds
    from tqdm import tqdm

    from . import load_split
    from .base import CacheSpec, FileDataset

    if maxcount < 1:
        raise PixelsegError(f"--maxcount {maxcount}: must be >= 1")
    existing = _existing_indexes(out)  # first: a wrong key or endpoint fails before any reading
    ds = load_split(dataset, root, split, (64, 64), limit, CacheSpec("none", full_res=True), **options)
    _refuse_other_classes(existing, dataset, ds.info)
    if remote.is_s3(out):
        out, staging = str(out), Path(tempfile.mkdtemp(prefix="pixelseg-shards-"))
    else:
        out, staging = Path(out), Path(out)
    from ..core.files import pid_prefix, remove_stale_temps

    if staging == out:
        remove_stale_temps(out, f".{split}-")  # a killed run's unfinished shard
    shards: list[dict] = []
    buf_count, writer, tmp, n, skipped = 0, None, None, 0, []
    header = {"__key__": INFO_KEY, "info.json": json.dumps({"dataset": dataset, "info": ds.info.to_dict()}).encode()}

    def close():
        nonlocal writer, tmp, buf_count
        if writer is None:
            return
        writer.close()
        name = f"{split}-{len(shards):06d}.tar"
        _publish(tmp, out, name)
        shards.append({"url": name, "count": buf_count})
        writer, tmp, buf_count = None, None, 0

    try:
        items = _source_items(ds, FileDataset)
        for name, image_bytes, ext, mask in tqdm(
            items, total=len(ds), desc=f"shards {split}", unit="img", leave=False, disable=not progress or None
        ):
            if image_bytes is None:  # unreadable source file: skipped and counted
                skipped.append(name)
                continue
            if writer is None:
                fd, tmp = tempfile.mkstemp(prefix=pid_prefix(f".{split}-"), suffix=".tar.tmp", dir=staging)
                os.close(fd)
                writer = wds.TarWriter(tmp)
                writer.write(header)  # the shard's classes: a shard mixed into another dataset's is refused
            png = io.BytesIO()
            from PIL import Image

            Image.fromarray(mask).save(png, format="PNG")
            writer.write(
                {"__key__": f"{n:09d}", f"img.{ext}": image_bytes, "seg.png": png.getvalue(), "name.txt": name.encode()}
            )
            n += 1
            buf_count += 1
            if buf_count >= maxcount:
                close()
        close()
    finally:
        if staging != out:  # the local copies of uploaded shards
            shutil.rmtree(staging, ignore_errors=True)
    if n == 0:
        raise PixelsegError(f"dataset {dataset} split {split!r}: no readable samples to write")
    return _publish_index(out, split, dataset, ds.info, n, shards, skipped)


def _publish_index(out, split: str, dataset: str, info, count: int, shards: list, skipped: list) -> dict:
    """SPLIT.json, written last (atomically, or as one S3 object): readers see a complete set or none."""
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "dataset": dataset,
        "split": split,
        "info": info.to_dict(),
        "count": count,
        "shards": shards,
        "skipped": skipped,
    }
    if isinstance(out, str):
        remote.write_bytes(remote.join(out, f"{split}.json"), json.dumps(index, indent=1).encode())
    else:
        from ..core.files import atomic_write_text

        atomic_write_text(out / f"{split}.json", json.dumps(index, indent=1))
    return index


def _existing_indexes(out) -> dict[str, dict]:
    """{url or path: index} of the shard indexes already at `out` (created when missing)."""
    found = {}
    if remote.is_s3(out):
        for url in remote.listing(str(out)):
            if url.endswith(".json"):
                with contextlib.suppress(PixelsegError, ValueError):
                    found[url] = json.loads(remote.read_bytes(url))
        return found
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PixelsegError(f"--out {out}: cannot create it ({exc.strerror})") from None
    for path in out.glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            found[str(path)] = json.loads(path.read_text())
    return found


def _refuse_other_classes(existing: dict, dataset: str, info: DatasetInfo) -> None:
    """Shards of two datasets under one --out would be read as one: refused, naming the other index."""
    for where, index in existing.items():
        theirs = index.get("info", {}).get("class_names") if isinstance(index, dict) else None
        if theirs is not None and index.get("format") == INDEX_FORMAT and theirs != list(info.class_names):
            raise PixelsegError(
                f"--out {where}: holds shards of {index.get('dataset', '?')} with other classes "
                f"({_classes(theirs)}, not {_classes(info.class_names)}); write {dataset} to "
                "another --out (one dataset per directory or prefix)"
            )


def _publish(tmp: str, out, name: str) -> None:
    """A finished shard under its final name: renamed on a disk, one PUT to object storage."""
    if isinstance(out, str):
        remote.upload(tmp, remote.join(out, name))
        os.remove(tmp)
    else:
        os.replace(tmp, out / name)


def _source_items(ds, file_dataset_cls):
    """(name, image file bytes, extension, class-id mask) per sample at the source resolution."""
    from PIL import Image

    if isinstance(ds, file_dataset_cls):
        for s in ds.samples:
            try:
                _, mask = ds.reader(s, None, None)  # checks the pair and applies the dataset's label mapping
                data = Path(s.image).read_bytes()
                fmt = (Image.open(io.BytesIO(data)).format or "").lower()
            except UnreadableImage as exc:
                log.warning(f"skipping {exc}")
                yield str(s.image), None, None, None
                continue
            ext = {"jpeg": "jpg", "png": "png"}.get(fmt)
            turn = getattr(s, "orientation", 1) != 1  # annotated upright (labels/rules.py): stored upright
            if ext is None or turn:  # other formats are stored as PNG of what the dataset reads (lossless)
                buf = io.BytesIO()
                Image.fromarray(read_image(s.image, exif_transpose=turn)).save(buf, format="PNG")
                data, ext = buf.getvalue(), "png"
            yield s.name, data, ext, mask
    else:  # array datasets (synthetic): lossless PNG of the arrays
        for i in range(len(ds)):
            buf = io.BytesIO()
            Image.fromarray(np.asarray(ds.images[i])).save(buf, format="PNG")
            yield ds.names[i], buf.getvalue(), "png", np.asarray(ds.masks[i])

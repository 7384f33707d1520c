"""The dataset fingerprint (nnU-Net's idea): what the data is — sizes, channels, bit depth, class
frequencies, object scales, file-name patterns — read once from a sample of the split. The planner reads it;
`pixelseg plan` writes it beside the recipe."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import PixelsegError
from .config import TrainConfig

MAX_SAMPLED = 120  # images read for the statistics; more are sampled evenly by a fixed rule
SEQUENCE = r"^(.*?)[-_. ]*\d+$"  # = data.folder.PREFIX_GROUP: frame/slice number at the end
TILE = r"^(.*?)[-_. ]*(?:r|row|y)?\d+[-_. ]+(?:c|col|x)?\d+$"  # two trailing numbers: tiles of one image


# ---- fingerprint ---------------------------------------------------------------------------------------
@dataclass
class Fingerprint:
    dataset: str
    n_train: int
    n_val: int
    sampled: int
    sizes_hw: list  # (h, w) of the training images (headers only; at most 1000, spread over the split)
    channels: int
    bit_depth: int
    mean: list
    std: list
    class_names: list
    pixel_freq: list  # share of labelled pixels, per class
    image_freq: list  # share of images holding the class
    object_scale: list  # per class: sqrt(component area / image area), area-weighted median; None: absent
    up_asymmetry: float  # class-distribution distance top third vs bottom third
    side_asymmetry: float  # the same, left vs right (the noise level of the first)
    train_names: list
    val_names: list
    val_group_option: bool  # the dataset can group its own val split (folder-like)
    val_carved: bool = False  # val is --val-fraction's share of train, not a split the dataset has
    read_s_per_image: float = 0.0
    seconds: float = 0.0

    @property
    def median_hw(self) -> tuple[int, int]:
        a = np.array(self.sizes_hw)
        return int(np.median(a[:, 0])), int(np.median(a[:, 1]))

    @property
    def aspect(self) -> float:
        """Median width / height."""
        a = np.array(self.sizes_hw, float)
        return float(np.median(a[:, 1] / a[:, 0]))


def _even_sample(items: list, n: int) -> list:
    """n items spread over the list (the first ones are often one class or one sequence)."""
    if len(items) <= n:
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


def _mask_stats(mask: np.ndarray, num_classes: int, ignore: int, scales: list, sides: np.ndarray) -> np.ndarray:
    """Pixel counts per class of one mask (at most 256 px a side), appending component scales per class."""
    import cv2

    h, w = mask.shape
    counts = np.bincount(mask[mask != ignore].ravel(), minlength=num_classes)[:num_classes]
    for c in np.flatnonzero(counts):
        areas = cv2.connectedComponentsWithStats((mask == c).astype(np.uint8), connectivity=8)[2][1:, cv2.CC_STAT_AREA]
        areas = areas[areas >= 2]  # single stray pixels are resize noise, not objects
        scales[c].extend((float(np.sqrt(a / (h * w))), int(a)) for a in areas)
    t = h // 3
    for i, part in enumerate((mask[:t], mask[h - t :], mask[:, : w // 3], mask[:, w - w // 3 :])):
        valid = part[part != ignore]
        sides[i] += np.bincount(valid.ravel(), minlength=num_classes)[:num_classes]
    return counts


def _weighted_median(scale_area: list) -> float | None:
    """The scale of the component that the median pixel of a class lies in: the many slivers a mask
    holds at object edges do not drag it down, as a plain median over components would."""
    if not scale_area:
        return None
    scale, area = np.array(scale_area, float).T
    order = np.argsort(scale)
    cum = np.cumsum(area[order])
    return float(scale[order][np.searchsorted(cum, cum[-1] / 2)])


def _small(mask: np.ndarray, side: int = 256) -> np.ndarray:
    from PIL import Image

    h, w = mask.shape
    if max(h, w) <= side:
        return mask
    f = side / max(h, w)
    return np.asarray(
        Image.fromarray(mask).resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.NEAREST)
    )


def _tv(a: np.ndarray, b: np.ndarray) -> float:
    """Total-variation distance of two count vectors."""
    if a.sum() == 0 or b.sum() == 0:
        return 0.0
    return float(0.5 * np.abs(a / a.sum() - b / b.sum()).sum())


def _samples(cfg: TrainConfig, split: str):
    """(names, [reader(channels) -> (image, target)], header sizes, paths) of a split, through the dataset
    registry; the readers take the channel count, decided from the headers before any pixels are read."""
    from ..data import dataset_options, get_dataset_module, load_split
    from ..data.io import image_hw, read_input

    module = get_dataset_module(cfg.dataset)
    opts = dataset_options(cfg.to_dict())
    root = Path(cfg.data_root) if cfg.data_root and cfg.dataset != "shards" else cfg.data_root
    if hasattr(module, "full_res_samples"):
        samples, read_target = module.full_res_samples(root, split, **opts)
        if cfg.limit:
            samples = samples[: cfg.limit]
        readers = [(lambda channels, s=s: (read_input(s.image, channels), read_target(s))) for s in samples]

        def sizes():  # headers only, of at most 1000 images spread over the split
            return [image_hw(s.image) for s in _even_sample(samples, 1000)]

        return [s.name for s in samples], readers, sizes, [s.image for s in samples]
    # datasets without files (synthetic, shards): their decoded arrays at a moderate size
    ds = load_split(cfg.dataset, cfg.data_root, split, 256, cfg.limit, channels=cfg.in_channels, **opts)
    readers = [(lambda channels, i=i: (np.asarray(ds.images[i]), np.asarray(ds.masks[i]))) for i in range(len(ds))]
    return list(ds.names), readers, (lambda: [tuple(np.asarray(ds.images[0]).shape[:2])] * len(ds)), []


def _header_channels(path) -> tuple[int, int] | None:
    """(channels a model must take, bits per channel) of one file from its header; None: unreadable.
    8-bit grey, palette and RGBA files are read as RGB (3); 16-bit grey files as one band; a TIFF as its
    bands (TIFFs are read band by band, data.io.read_input)."""
    from PIL import Image

    from ..data.io import is_tiff

    try:
        if is_tiff(Path(path)):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                page = tf.pages[0]
                return max(1, int(page.samplesperpixel)), int(page.bitspersample)
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                return 1, 16
            return 3, 8
    except Exception:
        return None


def _channels(paths: list, dataset: str = "") -> tuple[int, int]:
    """(in_channels, bits per channel) decided from every sampled file, as the docs promise: 1 for 16-bit
    grey, the band count of multi-band (TIFF) rasters, else 3 (8-bit grey and RGB photos are read as RGB).
    Files that need different counts cannot train one model: one line naming an example of each."""
    seen: dict[int, str] = {}
    bits = 8
    for p in paths:
        head = _header_channels(p)
        if head is None:
            continue
        seen.setdefault(head[0], str(p))
        bits = max(bits, head[1])
    if len(seen) > 1:
        from ..data.io import is_tiff

        if all(c == 3 or not is_tiff(Path(f)) for c, f in seen.items()):
            return 3, bits  # 16-bit grey beside RGB photos: all read as RGB, what read_input does for 3
        examples = ", ".join(f"{Path(f).name}: {c}" for c, f in sorted(seen.items()))
        raise PixelsegError(
            f"--dataset {dataset}: the images need different channel counts ({examples}); a "
            "model takes one count (--in-channels): convert them to one"
        )
    return (next(iter(seen)) if seen else 3), bits


def fingerprint(cfg: TrainConfig, max_images: int = MAX_SAMPLED, progress: bool = True) -> Fingerprint:
    """What the training split is, from at most ``max_images`` images read at their own resolution."""
    from ..data import dataset_info, dataset_options, get_dataset_module

    t0 = time.time()
    info = dataset_info(cfg.dataset, cfg.data_root, cfg.val_split, **dataset_options(cfg.to_dict()))
    assert cfg.train_split is not None and cfg.val_split is not None  # resolve_config names them
    names, readers, sizes, paths = _samples(cfg, cfg.train_split)
    val_names = _samples(cfg, cfg.val_split)[0]
    k, ignore = info.num_classes, info.ignore_index
    picked = _even_sample(list(range(len(readers))), max_images)
    # channels from the headers of every sampled file, before the pixels are read with that count
    chans, bits = _channels([paths[i] for i in picked], cfg.dataset) if paths else (3, 8)
    chans = cfg.in_channels if cfg.in_channels != 3 else chans
    counts, present = np.zeros(k), np.zeros(k)
    scales: list[list[float]] = [[] for _ in range(k)]
    sides = np.zeros((4, k))
    csum = csq = None
    npx = 0
    t_read = time.time()
    from ..core.progress import progress as bar

    for i in bar(picked, desc="fingerprint", unit="img", enabled=progress):
        img, mask = readers[i](chans)
        img = np.asarray(img)
        scale = 1.0 if img.dtype.kind == "f" else 255.0  # read_input: uint8 RGB, or float [0, 1] bands
        img = img.astype(np.float64)[..., None] if img.ndim == 2 else img.astype(np.float64)
        flat = img.reshape(-1, img.shape[-1])[::7] / scale  # every 7th pixel: statistics, not the sum
        csum = flat.sum(0) if csum is None else csum + flat.sum(0)
        csq = (flat**2).sum(0) if csq is None else csq + (flat**2).sum(0)
        npx += flat.shape[0]
        c = _mask_stats(_small(np.asarray(mask, np.uint8)), k, ignore, scales, sides)
        counts += c / max(1, c.sum())  # each image weighs the same, whatever its size
        present += c > 0
    read_s = (time.time() - t_read) / max(1, len(picked))
    assert csum is not None and csq is not None  # a split holds at least one image (the loaders refuse empty ones)
    mean = csum / npx
    std = np.sqrt(np.maximum(csq / npx - mean**2, 0))
    return Fingerprint(
        dataset=cfg.dataset,
        n_train=len(names),
        n_val=len(val_names),
        sampled=len(picked),
        sizes_hw=[tuple(map(int, s)) for s in sizes()],
        channels=chans,
        bit_depth=bits,
        mean=[round(float(v), 4) for v in mean],
        std=[round(float(v), 4) for v in std],
        class_names=list(info.class_names),
        pixel_freq=[float(v) for v in counts / max(1e-12, counts.sum())],
        image_freq=[float(v) for v in present / max(1, len(picked))],
        object_scale=[_weighted_median(s) for s in scales],
        up_asymmetry=_tv(sides[0], sides[1]),
        side_asymmetry=_tv(sides[2], sides[3]),
        train_names=names,
        val_names=list(val_names),
        val_group_option="val_group" in getattr(get_dataset_module(cfg.dataset), "OPTIONS", {}),
        val_carved=_val_carved(cfg),
        read_s_per_image=read_s,
        seconds=time.time() - t0,
    )


def _val_carved(cfg: TrainConfig) -> bool:
    """Whether the val split is carved out of train by --val-fraction (then --val-group shapes it)."""
    from .folds import _val_is_carved

    return cfg.val_split == "val" and _val_is_carved(cfg)


def name_groups(names: list[str]) -> tuple[str | None, str, dict]:
    """(val_group pattern or None, what the names look like, group -> count) from file-name patterns."""
    for pattern, what in ((TILE, "tiles"), (SEQUENCE, "sequences")):
        rx = re.compile(pattern)
        groups: dict[str, int] = {}
        matched, widths, padded = 0, set(), False
        for n in names:
            m = rx.search(n)
            matched += bool(m)
            groups[m.group(1) if m else n] = groups.get(m.group(1) if m else n, 0) + 1
            if m:
                tail = re.search(r"\d+$", n)
                assert tail is not None  # both patterns end in a number
                num = tail.group(0)
                widths.add(len(num))
                padded |= len(num) > 1 and num.startswith("0")
        # most names follow the pattern, groups hold several names each, and the numbers are frame/tile
        # counters (zero-padded, one width) rather than ids (Abyssinian_1 ... Abyssinian_200 are photos)
        counters = padded or (len(widths) == 1 and min(widths) >= 3)
        if names and matched >= 0.8 * len(names) and 2 <= len(groups) <= len(names) / 3 and counters:
            return ("prefix" if pattern == SEQUENCE else pattern), what, groups
    return None, "", {}
